"""The chat template and tokenizer a model was trained with, as a hash stored beside it.

A tuned model only answers well when its prompts are rendered exactly as in training. Training
writes `kftune_fingerprint.json` into its output; evaluate, merge and infer compute the same hash
for every tokenizer they are about to use with that model (its own saved files, and the base
model's) and refuse a mismatch unless told `--allow-template-mismatch`.

The hash covers what the tokenizer files load to, not their bytes: `save_pretrained` rewrites
tokenizer_config.json (key order, added fields) without changing the tokenizer, while an edited
chat_template.jinja, another vocabulary, other special tokens or another normaliser would all
change what the model sees. So it hashes the chat template text, the vocabulary with added and
special tokens, and the ids of a probe text (which catches normaliser and pre-tokenizer changes).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from kftune.core import artifacts
from kftune.core.errors import KftuneError

log = logging.getLogger("kftune")

ALLOW_FLAG = "--allow-template-mismatch"
VERSION = 1  # of what is hashed; a fingerprint of another version is not compared (it would always differ)
PROBE = "为这家店写一篇小红书探店笔记。Café ＡＢＣ 123 #探店  \n\tthe end ✨"


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def compute(tokenizer) -> dict[str, str]:
    """{"chat_template": sha256, "tokenizer": sha256, "fingerprint": sha256 of both} for a loaded tokenizer."""
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):  # several named templates
        template = json.dumps(template, sort_keys=True, ensure_ascii=False)
    content = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "probe_ids": tokenizer(PROBE, add_special_tokens=True)["input_ids"],
    }
    parts = {"chat_template": hashlib.sha256(template.encode()).hexdigest(), "tokenizer": _sha(content)}
    return {**parts, "fingerprint": _sha(parts)}


def write(folder: str | Path, tokenizer, source: str, data_mix: list | None = None) -> dict[str, Any]:
    """Store the fingerprint of `tokenizer` (the one training used, loaded from `source`) in `folder`, with the
    data mix the model was trained on when there was one (uris, sha256s, weights, rows drawn: not compared)."""
    record = {
        **compute(tokenizer),
        "version": VERSION,
        "source": source,
        **({"data_mix": data_mix} if data_mix else {}),
    }
    Path(folder, artifacts.FINGERPRINT).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def stored(folder: str | Path) -> dict[str, str] | None:
    """The fingerprint saved with a trained model, or None for a folder kftune did not train."""
    path = Path(folder, artifacts.FINGERPRINT)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def check(model_dir: str | Path, tokenizer, what: str, allow_mismatch: bool = False) -> None:
    """Refuse to use `tokenizer` (`what`: where it came from) with the model in `model_dir` when it differs
    from the one that model was trained with. A folder without a stored fingerprint is not checked."""
    record = stored(model_dir)
    if record is None:
        return
    if record.get("version") != VERSION:
        log.warning(
            "%s/%s was written by another kftune version (fingerprint version %s, this one %s); not checked",
            model_dir,
            artifacts.FINGERPRINT,
            record.get("version"),
            VERSION,
        )
        return
    now = compute(tokenizer)
    if now["fingerprint"] == record["fingerprint"]:
        return
    changed = [part.replace("_", " ") for part in ("chat_template", "tokenizer") if now[part] != record.get(part)]
    message = (
        f"{what} differs from the one {model_dir} was trained with ({' and '.join(changed)} changed; "
        f"fingerprint {now['fingerprint'][:12]} vs {record['fingerprint'][:12]} in {artifacts.FINGERPRINT}); "
        f"prompts would not be rendered as in training. Use the training tokenizer, or pass {ALLOW_FLAG} "
        "to go on anyway"
    )
    if not allow_mismatch:
        raise KftuneError(message)
    log.warning("%s (going on: %s)", message.split("; prompts")[0], ALLOW_FLAG)
