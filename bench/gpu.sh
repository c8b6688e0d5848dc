#!/usr/bin/env bash
# One-GPU FSDP2 check, ready to run on an H100/H200 in under 10 minutes (see BENCHMARKS.md).
#
# Trains LoRA for a few steps on a random Mllama with Llama-3.2-11B-Vision's real shapes (all 40 text
# layers, 8 of them cross-attention, and the 32+8-layer vision tower), sharded by cotune's FSDP2 wrap
# policy on one rank, bf16 compute with fp32 LoRA weights and gradient reduction, activation
# checkpointing per layer. Prints tokens/s, peak GPU memory and MFU; writes them as JSON to $OUT.
# If the full model fails (or runs past its time) it measures an 8-layer slice instead.
#
# Usage:
#   bench/gpu.sh                 # on a GPU machine; PYTHON=/path/to/python to pick the interpreter
#   bench/gpu.sh --dry-run       # tiny shapes on CPU: checks everything but the GPU
#   bench/gpu.sh --count-only    # parameters and FLOPs of the real shapes, nothing allocated
# Needs: a CUDA build of torch, transformers>=5, peft (the project's dependencies); no network.
set -euo pipefail
cd "$(dirname "$0")/.."

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the first interpreter that sees a GPU: the project's venv, then python3
  for candidate in .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null && has_cuda "$candidate"; then PY=$candidate; break; fi
  done
  if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
  fi
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench_out}
mkdir -p "$OUT"

case "${1:-}" in
  --dry-run) shift; exec "$PY" bench/gpu_fsdp.py --tiny --json "$OUT/gpu_fsdp_tiny.json" "$@" ;;
  --count-only) shift; exec "$PY" bench/gpu_fsdp.py --count-only "$@" ;;
esac

if ! has_cuda "$PY"; then
  echo "bench/gpu.sh: $PY has no CUDA GPU (torch.cuda.is_available() is False)." >&2
  echo "  Run it on a GPU machine, set PYTHON to an interpreter with CUDA torch, or use --dry-run." >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| peft", peft.__version__)'

# 11B: build ~1 min, ~0.5-2 s per step; 7 min is ample. The slice is the fallback.
if timeout 420 "$PY" bench/gpu_fsdp.py --json "$OUT/gpu_fsdp_11b.json" "$@"; then
  echo "figures: $OUT/gpu_fsdp_11b.json"
else
  echo "bench/gpu.sh: the full-size run failed or timed out; measuring an 8-layer slice (2 cross-attention) + 4+1 vision layers" >&2
  timeout 150 "$PY" bench/gpu_fsdp.py --text-layers 8 --vision-layers 4 --global-layers 1 \
    --json "$OUT/gpu_fsdp_slice.json" "$@"
  echo "figures: $OUT/gpu_fsdp_slice.json"
fi
