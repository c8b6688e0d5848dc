"""Sharded QLoRA: a 4-bit base under FSDP2 over 2 processes (gloo, CPU) against one process, and exact resume.

The runs and comparisons are those of ``test_distributed`` (same flags, same launch of the ranks, one
thread per process), with ``--quantization 4bit`` added. On a CPU the compute dtype is fp32, so the
packed weights are stored in fp32 when sharded (``cotune.models.quant.sharded_quantization``).
"""

from __future__ import annotations

import shutil

import pytest

from test_distributed import (
    _adapter,
    _assert_same_adapter,
    _assert_same_metrics,
    _flags,
    _in_process,
    _join_ranks,
    _metrics,
    _start_ranks,
)

pytest.importorskip("bitsandbytes")

QLORA = {"quantization": "4bit"}


@pytest.fixture(scope="module")
def qlora_runs(tiny_mllama, shapes, tmp_path_factory):
    """The same 5 QLoRA steps with 2 FSDP processes x batch 1 and 1 process x batch 2."""
    root = tmp_path_factory.mktemp("sharded-qlora")
    two, one = root / "two", root / "one"
    flags = _flags(tiny_mllama, shapes["train"], shapes["test"], two, 1, enable_fsdp=True, **QLORA)
    assert _join_ranks(_start_ranks(flags, root / "logs"), timeout=240) == [0, 0]
    _in_process(_flags(tiny_mllama, shapes["train"], shapes["test"], one, 2, **QLORA))
    return {"two": two, "one": one, "root": root, "log": (root / "logs" / "rank0.log").read_text()}


def test_two_sharded_processes_match_one_process(qlora_runs):
    log = qlora_runs["log"]
    assert "fsdp: full_shard over 2 process(es)" in log
    assert "4-bit weights packed in fp32 to be sharded" in log  # CPU: fp32 compute, no mixed precision
    two, one = qlora_runs["two"], qlora_runs["one"]
    assert len([m for m in _metrics(two) if "loss" in m]) == 5
    _assert_same_metrics(_metrics(two), _metrics(one), rel=1e-4)  # loss, eval loss, grad norm
    diff = _assert_same_adapter(_adapter(two), _adapter(one), atol=1e-5)
    print(f"\nsharded QLoRA, 2x1 vs 1x2: adapter max |difference| {diff:.2e}")


def test_sharded_qlora_resumes_exactly(qlora_runs, tiny_mllama, shapes):
    """Two processes resume the sharded run from its step-2 checkpoint and end where it ended."""
    reference, out = qlora_runs["two"], qlora_runs["root"] / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    step = reference / "checkpoints" / "step_00000002"
    shutil.copytree(step, out / "checkpoints" / step.name)
    shutil.copy(reference / "metrics.jsonl", out / "metrics.jsonl")
    flags = _flags(tiny_mllama, shapes["train"], shapes["test"], out, 1, enable_fsdp=True, **QLORA)
    logs = qlora_runs["root"] / "resume-logs"
    assert _join_ranks(_start_ranks(flags + ["--resume=auto"], logs), timeout=240) == [0, 0]
    assert "step_00000002: step 2, epoch 0" in (logs / "rank0.log").read_text()
    _assert_same_metrics(_metrics(out), _metrics(reference), rel=1e-9)
    _assert_same_adapter(_adapter(out), _adapter(reference), atol=1e-6)
