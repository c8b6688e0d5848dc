"""``bench/gpu.sh --dry-run``: the GPU check's whole script (checkpoint and photos prepared, LoRA under
torchrun + FSDP, QLoRA, each a real ``cotune train`` with validation, a checkpoint and the FLOP
counter) on CPU with tiny shapes; and a run that fails stops it loudly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_cotune_train_end_to_end(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    for name in ("fsdp_lora", "qlora"):
        assert f"RESULT {name} device=cpu: tokens/s=" in done.stdout
        found = json.loads((tmp_path / "out" / f"gpu_{name}.json").read_text())
        assert found["steps"] == 8 and len(found["eval_losses"]) == 2  # before step 1 and at the end
        assert found["tokens_per_s"] > 0 and found["seconds_to_first_step"] > 0
        assert found["tflops_per_s_per_process"] > 0  # the FLOP counter ran (no MFU: no GPU peak on CPU)
        log = (tmp_path / "work" / f"{name}.log").read_text()
        assert "checkpoints/step_00000004 (step 4)" in log  # then replaced by the epoch's end (keep 1)
        assert (tmp_path / "work" / "runs" / name / "checkpoints" / "step_00000008").is_dir()
    log = (tmp_path / "work" / "fsdp_lora.log").read_text()
    assert "fsdp: full_shard over 1 process(es)" in log
    assert "4bit" in (tmp_path / "work" / "qlora.log").read_text()
    config = json.loads((tmp_path / "work" / "model" / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 128256  # the real vocabulary; tiny layers
    processor = json.loads((tmp_path / "work" / "model" / "processor_config.json").read_text())
    assert processor["image_processor"]["max_image_tiles"] == 4


def test_a_failed_run_fails_the_check(tmp_path):
    """No figure is made up for a run that failed: the runner exits with the run's code and says so."""
    out = tmp_path / "runs" / "x"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_fsdp.py"), "run", "x", "--work", str(tmp_path),
         "--out", str(tmp_path), "--timeout", "60", "--",
         sys.executable, "-c", "import sys; print('CUDA out of memory'); sys.exit(3)", f"--output_dir={out}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 3
    assert "FAILED x" in done.stderr and "CUDA out of memory" in done.stderr
    assert not (tmp_path / "gpu_x.json").exists()
