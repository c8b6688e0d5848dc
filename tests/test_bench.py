"""The training benchmark's functions at a very small size, so `make bench` cannot silently rot."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_bench_sides_train_the_same_batches(tiny_mllama, processor, tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        import train_bench
        from _workers import BenchSpec, write_spec
    finally:
        while str(BENCH) in sys.path:  # train_bench adds it too
            sys.path.remove(str(BENCH))
    # the session's processor instead of loading the same files three more times (speed only)
    monkeypatch.setattr("cotune.train.loop.load_processor", lambda path, *a, **k: processor)
    monkeypatch.setattr("cotune.models.load.load_processor", lambda path, *a, **k: processor)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs cost more than they save on a shared box
    args = argparse.Namespace(seq_len=64, batch_size=2, warmup_steps=1, steps=1)
    spec = train_bench.prepare(tmp_path, args, model_dir=tiny_mllama, processor=processor)
    assert len(Path(spec.train_file).read_text().splitlines()) == 4
    # the spec reaches the worker processes as JSON
    spec_file = write_spec(spec, tmp_path / "spec.json")
    assert BenchSpec(**json.loads(spec_file.read_text())) == spec

    try:
        results = train_bench.run_bench(spec, ["cotune", "hf"], in_process=True)
    finally:
        torch.set_num_threads(threads)
    for r in results.values():
        assert r["steps"] == 2 and r["measured_steps"] == 1
        assert r["measured_tokens"] == 2 * 64  # every sample renders to exactly seq_len tokens
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
    # same weights, same LoRA init (B = 0), same first batch: the same first-step loss
    c, h = results["cotune"]["losses"][0], results["hf"]["losses"][0]
    assert math.isclose(c, h, rel_tol=1e-4), (c, h)

    throughput, memory = train_bench.report(results)
    assert throughput > 0 and memory > 0
    line = train_bench.ratio_line(throughput, memory)
    assert re.fullmatch(r"throughput_ratio=\d+\.\d{3} memory_ratio=\d+\.\d{3}", line)
    assert "WARNING" not in capsys.readouterr().out


def test_bench_qlora_sides_train_the_same_4bit_base(tiny_mllama, processor, tmp_path, monkeypatch):
    """`make bench`'s QLoRA line: both sides load the same bitsandbytes 4-bit base and start from one loss."""
    import dataclasses

    import pytest

    pytest.importorskip("bitsandbytes")
    sys.path.insert(0, str(BENCH))
    try:
        import train_bench
    finally:
        while str(BENCH) in sys.path:
            sys.path.remove(str(BENCH))
    monkeypatch.setattr("cotune.train.loop.load_processor", lambda path, *a, **k: processor)
    monkeypatch.setattr("cotune.models.load.load_processor", lambda path, *a, **k: processor)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = argparse.Namespace(seq_len=64, batch_size=2, warmup_steps=1, steps=1)
    spec = train_bench.prepare(tmp_path, args, model_dir=tiny_mllama, processor=processor)
    try:
        results = train_bench.run_bench(
            dataclasses.replace(spec, quantization="4bit"), ["cotune", "hf"], in_process=True
        )
    finally:
        torch.set_num_threads(threads)
    c, h = results["cotune"]["losses"][0], results["hf"]["losses"][0]
    assert math.isclose(c, h, rel_tol=1e-4), (c, h)
    line = train_bench.ratio_line(*train_bench.report(results), prefix="qlora_")
    assert re.fullmatch(r"qlora_throughput_ratio=\d+\.\d{3} qlora_memory_ratio=\d+\.\d{3}", line)
