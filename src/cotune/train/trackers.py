"""Experiment trackers (TensorBoard, Weights & Biases, MLflow): one small interface the loop calls.

``open_trackers`` starts the ones ``cfg.report_to`` names, on the first process only (the others get
an empty ``Trackers``). Each logs scalars against the optimizer step, the resolved configuration at
the start and the adapter's path at the end. A resumed run continues the same run on the same step
axis: the W&B and MLflow run ids are kept in ``output_dir/trackers.json``, TensorBoard writes to the
same directory and drops what the abandoned run logged after the checkpoint (``purge_step``).

The ecosystem's own settings win over cotune's defaults when set: ``WANDB_DIR`` (where W&B writes;
default the run's directory) and ``MLFLOW_TRACKING_URI`` (default a SQLite file in the run's directory;
``--mlflow_tracking_uri`` still overrides both).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

IDS_FILE = "trackers.json"


class Trackers:
    """The open trackers; every method is a no-op without any."""

    def __init__(self, backends: list[Any] | None = None) -> None:
        self.backends = backends or []

    def log(self, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        for b in self.backends:
            b.log(values, step)

    def finish(self, summary: dict[str, str]) -> None:
        for b in self.backends:
            b.finish(summary)
        self.backends = []


class TensorBoardTracker:
    def __init__(self, out: Path, config: dict, resumed_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: what the abandoned run logged after the checkpoint's step is hidden
        purge = resumed_step + 1 if resumed_step is not None else None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge)
        if resumed_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, summary: dict[str, str]) -> None:
        for key, value in summary.items():
            self.writer.add_text(key, value)
        self.writer.close()


class WandbTracker:
    def __init__(self, out: Path, config: dict, run_id: str | None, wandb_config: Any) -> None:
        import wandb

        w = wandb_config
        self.run = wandb.init(
            project=w.project,
            entity=w.entity or None,
            job_type=w.job_type or None,
            tags=list(w.tags) or None,
            group=w.group or None,
            notes=w.notes or None,
            mode=w.mode or None,
            dir=os.environ.get("WANDB_DIR") or str(out),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, str]) -> None:
        for key, value in summary.items():
            self.run.summary[key] = value
        self.run.finish()


class MlflowTracker:
    def __init__(self, out: Path, config: dict, run_id: str | None, uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        # MLflow 3 refuses its old file store: the default is a SQLite file next to the run's artifacts
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        self.client = MlflowClient(uri)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            artifacts = (out / "mlruns").resolve().as_uri()
            exp_id = found.experiment_id if found else self.client.create_experiment(experiment, artifacts)
            run_id = self.client.create_run(exp_id, run_name=out.name).info.run_id
            flat = _flatten(config)
            for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=[_param(k, v) for k, v in flat[i : i + 100]])
            self.client.log_dict(run_id, config, "config.json")
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, summary: dict[str, str]) -> None:
        for key, value in summary.items():
            self.client.set_tag(self.id, key, value)
        self.client.set_terminated(self.id)


def _flatten(config: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in config.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((prefix + key, value))
    return items


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


def open_trackers(cfg: Any, config: dict, out: Path, is_main: bool, resumed_step: int | None) -> Trackers:
    """The trackers of ``cfg.report_to`` (first process only). ``resumed_step``: the checkpoint's step
    when the run continues one (the same tracker runs, from that step), else None."""
    if not is_main or not cfg.report_to:
        return Trackers()
    ids_path = out / IDS_FILE
    ids = json.loads(ids_path.read_text()) if (resumed_step is not None and ids_path.is_file()) else {}
    backends: list[Any] = []
    for name in cfg.report_to:
        if name == "tensorboard":
            backends.append(TensorBoardTracker(out, config, resumed_step))
        elif name == "wandb":
            backends.append(WandbTracker(out, config, ids.get("wandb"), cfg.wandb_config))
        elif name == "mlflow":
            backends.append(
                MlflowTracker(out, config, ids.get("mlflow"), cfg.mlflow_tracking_uri, cfg.mlflow_experiment)
            )
    ids.update({n: b.id for n, b in zip(cfg.report_to, backends) if hasattr(b, "id")})
    ids_path.write_text(json.dumps(ids))
    return Trackers(backends)
