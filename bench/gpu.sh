#!/usr/bin/env bash
# On a lent CUDA machine, which reaches no registry, inside one lease (about 5 minutes; budget 10):
#   1. install the carried wheels (bench/.gpu-wheels, from `make gpu-wheelhouse` here) with --no-index;
#   2. run the tests marked `cuda` (the levers on CUDA);
#   3. kftune against trl's own `sft` on the Qwen2.5-0.5B shape, both on sdpa (kftune's packed-attention lever
#      off, so the attention is the same), then kftune with every lever; LoRA, and QLoRA-4 when bitsandbytes
#      travelled: real tokens/s, MFU, torch.cuda.max_memory_allocated and max_memory_reserved, one table each.
#
#   make gpu-wheelhouse && bench/gpu.sh --dry-run     # here: every step but the GPU work (the model, data and
#                                                     # configs are made; nothing trains)
#   bench/gpu.sh                                      # there: carry bench/.gpu-wheels; PY (python3), OUT, STEPS
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
if [[ $DRY == 1 ]]; then
    PY=${PY:-.venv/bin/python}
    OUT=${OUT:-/tmp/kftune-gpu-dry-run}  # a dry run's JSON holds no measurement: never in bench/results
else
    PY=${PY:-python3}
    OUT=${OUT:-bench/results/gpu}
fi
STEPS=${STEPS:-20}
WHEELS=bench/.gpu-wheels
started=$(date +%s)
say() { echo "bench/gpu.sh: $*"; }

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [[ ${#wheels[@]} == 0 ]]; then
    say "no wheels in $WHEELS: run 'make gpu-wheelhouse' where PyPI answers, and carry $WHEELS" >&2
    exit 2
fi
SITE=$(mktemp -d /tmp/kftune-gpu-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT
# the machine's python3 is 3.12 on x86-64: the wheels are for it; the dry run installs them for it from here too
target=()
if [[ $DRY == 1 ]]; then
    target=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_24_x86_64)
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${target[@]}" "${wheels[@]}"
say "installed ${#wheels[@]} wheels into $SITE"
if [[ $DRY == 1 ]]; then
    # 3.12-only wheels cannot import into this interpreter; check the rest imports over this venv
    rm -rf "$SITE"/multiprocess* "$SITE"/_multiprocess*
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export KFTUNE_BENCH_COMMIT=${KFTUNE_BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}

"$PY" - <<'PY'
import importlib, torch
versions = {name: getattr(importlib.import_module(name), "__version__", "?") for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets")}
try:
    import bitsandbytes
    versions["bitsandbytes"] = bitsandbytes.__version__
except Exception as exc:  # not carried, or no CUDA library for this machine: the QLoRA rows say so
    versions["bitsandbytes"] = f"unavailable ({str(exc).splitlines()[0][:80]})"
import kftune.train.training  # the engine imports on this stack
print("bench/gpu.sh: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"bench/gpu.sh: GPU {p.name}, {p.total_memory / 2**30:.0f} GiB")
PY

cuda=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
if [[ $DRY == 0 && $cuda == 0 ]]; then
    say "no CUDA device visible to $PY; run it on a GPU machine (or --dry-run here)" >&2
    exit 2
fi

# the levers on CUDA: every test marked cuda (skipped, saying so, without a device)
mapfile -t cuda_tests < <(grep -l "pytest.mark.cuda" tests/test_*.py)
"$PY" -m pytest -q -p no:cacheprovider -m cuda "${cuda_tests[@]}"

methods=lora
skipped_bnb=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("bitsandbytes", ""))' "$WHEELS/skipped.json" 2>/dev/null || true)
if [[ -n $skipped_bnb ]]; then
    say "QLoRA rows skipped: bitsandbytes $skipped_bnb"
elif "$PY" -c 'import bitsandbytes' 2>/dev/null; then
    methods=lora,qlora4
else
    say "QLoRA rows skipped: bitsandbytes does not import on this machine"
fi

common=(--same-python --shape qwen2.5-0.5b --data generated --steps "$STEPS" --runs 1 --methods "$methods"
    --skipped "$WHEELS/skipped.json")
if [[ $DRY == 1 ]]; then common+=(--dry-run); fi
# same attention for both: transformers' sdpa with its block mask (kftune's packed-attention lever off)
"$PY" bench/peers.py "${common[@]}" --tools kftune,trl --attn-implementation sdpa --levers-off packed_attention \
    --out "$OUT/same-attention"
# kftune with every lever (packed attention: one conversation at a time, or flash_attention_2 where installed)
"$PY" bench/peers.py "${common[@]}" --tools kftune --out "$OUT/levers-on"
say "done in $(($(date +%s) - started)) s; JSON in $OUT"
