"""Serving benchmark: continuous batching across adapters vs the same requests one at a time.

``make bench`` runs this file. It builds the tiny random Mllama and three different random LoRA
adapters, starts ``cotune serve`` on a free port (a real server process), and sends the same 32
chat requests (greedy, ``--max-tokens`` each, spread over the three adapters, every other one with
an image) three ways through that one server:

* one at a time (concurrency 1): the sequential answers and the baseline throughput;
* from 4 and from 16 concurrent clients: the requests join the running batch as they arrive.

Every concurrent answer must equal its sequential one (exit 1 otherwise). It prints generated
tokens/s, p50/p95 latency per concurrency, the server's peak resident memory (VmHWM) and peak batch
size (and tokens per second of the server's CPU time, which other load on the machine barely
moves), and ends with the line ``serve_throughput_ratio=<tokens/s at 16 / at 1> p95_latency_s=<at 16>``.
First, in process, it prints what one request joining 4 and 16 running rows costs (``admission_cost``:
time to admit, the next step, time to leave, bytes copied); ``--admission-only`` stops there (it also
runs on the code before the shared cache, for comparison).

Usage:
    python bench/serve.py [--requests 32] [--clients 16] [--max-tokens 48] [--device cpu] [--threads 1]
        [--admission-only]

The server runs with one CPU thread by default (``--threads``): the tiny model's operations are too
small to split, and on a shared 2-core box a split operation waits for whichever thread the
scheduler parked, at every step.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KEY = "bench-key"
ADAPTERS = ("med", "qa", "support")


def make_adapter(model_dir: Path, out_dir: Path, seed: int) -> str:
    """A LoRA (r=8 on the language model) with random B matrices: it changes the answers."""
    import torch

    from cotune.config import LoraConfig
    from cotune.models.load import add_lora, load_base_model

    base, family = load_base_model(model_dir)
    torch.manual_seed(seed)
    model = add_lora(base, family, LoraConfig(r=8, lora_dropout=0.0, target_modules="language"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    model.save_pretrained(str(out_dir))
    return str(out_dir)


def image_url(seed: int) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8 + seed % 20, 8, 40 + seed % 20, 40), fill=((seed * 50) % 256, 80, 160))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def requests_for(n: int, max_tokens: int) -> list[dict]:
    out = []
    for k in range(n):
        content = [{"type": "image_url", "image_url": {"url": image_url(k)}}] if k % 2 else []
        content.append(
            {"type": "text", "text": f"Question {k}: how many shapes, and which colour is the largest?"}
        )
        out.append(
            {
                "model": ADAPTERS[k % len(ADAPTERS)],
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        )
    return out


def server_args(model_dir: Path, adapters: dict[str, str], device: str, threads: int) -> list[str]:
    args = [
        "--model_name",
        str(model_dir),
        "--device",
        device,
        "--torch_dtype",
        "fp32",
        "--num_threads",
        str(threads),
    ]
    args += [a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}")]
    return args + ["--api_key", KEY, "--max_batch_size", "32"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (a figure the machine's other load barely moves)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(client, bodies: list[dict], clients: int, pid: int) -> dict:
    """Sends ``bodies`` from ``clients`` threads; answers, latencies, tokens/s, tokens per server CPU-s."""

    def one(body: dict) -> tuple[str, int, float]:
        start = time.perf_counter()
        r = client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        reply = r.json()
        return (
            reply["choices"][0]["message"]["content"],
            reply["usage"]["completion_tokens"],
            time.perf_counter() - start,
        )

    start, cpu = time.perf_counter(), cpu_seconds(pid)
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, bodies))
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    latencies = sorted(r[2] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "answers": [r[0] for r in results],
        "tokens": tokens,
        "elapsed": elapsed,
        "tokens_per_s": tokens / elapsed,
        "tokens_per_cpu_s": tokens / max(cpu, 1e-9),
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
    }


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cache_bytes(engine) -> int:
    """Bytes the engine's caches hold (the code before ``BatchCache`` copied all of it per admission)."""
    layers = engine.rows.cache.layers if getattr(engine, "rows", None) is not None else []
    return sum(t.nbytes for layer in layers for t in (layer.keys, layer.values) if t is not None)


def admission_cost(model_dir: Path, rows: int, repeats: int = 5, warm_steps: int = 16) -> dict:
    """What one request joining ``rows`` running rows costs the engine, in process (one thread).

    ``rows`` requests (every other one with a picture) are admitted and decoded ``warm_steps``
    tokens; then one request with a picture joins (``_admit``: its prefill and its insertion), the
    batch decodes one step, and the request leaves (``_drop_finished``), ``repeats`` times. Bytes
    copied: ``BatchCache.copied`` (forks, image copies for a mixed batch, growth); for the code
    before it, the size of the merged cache (its admission re-concatenated every layer of every row).
    """

    from PIL import Image

    from cotune.infer.generate import encode_prompt, user_message
    from cotune.models.load import load_base_model, load_processor
    from cotune.serve.engine import Engine, Job
    from cotune.serve.sampling import Sampling

    (model, family), processor = load_base_model(model_dir), load_processor(model_dir)
    model.eval()

    def job(k: int, with_image: bool) -> Job:  # each request its own picture
        picture = Image.new("RGB", (64, 64), (37 * k % 256, 90, 200 - k))
        messages = [user_message(f"Describe picture {k}.", n_images=int(with_image))]
        item = encode_prompt(processor, family, messages, [picture] if with_image else [])
        return Job(item, "none", Sampling(max_tokens=10_000, temperature=0), emit=lambda e: None)

    engine = Engine(model, processor, family, max_batch=rows + 1, max_queue=rows + 1)
    for k in range(rows):
        engine.submit(job(k, k % 2 == 0))
    engine._admit()
    for _ in range(warm_steps):
        engine._step()
    admit_s, step_s, leave_s, copied = [], [], [], []
    for r in range(repeats):
        before = getattr(getattr(engine, "cache", None), "copied", 0)
        engine.submit(job(rows + r, True))
        t0 = time.perf_counter()
        engine._admit()
        t1 = time.perf_counter()
        engine._step()
        t2 = time.perf_counter()
        if hasattr(engine, "cache"):
            copied.append(engine.cache.copied - before)
        else:
            copied.append(_cache_bytes(engine))
        engine.choices[-1].done = True
        t3 = time.perf_counter()
        engine._drop_finished()
        leave_s.append(time.perf_counter() - t3)
        admit_s.append(t1 - t0)
        step_s.append(t2 - t1)
    return dict(
        rows=rows, admit_ms=1000 * statistics.median(admit_s), step_ms=1000 * statistics.median(step_s),
        leave_ms=1000 * statistics.median(leave_s), copied_kib=statistics.median(copied) / 1024,
    )  # fmt: skip


def print_admission(model_dir: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        print("admission of one request with a picture (in process, 1 thread, median of 5):")
        print(f"{'rows':>5} {'admit ms':>9} {'next step ms':>13} {'leave ms':>9} {'KiB copied':>11}")
        for rows in (4, 16):
            r = admission_cost(model_dir, rows)
            print(
                f"{r['rows']:>5} {r['admit_ms']:>9.1f} {r['step_ms']:>13.1f} {r['leave_ms']:>9.2f} "
                f"{r['copied_kib']:>11.1f}"
            )
    finally:
        torch.set_num_threads(threads)


def metric(text: str, name: str) -> float:
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu", help="where the server runs the model (fp32)")
    parser.add_argument(
        "--threads", type=int, default=1, help="the server's --num_threads (0: torch's default)"
    )
    parser.add_argument(
        "--admission-only", action="store_true", help="only the in-process admission cost (no server)"
    )
    args = parser.parse_args()
    import httpx

    from cotune.demo.tiny import build_tiny_mllama
    from cotune.serve.launch import serve_subprocess

    with tempfile.TemporaryDirectory(prefix="cotune-serve-bench-") as tmp:
        model_dir = build_tiny_mllama(Path(tmp) / "tiny", seed=0)
        print_admission(model_dir)
        if args.admission_only:
            return 0
        adapters = {
            name: make_adapter(model_dir, Path(tmp) / name, seed=k + 1) for k, name in enumerate(ADAPTERS)
        }
        server = serve_subprocess(server_args(model_dir, adapters, args.device, args.threads), timeout=120)
        with server as (url, proc):
            headers = {"Authorization": f"Bearer {KEY}"}
            with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
                bodies = requests_for(args.requests, args.max_tokens)
                run(client, bodies[:3], 1, proc.pid)  # warm-up
                results = {c: run(client, bodies, c, proc.pid) for c in sorted({1, 4, args.clients})}
                metrics = client.get("/metrics").text
            peak_mib = peak_rss_mib(proc.pid)
    sequential = results[1]
    print(
        f"{args.requests} requests over {len(ADAPTERS)} adapters, {args.max_tokens} tokens each, greedy, "
        f"server on {args.device} with {args.threads or 'default'} thread(s)"
    )
    print(
        f"{'clients':>8} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'tok/CPU-s':>10} {'p50 s':>7} {'p95 s':>7} "
        f"{'same answers':>13}"
    )
    mismatches = 0
    for clients, r in results.items():
        same = sum(a == b for a, b in zip(r["answers"], sequential["answers"]))
        mismatches += len(r["answers"]) - same
        print(
            f"{clients:>8} {r['tokens']:>7} {r['elapsed']:>8.2f} {r['tokens_per_s']:>9.1f} "
            f"{r['tokens_per_cpu_s']:>10.1f} {r['p50']:>7.3f} "
            f"{r['p95']:>7.3f} {same:>6}/{len(r['answers'])}"
        )
    print(
        f"server peak RSS {peak_mib:.0f} MiB, peak batch size {metric(metrics, 'cotune_peak_batch_size'):.0f}"
    )
    ratio = results[args.clients]["tokens_per_s"] / sequential["tokens_per_s"]
    if mismatches:
        print(f"error: {mismatches} concurrent answers differ from their sequential ones", file=sys.stderr)
    print(f"serve_throughput_ratio={ratio:.2f} p95_latency_s={results[args.clients]['p95']:.3f}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
