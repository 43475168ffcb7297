"""The artifact contract: the names of the files each step writes, in one place.

A model folder (train, merge): CONFIG, FINGERPRINT, TRAIN_METRICS (and MERGE_REPORT after a merge). An
evaluation folder: EVAL_METRICS, SAMPLES, REPORT. A validation folder: ACCEPTED, REJECTED, WARNINGS, the
TRAIN_SPLIT and EVAL_SPLIT, VALIDATION_REPORT and REPORT. Every uploaded artifact: MANIFEST, written last.
"""

CONFIG = "kftune_config.json"  # the resolved TrainConfig a model was trained with (TrainConfig.save / load)
FINGERPRINT = "kftune_fingerprint.json"  # the chat template and tokenizer it was trained with
TRAIN_METRICS = "train_metrics.json"  # training's loss history, counts, speed and memory
MERGE_REPORT = "merge_report.json"  # the merge's parity check
EVAL_METRICS = "metrics.json"  # evaluation: base vs tuned on the same eval data (the one metrics.json)
SAMPLES = "samples.jsonl"  # evaluation: prompts with the base's and the tuned model's answers
REPORT = "report.html"  # evaluation's and validation's page for people
VALIDATION_REPORT = "report.json"  # the data gate's Report
ACCEPTED, REJECTED, WARNINGS = "accepted.jsonl", "rejected.jsonl", "warnings.jsonl"
TRAIN_SPLIT, EVAL_SPLIT = "train.jsonl", "eval.jsonl"
MANIFEST = "MANIFEST.json"  # sha256 of every file of an uploaded artifact
