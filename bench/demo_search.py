"""Search for the embedded default's recipe: tiny model shape x synthetic data mix x training recipe.

Each variant builds its tiny Mllama and its synthetic dataset, trains an adapter with
``cotune/demo/demo.yaml`` plus the variant's overrides (no validation, to save time), then answers the
held-out questions with the true images and with images shuffled across samples, through the same
``evaluate_models`` that ``cotune eval --image_ablation`` and the demo use. One JSON line per variant.

Usage:
    python bench/demo_search.py VARIANTS.json OUT.jsonl [--jobs 4] [--threads 2] [--device cpu]

VARIANTS.json is a list of ``{"name", "model": {builder kwargs}, "data": {write_synthetic_dataset
kwargs}, "train": {option: value}, "n_eval": N}``. ``--jobs`` variants run at once, each with
``--threads`` torch threads (on a GPU machine all jobs share the GPU with ``--device cuda``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def run_variant(variant: dict, work: Path, device: str) -> dict:
    """Builds, trains and evaluates one variant; returns its figures."""

    from cotune.config import load_config
    from cotune.data.records import load_samples
    from cotune.demo.synthetic import write_synthetic_dataset
    from cotune.demo.tiny import build_tiny_mllama
    from cotune.eval.evaluate import evaluate_models
    from cotune.infer.adapters import AdapterSpec, load_model_with_adapters
    from cotune.run_demo import DEMO_CONFIG
    from cotune.train.loop import finetune

    t0 = time.perf_counter()
    model_opts = {k: tuple(v) if isinstance(v, list) else v for k, v in variant.get("model", {}).items()}
    data_opts = {k: tuple(v) if isinstance(v, list) else v for k, v in variant.get("data", {}).items()}
    model_dir = work / "models" / _key(variant.get("model", {}))
    if not (model_dir / "config.json").is_file():
        build_tiny_mllama(model_dir, seed=0, **model_opts)
    data_dir = work / "data" / _key([variant.get("model", {}), variant.get("data", {})])
    if not (data_dir / "test.jsonl").is_file():
        write_synthetic_dataset(data_dir, **data_opts)
    run_dir = work / "runs" / variant["name"]
    pairs = [
        ("model_name", str(model_dir)), ("dataset", str(data_dir / "train.jsonl")),
        ("data.test_file", str(data_dir / "test.jsonl")), ("output_dir", str(run_dir)),
        ("run_validation", "False"), ("progress", "False"), ("keep_last_checkpoints", "0"),
    ]  # fmt: skip
    pairs += [(k, str(v)) for k, v in variant.get("train", {}).items()]
    cfg = load_config(DEMO_CONFIG, pairs)
    result = finetune(cfg, log=lambda *_: None)
    t_train = time.perf_counter() - t0
    model, processor, family = load_model_with_adapters(
        str(model_dir), [AdapterSpec("v", str(result.adapter_dir))], device=device
    )
    samples, _ = load_samples(data_dir / "test.jsonl")
    results = evaluate_models(
        model, processor, family, samples[: variant.get("n_eval", 100)], ["v"], batch_size=25,
        max_new_tokens=200, log=lambda *_: None, image_conditions=("true", "shuffled"),
    )  # fmt: skip
    m = results["models"]["v"]

    def by_task(key: str) -> dict:
        return {t: round(c["correct"] / c["n"], 2) for t, c in m[key].items()}

    return {
        "name": variant["name"],
        "variant": variant,
        "steps": result.steps,
        "train_s": round(t_train, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "format_rate": m["format_rate"],
        "accuracy": m["accuracy"],
        "accuracy_shuffled_images": m["accuracy_shuffled_images"],
        "by_task": by_task("accuracy_by_task"),
        "by_task_shuffled": by_task("accuracy_by_task_shuffled_images"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants")
    ap.add_argument("out")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default="/tmp/cotune-demo-search")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # a worker: the name of its variant
    args = ap.parse_args()
    variants = json.loads(Path(args.variants).read_text())
    work = Path(args.work)
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        variant = next(v for v in variants if v["name"] == args.one)
        try:
            row = run_variant(variant, work / args.one, args.device)
        except Exception as e:  # one failed variant must not stop the search
            row = {"name": args.one, "variant": variant, "error": f"{type(e).__name__}: {e}"}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return 0
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    env.update(OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    pending, running = list(variants), []
    while pending or running:
        while pending and len(running) < args.jobs:
            v = pending.pop(0)
            cmd = [sys.executable, __file__, args.variants, args.out, "--one", v["name"],
                   "--threads", str(args.threads), "--device", args.device, "--work", args.work]  # fmt: skip
            running.append(subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL))
        time.sleep(1)
        running = [p for p in running if p.poll() is None]
    return 0


if __name__ == "__main__":
    sys.exit(main())
