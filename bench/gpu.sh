#!/usr/bin/env bash
# On a CUDA machine: the memory table and the throughput comparison for the Qwen2.5-0.5B shape in bf16,
# then one table of both. About 5 minutes on one modern GPU (budget: under 8).
#
#   make setup && bench/gpu.sh            # PY=... to use another interpreter; OUT=... for the results folder
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results}
BATCH=${BATCH:-4}
SEQ=${SEQ:-512}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')); run it on a GPU machine" >&2
    exit 2
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'
export TOKENIZERS_PARALLELISM=false
started=$(date +%s)

# peak memory of each method, one process each (torch.cuda.max_memory_allocated)
"$PY" bench/memory_table.py --batch "$BATCH" --seq "$SEQ" --steps 3 --precision bf16 --out "$OUT"
# kftune vs a plain Trainer + peft script, LoRA r=64, same model shape, data and steps
"$PY" bench/throughput.py --shape qwen2.5-0.5b --steps 30 --warmup 5 --precision bf16 --out "$OUT"
# kftune vs LLaMA-Factory vs trl sft (each tool's venv from bench/peers/*.txt: needs PyPI, whose torch 2.13.0
# is the CUDA build); peak = torch.cuda.max_memory_allocated in each tool's process
"$PY" bench/peers.py --shape qwen2.5-0.5b --steps 20 --out "$OUT"

"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
memory = json.loads((out / "memory_table-qwen2.5-0.5b-cuda.json").read_text())
speed = json.loads((out / "throughput-qwen2.5-0.5b-cuda.json").read_text())
print(f"\nQwen2.5-0.5B shape, bf16, {memory['machine']}, {memory['date']}")
print(f"memory: batch {memory['batch']} x {memory['seq']} tokens, torch.cuda.max_memory_allocated")
print(f"{'method':10s} {'peak GiB':>9s} {'guide GB':>9s} {'estimate':>9s} {'trainable':>12s} {'s/step':>7s} {'tokens/s':>9s}")
for r in memory["rows"]:
    if "error" in r:
        print(f"{r['label']:10s} failed: {r['error'].splitlines()[0][:80]}")
        continue
    print(f"{r['label']:10s} {r['peak_bytes'] / 2**30:9.2f} {memory['guide_gb'][r['label']]:>9} "
          f"{r['estimate_bytes'] / 2**30:9.2f} {r['trainable_params']:12,d} {r['seconds_per_step']:7.3f} {r['tokens_per_second']:9.0f}")
print(f"throughput: LoRA r=64, batch {speed['batch']}, max_seq_length {speed['max_seq_length']}, "
      f"bf16 matmul peak {speed['peak_gflops'] / 1000:.0f} TFLOP/s")
print(f"{'run':44s} {'real tok/s':>10s} {'vs baseline':>11s} {'MFU':>7s}")
for r in speed["runs"]:
    print(f"{r['run']:44s} {r['real_tokens_per_second']:10.0f} {r['ratio']:10.2f}x {r['mfu']:7.2%}")
PY
echo "bench/gpu.sh: done in $(( $(date +%s) - started )) s; JSON and PNG in $OUT"
