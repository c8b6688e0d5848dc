"""cotune QLoRA vs cotune bf16 LoRA: peak memory on a model whose weights dominate it.

``make bench`` runs this file before ``train_bench.py``. It builds (once, cached under ``--work-dir``)
a random Mllama of about 1.3 B parameters stored in bf16: Llama 3.2 1B's text width (hidden 2048, MLP
8192, Llama 3's 128,256-token vocabulary, embeddings and head untied), 12 text layers of which 2
cross-attention, a small vision tower. Then it trains a few steps of each setting through cotune's own
training path (``cotune train``'s options, ``cotune.train.loop.setup`` + ``train``), each in its own
process, batch 1 x 128 tokens (one image per sample), gradient checkpointing on, LoRA with cotune's
defaults:

* bf16 LoRA: ``--torch_dtype bf16``;
* QLoRA: ``--torch_dtype bf16 --quantization 4bit`` (cotune's defaults: NF4, double quantization,
  compute in the base dtype bf16; the language model's linears quantized, embeddings, lm_head, vision
  tower and projector kept in bf16).

Memory is measured as ``train_bench.py`` measures it on CPU: the process's resident set. Each worker
records its resident set after its imports, its peak while loading (``VmHWM`` once model, LoRA and data
are ready), and, after resetting the peak mark (``/proc/self/clear_refs``), its peak during the
training steps. The process's peak is the larger of the two. ``cotune plan`` is asked about the same
options (``--plan_device cpu``, one image per sample) and its peak is compared with the measured peak
less the resident set after the imports (the interpreter and libraries, which the plan does not count).

On a CPU the resident set also holds file pages: transformers maps the safetensors file, the bf16
base's weights are views of it (paged in as the steps touch them; the input embedding's unused rows
never are), and the 4-bit load reads every quantized linear's bf16 pages, which stay mapped, unused,
for the whole run (clean page cache the kernel may drop; a GPU's memory never holds them). So the
last line gives, besides the process peaks, their ratio less the file-backed pages the load added:

    qlora_vs_lora_peak_memory_ratio=<QLoRA/LoRA> qlora_peak_gib=X lora_peak_gib=Y
    without_load_mapped_pages_ratio=<the same less those pages> plan_ratio=<cotune plan's>

Usage:
    python bench/qlora_memory.py [--work-dir DIR] [--layers 12] [--steps 3] [--seq-len 128] [--heap untuned]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIB = 2**30
SETTINGS = {"lora": [], "qlora": [("quantization", "4bit")]}  # on top of common_options()
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cotune" / "qlora-memory"


def status_bytes(key: str) -> int:
    """A line of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def build_model(work: Path, layers: int) -> Path:
    """The bf16 checkpoint, built once per shape (a marker file records the shape it was built for)."""
    from cotune.demo.tiny import build_tiny_mllama, is_current_build

    shape = {"hidden_size": 2048, "intermediate_size": 8192, "num_layers": layers, "vocab_size": 128256}
    shape["cross_attention_layers"] = [i for i in (3, 8, 13, 18) if i < layers]
    out, marker = work / "model", work / "model" / "bench_shape.json"
    if is_current_build(out) and marker.is_file() and json.loads(marker.read_text()) == shape:
        return out
    import torch

    t0 = time.perf_counter()
    build_tiny_mllama(
        out,
        seed=0,
        dtype=torch.bfloat16,
        image_size=112,
        **{**shape, "cross_attention_layers": tuple(shape["cross_attention_layers"])},
    )
    marker.write_text(json.dumps(shape))
    print(f"built {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def common_options(model_dir: Path, data: dict, out_dir: Path, steps: int, seq_len: int) -> list:
    """The flags a user would pass to ``cotune train`` (also given to ``cotune plan``)."""
    return [
        ("model_name", str(model_dir)),
        ("dataset", str(data["train"])),
        ("data.test_file", str(data["test"])),  # else a seeded split of the train file is held out
        ("output_dir", str(out_dir)),
        ("torch_dtype", "bf16"),
        ("gradient_checkpointing", "True"),
        ("batch_size_training", "1"),
        ("data.max_seq_len", str(seq_len)),
        ("max_train_step", str(steps)),
        ("num_epochs", "1"),
        ("run_validation", "False"),
        ("save_model", "False"),
        ("save_metrics", "False"),
        ("progress", "False"),
    ]


def worker(options_json: str, out_json: str) -> None:
    """One setting, in its own process: setup + train as ``cotune train`` runs them, measured."""
    import peft  # noqa: F401  (the libraries are in the baseline, as in any run)
    import torch
    import transformers.models.mllama.modeling_mllama  # noqa: F401

    import cotune.train.loop
    from cotune.config import load_options
    from cotune.train.loop import setup, train

    if os.environ.get("COTUNE_BENCH_HEAP") == "untuned":  # the resident set follows live tensors
        cotune.train.loop.tune_cpu_allocator = lambda: False

    imports_rss, imports_file = status_bytes("VmRSS"), status_bytes("RssFile")
    cfg = load_options("train", overrides=[tuple(o) for o in json.loads(options_json)]).options
    run = setup(cfg, log=lambda *a, **k: None)
    load_peak, loaded = status_bytes("VmHWM"), status_bytes("VmRSS")
    loaded_file = status_bytes("RssFile")  # pages of files mapped: the checkpoint's among them
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM: what follows is the training steps' peak
    t0 = time.perf_counter()
    result = train(run)
    out = {
        "imports_rss": imports_rss,
        "load_peak": load_peak,
        "loaded_rss": loaded,
        "train_peak": status_bytes("VmHWM"),
        "loaded_file_rss": loaded_file,
        "imports_file_rss": imports_file,
        "end_file_rss": status_bytes("RssFile"),
        "end_anon_rss": status_bytes("RssAnon"),
        "train_seconds": time.perf_counter() - t0,
        "losses": result.train_losses,
        "threads": torch.get_num_threads(),
    }
    out["peak"] = max(out["load_peak"], out["train_peak"])
    Path(out_json).write_text(json.dumps(out))


def planned(options: list) -> object:
    """``cotune plan`` for the same options on a CPU (one image per sample, as the data has)."""
    from cotune.config import load_options
    from cotune.plan import estimate

    cfg = load_options("plan", overrides=[*options, ("plan_device", "cpu")]).options
    return estimate(cfg, 24 * GIB, device="cpu", images_per_sample=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK), help="model and data are cached here")
    parser.add_argument("--layers", type=int, default=12, help="text layers (12: about 1.3 B parameters)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--heap",
        default="cotune",
        choices=["cotune", "untuned"],
        help="cotune: glibc tuned as cotune tunes it (the normal run); untuned: every allocation above 64 KiB "
        "mapped and unmapped on its own (tests/plan_probe.py's method), so the resident set follows live tensors",
    )
    parser.add_argument("--worker", nargs=2, metavar=("OPTIONS_JSON", "OUT_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)

    from train_bench import machine, write_bench_data

    start = time.perf_counter()
    work = Path(args.work_dir)
    model_dir = build_model(work, args.layers)
    data = write_bench_data(work / "data", model_dir, args.steps, args.seq_len)
    print(f"data: {args.steps} samples of {args.seq_len} tokens, one image each", flush=True)
    results, plans = {}, {}
    for name, extra in SETTINGS.items():
        options = common_options(model_dir, data, work / f"run-{name}", args.steps, args.seq_len) + extra
        out = work / f"{name}.json"
        t0 = time.perf_counter()
        untuned = {"MALLOC_MMAP_THRESHOLD_": "65536", "COTUNE_BENCH_HEAP": "untuned"}
        env = {**os.environ, **(untuned if args.heap == "untuned" else {})}
        cmd = [sys.executable, __file__, "--worker", json.dumps(options), str(out)]
        subprocess.run(cmd, check=True, env=env)
        results[name] = json.loads(out.read_text())
        results[name]["wall"] = time.perf_counter() - t0
        plans[name] = planned(options)
        print(f"{name}: {results[name]['wall']:.0f} s", flush=True)
    report(results, plans, model_dir)
    print(
        f"machine: {machine()}, bitsandbytes {version('bitsandbytes')}; total {time.perf_counter() - start:.0f} s"
    )
    print(ratio_line(results, plans))


def unmapped_peak(r: dict) -> int:
    """The peak less the checkpoint pages the load left mapped (file-backed RSS it added, never read again)."""
    return r["peak"] - (r["loaded_file_rss"] - r["imports_file_rss"])


def ratio_line(results: dict, plans: dict) -> str:
    """The last line: QLoRA / bf16 LoRA process peak RSS, the peaks, the same without the checkpoint
    pages the load left mapped, and the plan's ratio."""
    lora, qlora = results["lora"], results["qlora"]
    return (
        f"qlora_vs_lora_peak_memory_ratio={qlora['peak'] / lora['peak']:.3f} "
        f"qlora_peak_gib={qlora['peak'] / GIB:.2f} lora_peak_gib={lora['peak'] / GIB:.2f} "
        f"without_load_mapped_pages_ratio={unmapped_peak(qlora) / unmapped_peak(lora):.3f} "
        f"plan_ratio={plans['qlora'].peak / plans['lora'].peak:.3f}"
    )


def report(results: dict, plans: dict, model_dir: Path) -> None:
    """The measured memory beside the plan's, per setting."""
    from transformers import AutoConfig

    from cotune.plan import _meta_model

    n = sum(p.numel() for p in _meta_model(AutoConfig.from_pretrained(str(model_dir))).parameters())
    print(f"\nmodel: {n / 1e9:.2f} B parameters; GiB{'':22s} {'bf16 LoRA':>10s} {'QLoRA':>10s}")
    rows = [
        ("RSS after imports", lambda r, p: r["imports_rss"]),
        ("peak RSS while loading", lambda r, p: r["load_peak"]),
        ("RSS after load", lambda r, p: r["loaded_rss"]),
        ("peak RSS while training", lambda r, p: r["train_peak"]),
        ("process peak RSS", lambda r, p: r["peak"]),
        ("file-backed RSS after imports", lambda r, p: r["imports_file_rss"]),
        ("file-backed RSS after load", lambda r, p: r["loaded_file_rss"]),
        ("file-backed RSS at the end", lambda r, p: r["end_file_rss"]),
        ("anonymous RSS at the end", lambda r, p: r["end_anon_rss"]),
        ("peak less the load's mapped pages", lambda r, p: unmapped_peak(r)),
        ("measured: peak - after imports", lambda r, p: r["peak"] - r["imports_rss"]),
        ("plan: weights", lambda r, p: p.parts["weights"]),
        ("measured: after load - imports", lambda r, p: r["loaded_rss"] - r["imports_rss"]),
        ("plan: step (peak - weights)", lambda r, p: p.step_bytes),
        ("measured: train peak - after load", lambda r, p: r["train_peak"] - r["loaded_rss"]),
        ("plan: peak", lambda r, p: p.peak),
    ]
    for label, get in rows:
        values = [get(results[s], plans[s]) / GIB for s in ("lora", "qlora")]
        print(f"{label:36s} {values[0]:>10.2f} {values[1]:>10.2f}")
    for s in ("lora", "qlora"):
        r, p = results[s], plans[s]
        measured, unmapped = r["peak"] - r["imports_rss"], unmapped_peak(r) - r["imports_rss"]
        print(
            f"{s}: plan peak {p.peak / GIB:.2f} GiB vs measured (peak - after imports) {measured / GIB:.2f} GiB "
            f"(plan {100 * (p.peak / measured - 1):+.1f}%), less the load's mapped pages {unmapped / GIB:.2f} GiB "
            f"(plan {100 * (p.peak / unmapped - 1):+.1f}%); losses {' '.join(f'{x:.4f}' for x in r['losses'])}; "
            f"training {r['train_seconds']:.0f} s"
        )


if __name__ == "__main__":
    main()
