"""`kftune pipeline run|sweep|compile|submit|schedule`: run the DAG (or the method x rank sweep) locally
through kfp.local against the local stack, compile it for a cluster, or submit / schedule it on one
(pipelines/submit.py). `--pipeline sweep` makes compile, submit and schedule work on the sweep.

`run` and `sweep` take one flag per pipeline parameter (derived from the pipeline's signature, so
the two cannot drift apart), start the local stack when it is not running, and stage what the
tasks need in S3: local files are uploaded, and without --base-model / --data-uri the tiny demo
model (built once from the committed sample data) and that data are used, so they work offline.
"""

import argparse
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Any

from kftune import steps
from kftune.core.commit import head_commit
from kftune.core.errors import KftuneError
from kftune.core.storage import S3, connect_s3, upload_dir, upload_file
from kftune.data.formats import FORMATS
from kftune.data.mixing import parse
from kftune.dev.stack import StackConfig, StackInfo, default_state_dir, load_info, status, up
from kftune.dev.tiny_model import build_tiny_model
from kftune.sweep.compare import DIRECTIONS
from kftune.sweep.plan import SWEEP_METHODS, TARGET_PRESETS
from kftune.train.node_count import MAX_GPUS_PER_NODE, MAX_TRAIN_NODES, check_node_counts
from pipelines import submit
from pipelines.compile import PIPELINES, compile_pipeline
from pipelines.local import RUNNERS, RunSummary, SweepSummary, run, run_sweep
from pipelines.parameters import NODE_DEFAULTS, check, pipeline_parameters, read_params
from pipelines.submit import NAMESPACE, TOKEN_ENV

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data" / "store_xhs_sft_samples.jsonl"
NODE_HELP = {
    "train_nodes": "nodes to train on: 1 trains in the train task's own pod; more, as a Kubeflow Trainer TrainJob "
    f"(1 to {MAX_TRAIN_NODES}; on a cluster with Trainer v2.3+ and k8s/base's kftune-torch runtime)",
    "gpus_per_node": f"GPUs each training node asks for on a cluster (1 to {MAX_GPUS_PER_NODE})",
    "train_processes": "training processes per node; 0: one per GPU of the node (one where it has none)",
}
# Wide enough that LoRA on its random weights learns the post format in ~300 CPU steps (measured:
# hidden 128 reaches eval loss 5.1 in 300 steps, 512 reaches 3.5 at about the same time per step).
DEMO_MODEL = {"hidden_size": 512, "intermediate_size": 1024, "num_heads": 8, "num_kv_heads": 2}
HELP = {
    "data_uri": "training data: a JSONL/JSON file (uploaded) or an s3:// artifact URI; default: the committed sample data",
    "base_model": "a model folder (uploaded), an s3:// artifact URI or a hub id; default: the tiny demo model, "
    "built once from the sample data",
    "method": "full, lora or qlora",
    "learning_rate": "peak learning rate; 0: the guide's rate for the method (full 2e-5, lora 1e-4, qlora 2e-4)",
    "quantization_bit": "QLoRA bits, 4 or 8",
    "artifact_root": "where the tasks store their artifacts; default: s3://<stack bucket>/pipeline",
    "sample_tokens": "max new tokens of each greedy answer evaluate scores",
    "eval_samples": "eval prompts answered greedily by the base and the tuned model and scored (0: none)",
    "primary_metric": "the metric the promotion gate (and a sweep's ranking) compares: eval_loss, perplexity, rougeL, chrf, "
    "checks_pass_rate, tool_call_name_match or tool_call_args_match",
    "data_format": "the rows' format: auto (the file's first row's), alpaca, messages, sharegpt, prompt_completion or text",
    "promotion_margin": "how much the candidate must beat its base by, as a fraction of the base's value",
    "git_commit": "tagged on the registered version; default: this checkout's HEAD",
    "methods": "the sweep's methods, space-separated: full, lora, qlora4, qlora8 (full trains once, whatever the ranks)",
    "ranks": "LoRA ranks, space-separated, e.g. 8 16",
    "target_presets": "LoRA target modules, space-separated presets: all, attention, mlp, auto (every linear layer)",
    "data_mix": 'JSON list of {"uri", "weight"} sources mixed into the training rows (local files uploaded), '
    "each weight its share; the held-out split stays the task data's",
    "benchmarks": "lm-evaluation-harness task names and/or task folders run on base and tuned (kftune_smoke: "
    "the shipped smoke check)",
    "benchmark_limit": "examples per benchmark task (0: all)",
    "guard_max_drop": "every benchmark metric must stay within this fraction of its base to promote (negative: no guard)",
    **NODE_HELP,
}
DEFAULTS_NOTE = (
    "Training defaults are the guide's config for the method (configs/train_config_*.json), with two "
    "deliberate differences: LoRA targets are found automatically (every linear layer but the LM head) and "
    "gradient checkpointing is left to the memory pre-flight, which turns it on when only that fits."
)
STAGED = ("data_uri", "base_model", "artifact_root")  # defaults set here, for the local stack
CHOICES = {
    "method": steps.METHODS,
    "methods": tuple(SWEEP_METHODS),
    "target_presets": tuple(TARGET_PRESETS),
    "primary_metric": tuple(DIRECTIONS),
    "data_format": ("auto", *FORMATS),
}
LOCAL_PARALLELISM = 1  # sweep branches at once here: one at a time keeps each one's time and memory its own


def chosen_pipeline(argv: list[str]) -> str:
    """`--pipeline NAME` among the arguments (finetune when absent), read first because the flags depend on it."""
    pre = argparse.ArgumentParser(prog="kftune pipeline", add_help=False)
    pre.add_argument("--pipeline", choices=PIPELINES, default="finetune")
    return pre.parse_known_args(argv)[0].pipeline


def build_parser(pipeline: str = "finetune") -> argparse.ArgumentParser:
    """The parser; `pipeline` (see `chosen_pipeline`) decides the parameter flags of submit and schedule."""
    parser = argparse.ArgumentParser(prog="kftune pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run the DAG on this machine through kfp.local against the local stack", epilog=DEFAULTS_NOTE
    )
    add_parameter_flags(run, HELP, STAGED)
    add_local_flags(run)
    run.add_argument(
        "--runner",
        choices=RUNNERS,
        default="subprocess",
        help="subprocess (default: each task a child of this Python, no images needed) or container "
        "(each task in its component's image, as a pod runs it: `make images` first)",
    )
    sweep = commands.add_parser(
        "sweep",
        help="run the method x rank sweep on this machine through kfp.local against the local stack",
        epilog=DEFAULTS_NOTE,
    )
    add_parameter_flags(sweep, HELP, STAGED, pipeline="sweep")
    add_local_flags(sweep)
    sweep.add_argument(
        "--parallelism",
        type=int,
        default=LOCAL_PARALLELISM,
        help=f"branches at once (default: {LOCAL_PARALLELISM}, so timings and memory are each branch's own)",
    )
    add_cluster_commands(commands, pipeline)
    compile_ = commands.add_parser("compile", help="write the pipeline package a KFP cluster runs")
    add_pipeline_choice(compile_)
    compile_.add_argument("-o", "--output", type=Path, help="YAML file to write (default: build/<pipeline>.yaml)")
    for name, default in NODE_DEFAULTS.items():
        compile_.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar=name.upper(),
            type=int,
            help=f"{NODE_HELP[name]}; the compiled default, which a run may override (default: {default})",
        )
    return parser


def add_local_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        help="the local stack's folder (default: $KFTUNE_STACK_DIR or ./.kftune/stack)",
    )
    cmd.add_argument("--s3-port", type=int, default=StackConfig.s3_port, help="S3 port if the stack must be started")
    cmd.add_argument(
        "--mlflow-port", type=int, default=StackConfig.mlflow_port, help="MLflow port if the stack must be started"
    )
    cmd.add_argument(
        "--pipeline-root",
        type=Path,
        help="where kfp.local keeps task records and logs (default: runs/ next to the state folder)",
    )


def add_pipeline_choice(cmd: argparse.ArgumentParser) -> None:
    from pipelines.sweep import PARALLELISM  # heavy: imports kfp; loaded when used

    cmd.add_argument(
        "--pipeline",
        choices=PIPELINES,
        default="finetune",
        help="finetune (one method, the default) or sweep (methods x ranks, the winner registered)",
    )
    cmd.add_argument(
        "--parallelism", type=int, help=f"sweep only: training branches at once (default: {PARALLELISM}; 0: no limit)"
    )


def add_parameter_flags(
    parser: argparse.ArgumentParser, help_: dict[str, str], no_default: tuple[str, ...] = (), pipeline: str = "finetune"
) -> None:
    """One flag per pipeline parameter, typed from the pipeline's signature (a list parameter takes several values)."""
    for name, param in pipeline_parameters(pipeline).items():
        shown = param.default is not inspect.Parameter.empty and name not in no_default
        default = (
            " (pipeline default: {})".format(
                " ".join(map(str, param.default)) if isinstance(param.default, list) else param.default
            )
            if shown
            else ""
        )
        many = typing.get_origin(param.annotation) is list
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar=name.upper(),
            nargs="+" if many else None,
            type=typing.get_args(param.annotation)[0] if many else param.annotation,
            choices=CHOICES.get(name),
            help=help_.get(name, "") + default,
        )


def add_cluster_commands(commands: Any, pipeline: str = "finetune") -> None:
    """`submit` and `schedule`: the same flags, plus --cron for schedule."""
    cluster_help = {
        **HELP,
        "data_uri": "a local JSONL/JSON file (uploaded to the cluster's S3 with $AWS_* credentials) "
        "or an s3:// artifact URI",
        "base_model": "an s3:// artifact URI or a hub id",
    }
    for name, what in (
        ("submit", "start a run on a Kubeflow Pipelines cluster (once per idempotency key)"),
        ("schedule", "create a recurring run on a Kubeflow Pipelines cluster"),
    ):
        cmd = commands.add_parser(
            name, help=what, description=f"{what}. Token: ${TOKEN_ENV} (bearer), never printed.", epilog=DEFAULTS_NOTE
        )
        cmd.add_argument(
            "--host", help="KFP API URL, e.g. https://kfp.example.com/pipeline (required unless --dry-run)"
        )
        cmd.add_argument("--experiment", default="kftune", help="KFP experiment, created if missing (default: kftune)")
        cmd.add_argument("--run-name", help="run name (default: kftune-<method>); the idempotency key is appended")
        cmd.add_argument(
            "--params", type=Path, metavar="FILE", help="JSON object of pipeline parameters; flags override it"
        )
        cmd.add_argument(
            "--namespace", default=NAMESPACE, help=f"Kubernetes namespace of the runs (default: {NAMESPACE})"
        )
        cmd.add_argument("--force", action="store_true", help="create a new run even if one with the same key exists")
        cmd.add_argument("--dry-run", action="store_true", help="compile and print what would be sent; contact nothing")
        add_pipeline_choice(cmd)
        if name == "submit":
            cmd.add_argument(
                "--wait", action="store_true", help="wait for the run to finish; exit 1 unless it succeeded"
            )
            cmd.add_argument(
                "--timeout-hours", type=float, default=24.0, help="--wait gives up after this (default: 24)"
            )
        else:
            cmd.add_argument(
                "--cron", required=True, help="schedule, e.g. '0 3 * * 1' (5 fields, or KFP's 6 with seconds)"
            )
        add_parameter_flags(cmd, cluster_help, pipeline=pipeline)


def cluster_main(args: argparse.Namespace) -> int:
    """submit / schedule: prepare offline, print it, then (unless --dry-run) send it."""
    given = {
        **read_params(args.params),
        **{k: v for k, v in vars(args).items() if k in pipeline_parameters(args.pipeline) and v is not None},
    }
    if args.command == "schedule":
        submit.kfp_cron(args.cron)  # a bad expression fails before compiling
    if not args.dry_run and not args.host:
        raise KftuneError(f"--host is required to {args.command} (the KFP API URL); use --dry-run to only print")
    sub = submit.prepare(
        given, args.experiment, args.run_name, args.namespace, pipeline=args.pipeline, parallelism=args.parallelism
    )
    print(("would send" if args.dry_run else "sending") + f" to {args.host or '(no host)'}:\n{sub.describe()}")
    if args.dry_run:
        return 0
    if args.command == "schedule":
        outcome = submit.schedule(sub, args.host, args.cron, force=args.force)
        verb = "created" if outcome.created else "exists already (same key; --force for another)"
        print(f"recurring run {outcome.run_id} {verb}: {outcome.display_name}, cron {outcome.extra['cron']}")
        return 0
    outcome = submit.submit(sub, args.host, force=args.force, wait_s=args.timeout_hours * 3600 if args.wait else None)
    verb = "started" if outcome.created else "exists already (same key; --force for another)"
    print(f"run {outcome.run_id} {verb}: {outcome.display_name}")
    if args.wait:
        print(f"run {outcome.run_id} finished: {outcome.state}")
        return 0 if (outcome.state or "").upper() == "SUCCEEDED" else 1
    return 0


def ensure_stack(args: argparse.Namespace) -> StackInfo:
    """The stack in --state-dir, started when it is not running."""
    if status(args.state_dir).running:
        return load_info(args.state_dir)
    print(f"[pipeline] starting the local stack in {args.state_dir} ...", file=sys.stderr, flush=True)
    return up(StackConfig(args.state_dir, args.s3_port, args.mlflow_port))


def demo_model(folder: Path) -> Path:
    """The tiny Qwen2-shaped demo model, built once (its tokenizer learns the sample data's vocabulary)."""
    if not (folder / "config.json").is_file():
        print(f"[pipeline] building the tiny demo model in {folder} (once) ...", file=sys.stderr, flush=True)
        build_tiny_model(folder, data_path=SAMPLE_DATA, force=True, **DEMO_MODEL)
    return folder


def stage(value: str, s3: S3, dest: str) -> str:
    """A local file or folder uploaded (content-addressed) and its URI; an s3:// URI or a hub id as is."""
    path = Path(value).expanduser()
    if path.is_dir():
        return upload_dir(path, dest, s3).uri
    if path.is_file():
        return upload_file(path, dest, s3).uri
    return value


def local_arguments(args: argparse.Namespace, pipeline: str = "finetune") -> tuple[dict[str, Any], StackInfo]:
    """Check the settings, make sure the stack runs and the inputs are in S3; the pipeline's arguments."""
    arguments: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k in pipeline_parameters(pipeline) and v is not None
    }
    data = arguments.get("data_uri") or str(SAMPLE_DATA)
    check({**arguments, "data_uri": data}, pipeline)  # before starting anything (and the nodes against the data)
    if not data.startswith("s3://") and not Path(data).expanduser().is_file():
        raise KftuneError(f"--data-uri {data}: no such file; give a JSONL/JSON file or an s3:// URI")
    base = arguments.get("base_model")
    if base and not base.startswith("s3://"):
        from kftune.models.loading import resolve_model_location  # imports torch: only when needed

        base = resolve_model_location(base, flag="--base-model")  # a local folder must hold a model, else a hub id
    info = ensure_stack(args)
    s3 = connect_s3(info.s3_endpoint, access_key=info.access_key, secret_key=info.secret_key)
    arguments["data_uri"] = stage(data, s3, f"s3://{info.bucket}/inputs/data")
    if arguments.get("data_mix"):  # each local mix source uploaded like data_uri
        mix = [
            {"uri": stage(s.uri, s3, f"s3://{info.bucket}/inputs/data"), "weight": s.weight}
            for s in parse(arguments["data_mix"])
        ]
        arguments["data_mix"] = json.dumps(mix)
    base = base or str(demo_model(args.state_dir.parent / "demo-model"))
    arguments["base_model"] = stage(base, s3, f"s3://{info.bucket}/inputs/models")
    arguments.setdefault("artifact_root", f"s3://{info.bucket}/pipeline")
    arguments.setdefault("git_commit", head_commit(Path(__file__).resolve().parents[1]))
    return arguments, info


def run_pipeline(args: argparse.Namespace) -> tuple[RunSummary, StackInfo]:
    """The fine-tuning DAG through kfp.local, inputs staged."""
    arguments, info = local_arguments(args)
    return run(arguments, info.env(), args.pipeline_root or args.state_dir.parent / "runs", runner=args.runner), info


def sweep_locally(args: argparse.Namespace) -> tuple[SweepSummary, StackInfo]:
    """The sweep through kfp.local, inputs staged."""
    arguments, info = local_arguments(args, "sweep")
    root = args.pipeline_root or args.state_dir.parent / "runs"
    return run_sweep(arguments, info.env(), root, parallelism=args.parallelism), info


def main(argv: list[str]) -> int:
    args = build_parser(chosen_pipeline(argv)).parse_args(argv)
    if args.command == "compile":
        counts = {k: getattr(args, k) for k in NODE_DEFAULTS if getattr(args, k) is not None}
        check_node_counts(**{**NODE_DEFAULTS, **counts})
        declared = pipeline_parameters(args.pipeline)  # gpus_per_node is a string parameter
        defaults = {k: declared[k].annotation(v) for k, v in counts.items()}
        output = args.output or Path(f"build/{args.pipeline}.yaml")
        path = compile_pipeline(output, args.pipeline, args.parallelism, defaults=defaults)
        print(f"wrote {path}")
        return 0
    if args.command in ("submit", "schedule"):
        return cluster_main(args)
    summary, info = sweep_locally(args) if args.command == "sweep" else run_pipeline(args)
    print(summary.render())
    print(f"\nMLflow UI: {info.mlflow_url}   stop the local stack: kftune stack down --state-dir {info.state_dir}")
    return 0
