"""Data-scale benchmark: how long until the first optimizer step on a LLaVA-CoT-100k-sized set?

Writes N LLaVA-CoT JSONL records (99% training, 1% test), each with its own 640x480 JPEG and a
four-stage reply of about 250 tokens, and a tiny random Mllama; then runs ``cotune train`` (one
optimizer step, ``data.image_check header``) in 1 process and in 2 (torchrun, gloo), each first
with an empty data cache (cold) and again with the cache it left (warm), and prints per run:

* seconds from launch to the end of the first optimizer step (model load, data preparation, the
  bounded validation at step 0 and the step itself);
* peak resident memory per process, and how much of it the data step added;
* the share of the preparation (records, seconds) each process did, and the worker processes a
  process spread its share over (``data.prepare_workers``: one per CPU it has to itself).

With ``--before`` it also runs the same without the cache (``data.cache false``: every process
reads, checks and tokenizes everything into Python lists) and without validation, the road the
issue measured. Then it times the full image check (``data.image_check decode``) over the
training records (``--decode_n`` of them, scaled to all when fewer).

Usage:
    python bench/data_scale.py [--n 100000] [--procs 1 2] [--before] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # the figures, not progress bars, in make bench's output

WORDS = (
    "the a red blue green circle square triangle shape image shows left right top bottom large small "
    "two three one count colour of in on near above below and with is are there question answer so "
    "therefore because each picture region object background light dark edge corner centre"
).split()
TARGETS = {"cold": 120.0, "warm": 30.0, "data_gib": 2.0}


# ----------------------------------------------------------------------------- the data


def _write_images(args: tuple[Path, int, int]) -> None:
    from PIL import Image, ImageDraw

    root, lo, hi = args
    for k in range(lo, hi):
        rng = random.Random(k)
        path = root / f"{k // 1000:03d}" / f"{k:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y, r = rng.randrange(640), rng.randrange(480), rng.randrange(20, 120)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(path, quality=85)


def _reply(rng: random.Random) -> str:
    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    return (
        f"<SUMMARY>{words(25)}.</SUMMARY>\n\n<CAPTION>{words(40)}.</CAPTION>\n\n"
        f"<REASONING>{words(90)}.</REASONING>\n\n<CONCLUSION>{words(8)}.</CONCLUSION>"
    )


def write_dataset(root: Path, n: int) -> tuple[Path, Path]:
    """N records with N distinct JPEGs under ``root`` (kept for the next run of the same N)."""
    train, test = root / "train.jsonl", root / "test.jsonl"
    marker = root / "done.json"
    if marker.exists() and json.loads(marker.read_text()).get("n") == n:
        return train, test
    start = time.perf_counter()
    chunks = [(root / "images", lo, min(n, lo + 1000)) for lo in range(0, n, 1000)]
    with Pool(os.cpu_count() or 2) as pool:
        pool.map(_write_images, chunks)
    n_test = max(1, n // 100)
    with open(train, "w") as tr, open(test, "w") as te:
        for k in range(n):
            rng = random.Random(10_000_019 + k)
            record = {
                "id": f"r{k}",
                "image": f"images/{k // 1000:03d}/{k:06d}.jpg",
                "conversations": [
                    {"from": "human", "value": f"<image>\nHow many {rng.choice(WORDS)} shapes are there?"},
                    {"from": "gpt", "value": _reply(rng)},
                ],
            }
            (te if k < n_test else tr).write(json.dumps(record) + "\n")
    marker.write_text(json.dumps({"n": n}))
    print(f"wrote {n} records and JPEGs in {time.perf_counter() - start:.0f} s under {root}", flush=True)
    return train, test


# ----------------------------------------------------------------------------- one rank (under torchrun)


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rss_gib() -> tuple[float, float]:
    """(resident, resident private) memory of this process now, GiB: memory-mapped cache pages
    count in the first only (they are the page cache, shared by every process)."""
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    kib = {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon")}
    return kib["VmRSS"] / 2**20, kib["RssAnon"] / 2**20


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (the workers that prepared data)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _workers_peak_gib() -> float:
    """The peak resident memory of the largest finished child (a data preparation worker), GiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def rank_main(argv: list[str]) -> None:
    """One training process: one optimizer step; writes its timings and memory to $BENCH_OUT."""
    from cotune.config import load_config
    from cotune.train import loop

    t0, rank = float(os.environ["BENCH_T0"]), int(os.environ.get("RANK", "0"))
    record: dict = {"rank": rank, "imported_s": time.time() - t0}
    real_step, real_data = loop.train_step, loop.build_training_data

    def train_step(run, state, group):
        stats = real_step(run, state, group)
        if "first_step_s" not in record:
            record["first_step_s"], record["first_step_cpu_s"] = time.time() - t0, _cpu_s()
        return stats

    def build_training_data(*args, **kwargs):
        before, start, cpu = _rss_gib(), time.time(), _cpu_s()
        record["model_s"] = start - t0
        out = real_data(*args, **kwargs)
        after = _rss_gib()
        record["data_s"], record["data_rss_gib"], record["data_anon_gib"] = (
            time.time() - start,
            after[0] - before[0],
            after[1] - before[1],
        )
        record["data_peak_gib"], record["data_cpu_s"] = _peak_gib(), _cpu_s() - cpu
        record["data_peak_extra_gib"] = max(0.0, record["data_peak_gib"] - before[0])  # over what it held
        return out

    loop.train_step, loop.build_training_data = train_step, build_training_data
    cfg = load_config(None, [tuple(a.split("=", 1)) for a in argv])
    loop.finetune(cfg, log=print if rank == 0 else (lambda s: None))
    record["peak_gib"], record["workers_peak_gib"] = _peak_gib(), _workers_peak_gib()
    Path(os.environ["BENCH_OUT"], f"rank{rank}.json").write_text(json.dumps(record))


# ----------------------------------------------------------------------------- the runs


def run_training(workdir: Path, model: Path, train: Path, test: Path, procs: int, cache: Path | None) -> dict:
    """One ``cotune train`` of one step in ``procs`` processes; what each rank recorded."""
    out = workdir / f"out-{procs}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    options = [
        f"model_name={model}", f"dataset={train}", f"data.test_file={test}", "data.image_check=header",
        f"output_dir={out / 'run'}", "batch_size_training=2", "max_train_step=1", "num_epochs=1",
        "save_model=False", "keep_last_checkpoints=0", "progress=False", "data.max_seq_len=1024",
    ]  # fmt: skip
    options += [f"data.cache_dir={cache}"] if cache else ["data.cache=False", "run_validation=False"]
    script = [str(Path(__file__).resolve()), "--_rank", *options]
    if procs == 1:
        cmd = [sys.executable, *script]
    else:
        port = str(29500 + random.randrange(1000))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={procs}",
            f"--master_port={port}",
            *script,
        ]
    env = os.environ | {"BENCH_T0": str(time.time()), "BENCH_OUT": str(out), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(
            f"training failed ({' '.join(cmd)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]
    shares = []
    if cache is not None:
        metas = [json.loads(m.read_text()) for m in cache.glob("*/meta.json")]
        main = max(metas, key=lambda m: m["samples"])  # the training file's entry
        shares = main.get("shares", [])
    return {"ranks": ranks, "shares": shares, "log": done.stdout}


def describe(label: str, result: dict) -> str:
    ranks = result["ranks"]
    first = max(r["first_step_s"] for r in ranks)
    peak = max(r["peak_gib"] for r in ranks)
    cpu = max(r["first_step_cpu_s"] for r in ranks)
    data_s, data_cpu = max(r["data_s"] for r in ranks), max(r["data_cpu_s"] for r in ranks)
    rss, extra = max(r["data_rss_gib"] for r in ranks), max(r["data_peak_extra_gib"] for r in ranks)
    line = (
        f"{label:<22} first step {first:6.1f} s ({cpu:5.1f} CPU s); data {data_s:5.1f} s ({data_cpu:5.1f} CPU s); peak {peak:.2f} "
        f"GiB/process; data step: peak +{extra:.2f} GiB, then +{rss:.2f} GiB resident"
    )
    shares = result["shares"] if "cold" in label else []  # warm: the entry those shares built
    if shares:
        total = sum(s["records"] for s in shares)
        line += "; prepared " + " / ".join(
            f"{s['records'] / total:.0%} in {s['seconds']:.0f} s" for s in shares
        )
        workers = max(s.get("workers", 1) for s in shares)
        if workers > 1:
            line += f" by {workers} worker processes each (peak {max(r.get('workers_peak_gib', 0) for r in ranks):.2f} GiB)"
    return line


def image_check_cost(train: Path, n: int) -> str:
    """Seconds of the header and of the full (decode) image check over ``n`` training records."""
    from cotune.data.records import check_sample_images, read_samples

    samples, _ = read_samples(train)
    total = len(samples)
    samples = samples[:n] if n else samples
    out = []
    for decode in (False, True):
        start = time.perf_counter()
        check_sample_images(samples, workers=4, decode=decode)
        seconds = (time.perf_counter() - start) * total / len(samples)
        out.append(f"{'decode' if decode else 'header'} {seconds:.0f} s")
    scaled = "" if len(samples) == total else f" (measured on {len(samples)}, scaled)"
    return f"image check of {total} training records: " + ", ".join(out) + scaled


def main() -> None:
    if "--_rank" in sys.argv:
        return rank_main(sys.argv[sys.argv.index("--_rank") + 1 :])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="records (and distinct JPEGs)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--before", action="store_true", help="also run without the cache and validation")
    parser.add_argument(
        "--decode_n", type=int, default=10_000, help="records the full image check times (0: all)"
    )
    parser.add_argument("--workdir", default="", help="default: /tmp/cotune_data_scale/N")
    args = parser.parse_args()
    workdir = Path(args.workdir or f"/tmp/cotune_data_scale/{args.n}")
    train, test = write_dataset(workdir / "data", args.n)
    model = workdir / "tiny-mllama"
    if not (model / "config.json").exists():
        from cotune.demo.tiny import build_tiny_mllama

        build_tiny_mllama(model, seed=0)
    print(
        f"data_scale: N={args.n} ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})", flush=True
    )
    lines, figures = [], {}
    for procs in args.procs:
        cache = workdir / f"cache-{procs}"
        shutil.rmtree(cache, ignore_errors=True)
        if args.before:
            lines.append(
                describe(f"{procs} proc, no cache", run_training(workdir, model, train, test, procs, None))
            )
            print(lines[-1], flush=True)
        for state in ("cold", "warm"):
            result = run_training(workdir, model, train, test, procs, cache)
            figures[(procs, state)] = result
            lines.append(describe(f"{procs} proc, cache {state}", result))
            print(lines[-1], flush=True)
    print(image_check_cost(train, args.decode_n), flush=True)
    print(verdict(args.n, figures))


def verdict(n: int, figures: dict) -> str:
    """The closing line: the first step's seconds (wall, and CPU of the busiest process, which a
    shared machine's load does not inflate) against the targets for N = 100,000 on 2 cores."""
    ok_wall, ok_cpu, parts = True, True, []
    for (procs, state), result in sorted(figures.items()):
        first = max(r["first_step_s"] for r in result["ranks"])
        cpu = max(r["first_step_cpu_s"] for r in result["ranks"])
        data = max(r["data_peak_extra_gib"] for r in result["ranks"])
        ok_wall &= first <= TARGETS[state] and data <= TARGETS["data_gib"]
        ok_cpu &= cpu <= TARGETS[state] and data <= TARGETS["data_gib"]
        parts.append(f"{procs}p {state} {first:.0f} s ({cpu:.0f} CPU s)")
    met = "met" if ok_wall else ("met in CPU seconds only" if ok_cpu else "NOT met")
    load = os.getloadavg()[0]
    return (
        f"data_scale N={n}: first step " + ", ".join(parts) + f"; targets (120 s cold, 30 s warm, "
        f"2 GiB data per process) {met} (load average {load:.1f} on {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
