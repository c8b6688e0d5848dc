"""The embedded default's wiring: `cotune demo` trains, measures, reports, and fails when it misses a target.

The demo's real figures (5 minutes on 2 cores, eval loss, format rate >= 90%) come from `make demo`; here a
shortened run checks that every figure is measured, written and judged.
"""

from __future__ import annotations

import json

import pytest

from cotune.cli import main
from cotune.run_demo import TARGET_FORMAT_RATE, demo_verdict, unjudged


def _figures(**changes):
    good = {
        "eval_loss_base": 15.0, "eval_loss_final": 0.4, "format_rate": TARGET_FORMAT_RATE,
        "accuracy": 0.7, "accuracy_shuffled_images": 0.3,
        "accuracy_by_task": {"colour": {"accuracy": 0.9}, "shape": {"accuracy": 0.85}},
    }  # fmt: skip
    return {**good, **changes}


def test_verdict_names_each_missed_target():
    assert demo_verdict(_figures()) == []
    misses = demo_verdict(_figures(eval_loss_final=3.0, format_rate=0.5))
    assert len(misses) == 2 and "validation loss 3.000" in misses[0] and "format rate 50%" in misses[1]
    # without validation (--run_validation False) the loss target is not judged; the others are
    unvalidated = _figures(eval_loss_base=None, eval_loss_final=None)
    assert demo_verdict(unvalidated) == [] and "validation loss" in unjudged(unvalidated)[0]
    assert demo_verdict({**unvalidated, "format_rate": 0.5}) == ["format rate 50% is below 90%"]
    assert unjudged(_figures()) == []
    # the adapter must read the pictures: colour and shape right, and far better than with shuffled images
    blind = demo_verdict(_figures(accuracy_by_task={"colour": {"accuracy": 0.2}, "shape": {"accuracy": 0.9}}))
    assert blind == ["'colour' accuracy 20% is below 80%"]
    prior = demo_verdict(_figures(accuracy=0.5, accuracy_shuffled_images=0.45))
    assert len(prior) == 1 and "less than 30 points above the 45% with shuffled images" in prior[0]


def _workdir_with(model_dir, shapes, tmp_path):
    """A demo folder holding the session's tiny model and data, the data marked as the demo's own:
    the demo reuses what it finds in place."""
    import shutil

    from cotune.run_demo import DATA_MARKER, DEMO_DATA

    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "tiny").symlink_to(model_dir)
    shutil.copytree(shapes["train"].parent, workdir / "data")
    (workdir / "data" / DATA_MARKER).write_text(json.dumps(DEMO_DATA))
    return workdir


@pytest.mark.slow
def test_demo_command_reports_figures_and_fails_when_short_of_targets(tiny_mllama, shapes, tmp_path, capsys):
    workdir = _workdir_with(tiny_mllama, shapes, tmp_path)
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
    assert {"accuracy", "accuracy_shuffled_images", "accuracy_by_task"} <= set(figures)
    assert "answer accuracy:" in out and "with images shuffled across samples" in out


@pytest.mark.slow
def test_demo_without_validation_reports_instead_of_crashing(tiny_mllama, shapes, tmp_path, capsys):
    workdir = _workdir_with(tiny_mllama, shapes, tmp_path)
    rc = main(
        ["demo", "--workdir", str(workdir), "--n_eval", "2", "--max_train_step", "2",
         "--run_validation", "False", "--progress", "False"]
    )  # fmt: skip
    out = capsys.readouterr().out
    figures = json.loads((workdir / "demo.json").read_text())
    assert rc == 1 and figures["eval_loss_base"] is None
    assert (
        "validation loss: not measured" in out and "no validation loss was measured" in figures["misses"][0]
    )


def test_demo_rebuilds_a_tiny_model_from_an_older_builder(tmp_path):
    from cotune.demo.tiny import BUILD_MARKER, is_current_build
    from cotune.run_demo import DATA_MARKER, DEMO_DATA, prepare_demo

    old = tmp_path / "tiny"
    old.mkdir()
    (old / "config.json").write_text("{}")  # a checkpoint without a marker: written before markers existed
    assert not is_current_build(old)
    (old / BUILD_MARKER).write_text('{"builder_version": 1}')
    assert not is_current_build(old)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")  # data marked as this recipe's are kept as they are
    (tmp_path / "data" / DATA_MARKER).write_text(json.dumps(DEMO_DATA))
    logs = []
    model_dir, data_dir = prepare_demo(tmp_path, n_test=4, log=logs.append)
    assert model_dir == old and is_current_build(old) and (old / "model.safetensors").is_file()
    assert json.loads((old / "config.json").read_text())["model_type"] == "mllama"
    assert logs == [f"building the tiny Mllama in {old}"]
    assert (data_dir / "train.jsonl").read_text() == ""


def test_demo_rewrites_data_made_for_another_recipe(tmp_path, monkeypatch):
    import cotune.run_demo as run_demo

    monkeypatch.setattr(run_demo, "DEMO_DATA", {**run_demo.DEMO_DATA, "n_train": 3})
    monkeypatch.setattr(run_demo, "is_current_build", lambda _: True)  # the model is not the point here
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("")
    (data / run_demo.DATA_MARKER).write_text(json.dumps({**run_demo.DEMO_DATA, "radius": 0.01}))
    logs = []
    run_demo.prepare_demo(tmp_path, n_test=2, log=logs.append)
    assert logs == [f"writing the synthetic LLaVA-CoT dataset to {data}"]
    assert len((data / "train.jsonl").read_text().splitlines()) == 3 and run_demo.is_current_data(data)
    logs.clear()
    run_demo.prepare_demo(tmp_path, n_test=2, log=logs.append)  # now current: reused
    assert logs == []


@pytest.mark.slow
def test_demo_recipe_ships_with_a_regular_install(tmp_path):
    """`pip install .` (not editable) carries the demo's recipe: `cotune demo` needs no checkout."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
               "--target", str(target), str(root)]  # fmt: skip
    subprocess.run(install, check=True, capture_output=True, timeout=300, cwd=tmp_path)
    probe = "from cotune.run_demo import DEMO_CONFIG; from cotune.config import load_config; print(DEMO_CONFIG, load_config(DEMO_CONFIG).lr)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(str(target)) and "site" in out.stdout
