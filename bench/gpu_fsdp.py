"""The Python side of ``bench/gpu.sh``: a checkpoint with Llama-3.2-11B-Vision's real shapes, its
data, and the figures of the ``cotune train`` runs the script launches.

``prepare`` writes, under ``--work``:

* ``model/``: a Mllama checkpoint with the 11B's shapes (10.67B parameters: 40 text layers, 8 of
  them cross-attention, a 32+8-layer vision tower, 128,256-token vocabulary), random bf16 weights
  made on the GPU (nothing downloaded), and a processor with the real image settings (560-px tiles,
  up to 4 per picture) and the Llama 3 special-token ids (cotune's tiny tokenizer, same ids);
* ``data/``: synthetic photos (1120 x 1120: four 560-px tiles each) with LLaVA-CoT replies.

``--tiny`` writes the same with small shapes (4 text layers, 32-px tiles) for ``gpu.sh --dry-run``.

``run NAME -- COMMAND...`` runs COMMAND (a ``cotune train``, under torchrun or not) with a time limit,
then reads its ``metrics.jsonl`` and prints one ``RESULT`` line: tokens/s (median step), MFU (cotune's
FLOP counter, over the card's dense bf16 peak), peak GPU memory (``torch.cuda.max_memory_allocated``
of the first process) and seconds from launch to the first optimizer step. A command that fails, runs
out of memory or past its time makes ``run`` exit non-zero: nothing is measured in its place.

Usage:
    python bench/gpu_fsdp.py prepare --work DIR [--tiny] [--records N]
    python bench/gpu_fsdp.py run NAME --work DIR --timeout S -- COMMAND...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Llama-3.2-11B-Vision(-Instruct) config.json, the fields that set shapes
TEXT_11B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_hidden_layers=40,
    cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)
VISION_11B = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_global_layers=8,
    attention_heads=16,
    image_size=560,
    patch_size=14,
    max_num_tiles=4,
    vision_output_dim=7680,
    intermediate_layers_indices=[3, 7, 15, 23, 30],
    norm_eps=1e-5,
)
# --tiny: the same structure, small (the vocabulary stays: the tokenizer's ids are Llama 3's)
TEXT_TINY = dict(
    TEXT_11B, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    num_hidden_layers=4, cross_attention_layers=[2], rope_scaling=None,
)  # fmt: skip
VISION_TINY = dict(
    VISION_11B, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
    attention_heads=4, image_size=32, patch_size=8, vision_output_dim=96, intermediate_layers_indices=[0, 1],
)  # fmt: skip


def build_config(tiny: bool):
    """The 11B's ``MllamaConfig`` (or its ``--tiny`` stand-in) with the tokenizer's special ids."""
    from transformers import MllamaConfig, MllamaTextConfig, MllamaVisionConfig

    from cotune.demo.tiny import BOS_ID, EOS_IDS, IMAGE_ID, PAD_ID

    text, vision = (TEXT_TINY, VISION_TINY) if tiny else (TEXT_11B, VISION_11B)
    return MllamaConfig(
        vision_config=MllamaVisionConfig(**vision),
        text_config=MllamaTextConfig(**text, bos_token_id=BOS_ID, eos_token_id=EOS_IDS, pad_token_id=PAD_ID),
        image_token_index=IMAGE_ID,
    )


def write_checkpoint(out: Path, tiny: bool) -> dict:
    """Random bf16 weights made on the GPU (CPU without one), saved with the real processor settings."""
    import torch
    from transformers import MllamaForConditionalGeneration

    from cotune.demo.tiny import BUILD_MARKER, build_tiny_mllama

    config = build_config(tiny)
    tile = config.vision_config.image_size
    build_tiny_mllama(out, seed=0, image_size=tile)  # the processor: tokenizer, template, tile size
    for stale in [out / "config.json", out / BUILD_MARKER, *out.glob("model*.safetensors*")]:
        stale.unlink()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = MllamaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    built = time.perf_counter() - start
    model.save_pretrained(str(out), max_shard_size="5GB")
    params = sum(p.numel() for p in model.parameters())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "parameters": params,
        "build_s": round(built, 1),
        "write_s": round(time.perf_counter() - start - built, 1),
    }


def prepare(args: argparse.Namespace) -> None:
    from cotune.demo.synthetic import write_synthetic_dataset

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    made = write_checkpoint(work / "model", args.tiny)
    tile = VISION_TINY["image_size"] if args.tiny else VISION_11B["image_size"]
    write_synthetic_dataset(
        work / "data", n_train=args.records, n_test=max(4, args.records // 4), image_size=2 * tile
    )
    print(
        f"prepared {work}: {made['parameters'] / 1e9:.2f}B parameters (built in {made['build_s']} s, written in "
        f"{made['write_s']} s), {args.records} training photos of {2 * tile} px ({tile}-px tiles)",
        flush=True,
    )


def first_step_seconds(metrics: Path, proc: subprocess.Popen, start: float, timeout: float) -> float | None:
    """Seconds from ``start`` until ``metrics`` holds a training step (None if the command ended first)."""
    while proc.poll() is None and time.perf_counter() - start < timeout:
        if metrics.is_file() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            return time.perf_counter() - start
        time.sleep(0.2)
    return None


def figures(metrics: Path) -> dict:
    """tokens/s (median of the steps after the first), MFU, peak memory, steps and losses."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    rates = [r["tokens_per_s"] for r in steps[1:]] or [r["tokens_per_s"] for r in steps]
    flops = next((r for r in rows if "tflop_per_step" in r), {})
    memory = [r["max_memory_gib"] for r in rows if "max_memory_gib" in r]
    return {
        "steps": len(steps),
        "tokens_per_s": round(statistics.median(rates), 1) if rates else None,
        "mfu": flops.get("mfu"),
        "tflops_per_s_per_process": flops.get("tflops_per_s"),
        "peak_memory_gib": max(memory) if memory else None,
        "losses": [round(r["loss"], 4) for r in steps],
        "eval_losses": [round(r["eval_loss"], 4) for r in rows if "eval_loss" in r],
    }


def run(args: argparse.Namespace) -> int:
    """Runs the command with its time limit; prints and writes its figures; non-zero when it failed."""
    command = args.command
    out_dir = Path(next(a.split("=", 1)[1] for a in command if a.startswith("--output_dir=")))
    log = Path(args.work) / f"{args.name}.log"
    start = time.perf_counter()
    with open(log, "w") as sink:
        # a session of its own: on time-out torchrun's workers go too, and free the GPUs
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        first = first_step_seconds(out_dir / "metrics.jsonl", proc, start, args.timeout)
        try:
            code = proc.wait(timeout=max(1.0, args.timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = 124
    tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
    if code != 0:
        why = f"ran past {args.timeout:.0f} s" if code == 124 else f"exited {code}"
        print(f"{tail}\nFAILED {args.name}: {' '.join(command[:6])} ... {why} (log: {log})", file=sys.stderr)
        return code or 1
    found = figures(out_dir / "metrics.jsonl")
    result = {
        "name": args.name,
        "device": args.device,
        "seconds_to_first_step": round(first or -1, 1),
        **found,
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    if not found["steps"] or not found["eval_losses"] or not (out_dir / "checkpoints").is_dir():
        print(f"{tail}\nFAILED {args.name}: no step, validation or checkpoint in {out_dir}", file=sys.stderr)
        return 1
    (Path(args.out) / f"gpu_{args.name}.json").write_text(json.dumps(result, indent=1))
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
    print(
        f"RESULT {args.name} device={result['device']}: tokens/s={result['tokens_per_s']} MFU={mfu} "
        f"peak_memory_GiB={result['peak_memory_gib']} first_step_s={result['seconds_to_first_step']} "
        f"steps={result['steps']} total_s={result['seconds']}",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    prep = sub.add_parser("prepare", help="the 11B-shaped checkpoint and synthetic photos")
    prep.add_argument("--work", required=True)
    prep.add_argument("--tiny", action="store_true", help="small shapes, for gpu.sh --dry-run on CPU")
    prep.add_argument("--records", type=int, default=32, help="training photos (default 32)")
    go = sub.add_parser("run", help="run a cotune train command and report its figures")
    go.add_argument("name")
    go.add_argument("--work", required=True)
    go.add_argument("--out", default="bench_out")
    go.add_argument("--timeout", type=float, default=300.0)
    go.add_argument("--device", default="", help="the card(s), as recorded with the figures")
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: len(argv) - len(command) - (1 if command else 0)])
    args.command = command
    if args.verb == "prepare":
        prepare(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
