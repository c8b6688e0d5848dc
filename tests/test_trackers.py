"""Run tracking: TensorBoard, W&B (offline) and MLflow (its local SQLite store) read back with their own readers;
a resumed run continues the same tracker runs on the same step axis; a missing tracker fails at start."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from cotune.config import ConfigError, load_config
from cotune.train.loop import finetune
from cotune.train.metrics import read_metrics


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (a LevelDB-style log of ``Record`` protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = payload if kind in (1, 2) else buf + payload  # full/first start a record, middle/last extend
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    rows = []
    for r in wandb_records(next(run_dir.glob("run-*.wandb"))):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def run_config(tiny_mllama, shapes, out, *extra):
    return load_config(
        None,
        [("model_name", str(tiny_mllama)), ("dataset", str(shapes["train"])), ("test_file", str(shapes["test"])),
         ("data.image_root", str(shapes["images"].parent)), ("output_dir", str(out)),
         ("batch_size_training", "4"), ("gradient_clipping", "True"), ("max_eval_step", "1"),
         ("progress", "False"), ("data.max_seq_len", "512"), *extra],
    )  # fmt: skip


def test_tensorboard_wandb_mlflow_and_resume_on_the_same_axis(tiny_mllama, shapes, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    flags = [("report_to", "tensorboard,mlflow"), ("use_wandb", "True"), ("wandb_config.project", "cot")]
    flags += [("eval_every_steps", "2"), ("save_every_steps", "2")]
    cfg = run_config(tiny_mllama, shapes, out, ("max_train_step", "2"), *flags)
    assert cfg.report_to == ["tensorboard", "mlflow", "wandb"]
    first = finetune(cfg, log=lambda s: None)
    cfg = run_config(tiny_mllama, shapes, out, ("max_train_step", "4"), ("resume", "auto"), *flags)
    second = finetune(cfg, log=lambda s: None)
    assert first.steps == 2 and second.steps == 4

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in tb.Scalars("train/loss")] == pytest.approx(second.train_losses, rel=1e-5)
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert len(tb.Scalars(tag)) == 4, tag
    assert [e.step for e in tb.Scalars("eval/loss")] == [0, 2, 4]
    assert {"config", "adapter_dir"} <= {t.split("/")[0] for t in tb.Tags()["tensors"]}

    ids = json.loads((out / "trackers.json").read_text())
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    history = client.get_metric_history(ids["mlflow"], "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "eval/loss")] == [0, 2, 4]
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.data.params["lora_config.r"] == "8" and mlrun.data.params["wandb_config.project"] == "cot"
    assert mlrun.data.tags["adapter_dir"] == str(second.adapter_dir)
    assert mlrun.info.status == "FINISHED"

    runs = sorted((out / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(runs) == 2  # the same run id, continued
    steps = [r["_step"] for run in runs for r in wandb_history(run) if "train/loss" in r]
    assert steps == [1, 2, 3, 4]
    records = wandb_records(next(runs[0].glob("run-*.wandb")))
    config = {
        i.key: i.value_json
        for r in records
        if r.WhichOneof("record_type") == "run"
        for i in r.run.config.update
    }
    assert json.loads(config["lr"]) == pytest.approx(1e-4) and "wandb_config" in config


def test_report_to_none_and_missing_tracker(monkeypatch):
    assert load_config(None, [("report_to", "none")]).report_to == []
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'cotune\[mlflow\]'"):
        load_config(None, [("report_to", "mlflow")])
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        load_config(None, [("report_to", "comet")])


def test_max_train_step_counts_micro_batches_and_save_metrics_writes_the_cookbook_json(
    tiny_mllama, shapes, tmp_path
):
    """24 records in batches of 4: 6 micro-batches an epoch. With accumulation 4, max_train_step 9 is
    two epochs' worth minus 3: steps 4+2 in epoch 0 (6 batches), then 3 batches, one shorter step."""
    out = tmp_path / "run"
    cfg = run_config(
        tiny_mllama, shapes, out, ("max_train_step", "9"), ("gradient_accumulation_steps", "4"),
        ("num_epochs", "3"), ("keep_last_checkpoints", "0"),
    )  # fmt: skip
    result = finetune(cfg, log=lambda s: None)
    assert result.steps == 3
    (saved,) = out.glob("metrics_data_0-*.json")
    data = json.loads(saved.read_text())
    assert data["train_step_loss"] == pytest.approx(result.train_losses)
    assert len(data["train_epoch_loss"]) == 2 and len(data["val_epoch_loss"]) == 2
    assert data["train_epoch_loss"][0] == pytest.approx(sum(result.train_losses[:2]) / 2)
    assert set(data) == {
        f"{s}_{k}_{m}" for s in ("train", "val") for k in ("step", "epoch") for m in ("loss", "perplexity")
    }


def test_flop_counter_and_profiler(tiny_mllama, shapes, tmp_path):
    """The FLOP counter counts the step after flop_counter_start warm-up steps; the profiler leaves a
    trace with the cookbook's schedule; the two exclude each other, and each needs its steps."""
    out = tmp_path / "flops"
    logs: list[str] = []
    cfg = run_config(
        tiny_mllama, shapes, out, ("max_train_step", "3"), ("flop_counter", "True"),
        ("flop_counter_start", "1"), ("run_validation", "False"), ("keep_last_checkpoints", "0"),
    )  # fmt: skip
    finetune(cfg, log=logs.append)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (counted,) = [r for r in rows if "tflop_per_step" in r]
    assert counted["step"] == 2 and counted["tflop_per_step"] > 0 and counted["tflops_per_s"] > 0
    assert any("flop counter at step 2" in line for line in logs)

    trace = tmp_path / "trace"
    cfg = run_config(
        tiny_mllama, shapes, tmp_path / "prof", ("max_train_step", "6"), ("use_profiler", "True"),
        ("profiler_dir", str(trace)), ("run_validation", "False"), ("keep_last_checkpoints", "0"),
    )  # fmt: skip
    finetune(cfg, log=lambda s: None)
    (found,) = trace.glob("*.pt.trace.json*")
    assert "ProfilerStep#" in found.read_text()

    with pytest.raises(ConfigError, match="exclude each other"):
        run_config(tiny_mllama, shapes, out, ("flop_counter", "True"), ("use_profiler", "True"))
    cfg = run_config(tiny_mllama, shapes, out, ("max_train_step", "2"), ("flop_counter", "True"))
    with pytest.raises(ConfigError, match="none after flop_counter_start 3"):
        finetune(cfg, log=lambda s: None)


def test_validation_loss_per_llava_cot_stage_reaches_metrics_and_trackers(tiny_mllama, shapes, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = run_config(tiny_mllama, shapes, out, ("max_train_step", "1"), ("report_to", "tensorboard"))
    finetune(cfg, log=lambda s: None)
    stages = ("summary", "caption", "reasoning", "conclusion", "other")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:  # a token-weighted mean lies between its parts
        parts = [r[f"eval_loss_{s}"] for s in stages]
        assert min(parts) <= r["eval_loss"] <= max(parts), r
    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    for s in stages:
        got = [e.value for e in tb.Scalars(f"eval/loss_{s}")]
        assert got == pytest.approx([r[f"eval_loss_{s}"] for r in rows], rel=1e-5), s


def test_wandb_dir_and_mlflow_tracking_uri_from_the_environment_are_honoured(tmp_path, monkeypatch):
    """The ecosystem's own settings, when set, say where W&B writes and which MLflow store is used (the
    libraries are stand-ins recording what cotune asks of them: the real ones start in ~30 s)."""
    import sys
    from types import ModuleType, SimpleNamespace

    from cotune.config import WandbConfig
    from cotune.train.trackers import open_trackers

    asked = {}
    wandb = ModuleType("wandb")
    wandb.init = lambda **kw: asked.setdefault("wandb", kw) and SimpleNamespace(id="w1")
    tracking = ModuleType("mlflow.tracking")

    class Client:
        def __init__(self, uri):
            asked["mlflow"] = uri

        def update_run(self, *args, **kwargs):
            pass

    tracking.MlflowClient = Client
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", tracking)
    cfg = SimpleNamespace(report_to=["wandb", "mlflow"], wandb_config=WandbConfig(), mlflow_tracking_uri="",
                          mlflow_experiment="cotune")  # fmt: skip
    (tmp_path / "trackers.json").write_text(json.dumps({"mlflow": "m1"}))  # a resumed run: no new MLflow run

    def opened() -> tuple[str, str]:
        asked.clear()
        open_trackers(cfg, {}, tmp_path, is_main=True, resumed_step=3)
        return asked["wandb"]["dir"], asked["mlflow"]

    assert opened() == (str(tmp_path), f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}")  # cotune's defaults
    monkeypatch.setenv("WANDB_DIR", "/data/wandb")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert opened() == ("/data/wandb", "http://mlflow.internal:5000")
    cfg.mlflow_tracking_uri = "sqlite:///given.db"  # the option still wins
    assert opened()[1] == "sqlite:///given.db"
