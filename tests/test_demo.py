"""The embedded default's wiring: `cotune demo` trains, measures, reports, and fails when it misses a target.

The demo's real figures (5 minutes on 2 cores, eval loss, format rate >= 90%) come from `make demo`; here a
shortened run checks that every figure is measured, written and judged.
"""

from __future__ import annotations

import json

import pytest

from cotune.cli import main
from cotune.demo import TARGET_FORMAT_RATE, demo_verdict


def test_verdict_names_each_missed_target():
    good = {"eval_loss_base": 15.0, "eval_loss_final": 0.4, "format_rate": TARGET_FORMAT_RATE}
    assert demo_verdict(good) == []
    misses = demo_verdict({"eval_loss_base": 15.0, "eval_loss_final": 3.0, "format_rate": 0.5})
    assert len(misses) == 2 and "validation loss 3.000" in misses[0] and "format rate 50%" in misses[1]
    assert (
        "no validation loss"
        in demo_verdict({"eval_loss_base": None, "eval_loss_final": None, "format_rate": 1})[0]
    )


@pytest.mark.slow
def test_demo_command_reports_figures_and_fails_when_short_of_targets(tiny_mllama, shapes, tmp_path, capsys):
    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "tiny").symlink_to(tiny_mllama)  # the demo reuses a model and data it finds in place
    (workdir / "data").symlink_to(shapes["train"].parent)
    rc = main(
        ["demo", "--workdir", str(workdir), "--n_eval", "2", "--max_train_step", "4",
         "--eval_every_steps", "2", "--progress", "False"]
    )  # fmt: skip
    out = capsys.readouterr().out
    figures = json.loads((workdir / "demo.json").read_text())
    # four steps do not teach the format: the demo says so and exits 1
    assert rc == 1 and figures["misses"] and "below target: format rate" in out
    assert figures["train_steps"] == 4 and figures["held_out_prompts"] == 2
    assert figures["eval_loss_final"] < figures["eval_loss_base"]
    run = workdir / "run"
    for path in ("adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png", "config.yaml"):
        assert (run / path).is_file(), path
    assert f"adapter: {run / 'adapter'}" in out and "validation loss: base model" in out


def test_demo_rebuilds_a_tiny_model_from_an_older_builder(tiny_mllama, tmp_path):
    from cotune.models.tiny import BUILD_MARKER, is_current_build

    assert is_current_build(tiny_mllama)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")  # a checkpoint without a marker: written before markers existed
    assert not is_current_build(old)
    (old / BUILD_MARKER).write_text('{"builder_version": 1}')
    assert not is_current_build(old)
