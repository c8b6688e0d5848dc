#!/usr/bin/env bash
# The GPU check: `cotune train` itself on Llama-3.2-11B-Vision's real shapes, in under 10 minutes on one H100.
#
# 1. bench/gpu_fsdp.py prepare: a checkpoint with the 11B's shapes (random bf16 weights made on the GPU,
#    nothing downloaded), the real 560-px 4-tile processor settings, and synthetic 1120-px photos.
# 2. LoRA under FSDP over every visible GPU (torchrun), with validation, a resumable checkpoint and
#    cotune's FLOP counter.
# 3. QLoRA (4-bit base) on one GPU, the same way.
# Each run prints a RESULT line (tokens/s, MFU, peak memory, seconds to the first step) and writes
# $OUT/gpu_<run>.json. A run that fails, runs out of memory or past its time stops the script with a
# non-zero exit: nothing smaller is measured in its place.
#
# Usage:
#   bench/gpu.sh             # on a GPU machine; PYTHON=/path/to/python picks the interpreter
#   bench/gpu.sh --dry-run   # the whole script on CPU with tiny shapes (same commands, gloo, fp32)
# Needs: torch (CUDA build for the real run), transformers>=5, peft, bitsandbytes; no network.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the project's venv, else python3; on a GPU run the first that sees a GPU
  for candidate in .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null && { [ "$DRY" = 1 ] || has_cuda "$candidate"; }; then PY=$candidate; break; fi
  done
  PY=${PY:-python3}
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench_out}
mkdir -p "$OUT"

if [ "$DRY" = 1 ]; then
  WORK=${WORK:-$OUT/gpu_dry_run}
  export CUDA_VISIBLE_DEVICES=""  # CPU even where a GPU is
  TINY=--tiny; BATCH=2; LIMIT=300
else
  if ! has_cuda "$PY"; then
    echo "bench/gpu.sh: $PY has no CUDA GPU (torch.cuda.is_available() is False)." >&2
    echo "  Run it on a GPU machine, set PYTHON to an interpreter with CUDA torch, or use --dry-run." >&2
    exit 2
  fi
  WORK=${WORK:-${TMPDIR:-/tmp}/cotune_gpu_check}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  TINY=; BATCH=2; LIMIT=260
fi
# one line of versions, then the GPU count and the device's name (cpu on a dry run)
read -r NGPU DEVICE < <("$PY" -c '
import sys, torch, transformers, peft
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| peft", peft.__version__, file=sys.stderr)
n = torch.cuda.device_count()
print(max(n, 1), f"{n}x {torch.cuda.get_device_name(0)}" if n else "cpu")')
[ -n "${NGPU:-}" ] || { echo "bench/gpu.sh: $PY cannot import torch, transformers and peft" >&2; exit 2; }

STEPS=8  # micro-batches per run: FLOP counter at step 4, a checkpoint at step 4
RECORDS=$((STEPS * BATCH * NGPU))
"$PY" bench/gpu_fsdp.py prepare --work "$WORK" $TINY --records "$RECORDS"

common=(--model_name="$WORK/model" --dataset="$WORK/data/train.jsonl" --test_file="$WORK/data/test.jsonl"
  --batch_size_training="$BATCH" --num_epochs=1 --max_train_step="$STEPS" --lr=1e-4 --scheduler=constant
  --run_validation=True --max_eval_step=2 --save_every_steps=4 --keep_last_checkpoints=1
  --flop_counter=True --flop_counter_start=3 --progress=False --seed=0)
many=()
if [ "$NGPU" -gt 1 ]; then many=(--low_cpu_fsdp=True); fi  # one host copy of the base, not one per GPU

# LoRA, FSDP over every visible GPU
"$PY" bench/gpu_fsdp.py run fsdp_lora --work "$WORK" --out "$OUT" --device "$DEVICE" --timeout "$LIMIT" -- \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m cotune train "${common[@]}" \
  --enable_fsdp=True ${many[@]+"${many[@]}"} --output_dir="$WORK/runs/fsdp_lora" "$@"

# QLoRA on one GPU
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0} "$PY" bench/gpu_fsdp.py run qlora --work "$WORK" --out "$OUT" \
  --device "${DEVICE#*x }" --timeout "$LIMIT" -- "$PY" -m cotune train "${common[@]}" --quantization=4bit \
  --output_dir="$WORK/runs/qlora" "$@"

echo "figures: $OUT/gpu_fsdp_lora.json $OUT/gpu_qlora.json"
