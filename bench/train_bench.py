"""Training benchmark: cotune vs transformers.Trainer + PEFT on a bench-sized random Mllama.

``make bench`` runs this file. It builds a random Mllama with Llama 3's 128,256-token vocabulary
(text hidden 256, 4 text layers of which one cross-attention, a 2-layer vision tower) and a
synthetic LLaVA-CoT-style dataset whose samples render to exactly ``--seq-len`` tokens (one image,
a long question, a long four-stage reply; labels only on the reply, as cotune renders them). Then it
trains LoRA (r=8 on every text layer's attention q/k/v/o) for a few steps twice, each side in its
own process so that peak memory is that side's alone:

* cotune: its recipe, ``cotune.train.loop.setup`` + ``train`` (chunked loss, no full logits);
* hf: ``transformers.Trainer`` with the PEFT model (full logits, HF's loss), fed the same batches
  in the same order by cotune's data step and collator.

It prints tokens/s (non-pad input tokens per second over the steps after warm-up) and peak memory
(CPU: peak RSS of the process; GPU: ``torch.cuda.max_memory_allocated``) of each side, and ends with
the line ``throughput_ratio=<cotune/hf> memory_ratio=<cotune/hf>``.

Before that, the same two sides train QLoRA (``BenchSpec.quantization='4bit'``: the same bitsandbytes
NF4 base on both, the language model's linears quantized) and print their table and the line
``qlora_throughput_ratio=<cotune/hf> qlora_memory_ratio=<cotune/hf>`` (``--no-qlora`` skips them).

Usage:
    python bench/train_bench.py [--seq-len 1024] [--batch-size 2] [--warmup-steps 2] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _workers import BenchSpec, write_spec  # noqa: E402

_WORDS = (
    "the image shows a red circle and a blue square near the left edge while a green triangle sits at "
    "the top right corner of the picture each shape has a colour and a position so we count them one "
    "by one and compare their sizes before we decide which answer is correct given the question"
).split()
_STAGES = ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION")


def build_bench_model(out_dir: Path, hidden_size: int = 256, num_layers: int = 4, seed: int = 0) -> Path:
    """A random Mllama with Llama 3's vocabulary: ``num_layers`` text layers, layer 1 cross-attention."""
    from cotune.demo.tiny import build_tiny_mllama

    return build_tiny_mllama(
        out_dir,
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        cross_attention_layers=(1,),
        vocab_size=128256,
        image_size=112,
    )


def _image(path: Path, rng: random.Random) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 224), tuple(rng.randrange(200, 256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.randrange(0, 180), rng.randrange(0, 180)
        draw.ellipse((x, y, x + 40, y + 40), fill=tuple(rng.randrange(0, 256) for _ in range(3)))
    image.save(path)


def _record(k: int, n_words: int, rng: random.Random) -> dict:
    """A long question (about 40% of the words) and a long four-stage reply (the rest)."""
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    cut = (2 * n_words) // 5
    question = "<image>\n" + " ".join(words[:cut]).capitalize() + "?"
    body = words[cut:]
    quarter = max(1, len(body) // 4)
    parts = [" ".join(body[i * quarter : (i + 1) * quarter if i < 3 else None]) for i in range(4)]
    reply = " ".join(f"<{s}> {p}. </{s}>" for s, p in zip(_STAGES, parts))
    return {
        "id": f"bench-{k}",
        "image": f"images/{k}.png",
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}],
    }


def _length(record: dict, processor: Any, root: Path) -> int:
    from cotune.data.chat import tokenize_conversation
    from cotune.data.formats import parse_llava_record

    sample = parse_llava_record(record, "bench", root)
    return len(tokenize_conversation(processor, sample.messages)[0])


def _fit(k: int, seq_len: int, processor: Any, root: Path, seed: int) -> dict:
    """A record that renders to exactly ``seq_len`` tokens: the most words that fit, then ' a' fillers.

    The word count is searched on the plain tokenized texts plus the template's overhead (fast); the
    chat-template rendering, as cotune trains on it, then decides the exact length.
    """

    def record(n_words: int) -> dict:
        return _record(k, n_words, random.Random(seed * 100_003 + k))

    def text_tokens(rec: dict) -> int:
        texts = [turn["value"] for turn in rec["conversations"]]
        return sum(len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"])

    overhead = _length(record(8), processor, root) - text_tokens(record(8))
    lo, hi = 1, seq_len
    while lo < hi:  # the largest word count whose estimated length fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if overhead + text_tokens(record(mid)) <= seq_len else (lo, mid - 1)
    rec, n = record(lo), _length(record(lo), processor, root)
    while n > seq_len and lo > 1:
        lo -= 1
        rec, n = record(lo), _length(record(lo), processor, root)
    reply = rec["conversations"][1]
    for _ in range(4):  # each " a" is one token; a few rounds settle any merge at the boundary
        if n >= seq_len:
            break
        reply["value"] = reply["value"].replace(" </CONCLUSION>", " a" * (seq_len - n) + " </CONCLUSION>", 1)
        n = _length(rec, processor, root)
    return rec


def write_bench_data(
    out_dir: Path, model_dir: Path, n_train: int, seq_len: int, seed: int = 0, processor: Any = None
) -> dict:
    """Writes ``n_train`` + 2 samples of ``seq_len`` tokens (train.jsonl, test.jsonl, images/)."""
    from cotune.models.load import load_processor

    processor = processor or load_processor(model_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for k in range(n_train + 2):
        _image(out_dir / "images" / f"{k}.png", rng)
        records.append(_fit(k, seq_len, processor, out_dir, seed))
    paths = {"train": out_dir / "train.jsonl", "test": out_dir / "test.jsonl"}
    for name, recs in (("train", records[:n_train]), ("test", records[n_train:])):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs))
    paths["lengths"] = [_length(r, processor, out_dir) for r in records[:n_train]]
    if max(paths["lengths"]) > seq_len:  # cotune would drop it (max_seq_len) and the sides would differ
        raise RuntimeError(f"a bench sample renders to {max(paths['lengths'])} > {seq_len} tokens")
    return paths


def prepare(
    work_dir: Path, args: argparse.Namespace, model_dir: Path | None = None, processor: Any = None
) -> BenchSpec:
    """Builds the model (unless ``model_dir`` is given) and data in ``work_dir``; returns the spec."""
    if model_dir is None:
        model_dir = build_bench_model(work_dir / "model", args.hidden_size, args.num_layers)
    n_train = args.batch_size * (args.warmup_steps + args.steps)
    data = write_bench_data(work_dir / "data", model_dir, n_train, args.seq_len, processor=processor)
    print(f"data: {n_train} samples of {min(data['lengths'])}-{max(data['lengths'])} tokens, one image each")
    return BenchSpec(
        model_dir=str(model_dir),
        train_file=str(data["train"]),
        test_file=str(data["test"]),
        work_dir=str(work_dir),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        warmup_steps=args.warmup_steps,
        measured_steps=args.steps,
        allocator=getattr(args, "allocator", "cotune"),
    )


def run_side(side: str, spec: BenchSpec, in_process: bool = False) -> dict:
    """Trains one side, in a fresh Python process unless ``in_process`` (tests)."""
    work = Path(spec.work_dir)
    if in_process:
        from _workers import SIDES

        return SIDES[side](spec)
    spec_path = write_spec(spec, work / "spec.json")
    out = work / f"{side}{'-' + spec.quantization if spec.quantization else ''}.json"
    subprocess.run([sys.executable, str(HERE / "_workers.py"), side, str(spec_path), str(out)], check=True)
    return json.loads(out.read_text())


def memory_mb(result: dict) -> float:
    """The peak memory compared: CUDA max allocated on GPU, whole-process peak RSS on CPU."""
    return result.get("peak_cuda_mb", result["peak_rss_mb"])


ALLOCATOR = {
    "cotune": "cotune's process only, as each runs by itself",
    "both": "both processes",
    "neither": "neither process",
}


def machine() -> str:
    """CPU model, core count and library versions, for the record."""
    import peft
    import torch
    import transformers

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}"
    )


def report(results: dict[str, dict]) -> tuple[float, float]:
    """Prints the table; returns (throughput_ratio, memory_ratio), cotune / hf."""
    c, h = results["cotune"], results["hf"]
    rows = [
        ("tokens/s (non-pad, after warm-up)", "{:.1f}", "tokens_per_s"),
        ("tokens per CPU-second", "{:.1f}", "tokens_per_cpu_s"),
        ("measured steps", "{}", "measured_steps"),
        ("measured tokens", "{}", "measured_tokens"),
        ("measured seconds", "{:.2f}", "measured_seconds"),
        ("RSS after load, MiB", "{:.0f}", "loaded_rss_mb"),
        ("peak RSS, MiB", "{:.0f}", "peak_rss_mb"),
    ]
    if "peak_cuda_mb" in c:
        rows.append(("peak CUDA allocated, MiB", "{:.0f}", "peak_cuda_mb"))
    print(f"\n{'':36s} {'cotune':>12s} {'hf+peft':>12s}")
    for label, fmt, key in rows:
        print(f"{label:36s} {fmt.format(c[key]):>12s} {fmt.format(h[key]):>12s}")
    grow_c, grow_h = c["peak_rss_mb"] - c["loaded_rss_mb"], h["peak_rss_mb"] - h["loaded_rss_mb"]
    print(f"{'peak RSS - RSS after load, MiB':36s} {grow_c:>12.0f} {grow_h:>12.0f}")
    print(f"{'load average during the side':36s} {c['load_avg']:>12.2f} {h['load_avg']:>12.2f}")
    print(f"{'first-step loss':36s} {c['losses'][0]:>12.5f} {h['losses'][0]:>12.5f}")
    print(f"{'last-step loss':36s} {c['losses'][-1]:>12.5f} {h['losses'][-1]:>12.5f}")
    for side, r in (("cotune", c), ("hf", h)):  # the measured steps' durations
        times = r["step_seconds"][-r["measured_steps"] :]
        print(f"step seconds, {side:22s} " + " ".join(f"{t:.2f}" for t in times))
    print(f"machine: {machine()}; {c['threads']} torch threads; device {c['device']}")
    print(f"glibc allocator tuning (cotune.runtime): {ALLOCATOR[c.get('allocator', 'cotune')]}")
    what = (
        "peak CUDA memory allocated" if "peak_cuda_mb" in c else "whole-process peak RSS (nothing subtracted)"
    )
    print(f"memory_ratio compares {what}; (peak - after-load) ratio: {grow_c / max(grow_h, 1e-9):.3f}")
    first_c, first_h = c["losses"][0], h["losses"][0]
    if abs(first_c - first_h) > 1e-3 * abs(first_h):
        print(
            f"WARNING: first-step losses differ ({first_c} vs {first_h}): the sides did not train the same thing"
        )
    return c["tokens_per_s"] / h["tokens_per_s"], memory_mb(c) / memory_mb(h)


def ratio_line(throughput: float, memory: float, prefix: str = "") -> str:
    """The benchmark's last line (``prefix`` 'qlora_': the QLoRA line before it)."""
    return f"{prefix}throughput_ratio={throughput:.3f} {prefix}memory_ratio={memory:.3f}"


def run_bench(spec: BenchSpec, sides: list[str], in_process: bool = False) -> dict[str, dict]:
    """Runs each side in turn; adds the 1-minute load average seen during each side."""
    results = {}
    for side in sides:
        t0 = time.perf_counter()
        results[side] = run_side(side, spec, in_process)
        results[side]["load_avg"] = os.getloadavg()[0]
        results[side]["allocator"] = spec.allocator
        print(
            f"{side}: {results[side]['tokens_per_s']:.1f} tokens/s ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="measured steps after warm-up")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--sides", default="cotune,hf", help="order in which the sides run")
    parser.add_argument("--work-dir", default="", help="keep model, data and results here")
    parser.add_argument(
        "--allocator",
        default="cotune",
        choices=["cotune", "both", "neither"],
        help="glibc tuning of cotune's setup (CPU): only cotune's process (as run normally), both, neither",
    )
    parser.add_argument("--no-qlora", action="store_true", help="skip the QLoRA sides (4-bit base)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cotune-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec = prepare(work, args)
        print(f"prepared model and data in {time.perf_counter() - start:.0f} s", flush=True)
        results = run_bench(spec, args.sides.split(","))
        qlora = {} if args.no_qlora else run_bench(replace(spec, quantization="4bit"), args.sides.split(","))
    if not {"cotune", "hf"} <= set(results):
        print(json.dumps(results, indent=1))
        return
    if qlora:
        print("\nQLoRA: the same sides on the same bitsandbytes 4-bit (NF4) base")
        print(ratio_line(*report(qlora), prefix="qlora_"))
        print("\nLoRA: the base as it is")
    throughput, memory = report(results)
    print(f"total {time.perf_counter() - start:.0f} s")
    print(ratio_line(throughput, memory))


if __name__ == "__main__":
    main()
