"""Run tracking: which experiment trackers a run reports to, and llama-cookbook's ``wandb_config``.

``report_to`` follows Hugging Face's spelling (``tensorboard``, ``wandb``, ``mlflow``, several at
once, ``none``); the cookbook's ``--use_wandb`` adds ``wandb``. Each tracker is an optional extra of
the package: asking for one that is not installed is an error here, before any work.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from cotune.options.fields import ConfigError, opt

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> module to import


@dataclass
class TrackingOptions:
    """Where a training run reports its metrics besides metrics.jsonl."""

    report_to: list = opt(
        [],
        "Experiment trackers: tensorboard, wandb, mlflow; several as a list or 'tensorboard,mlflow'; "
        "none: no tracker. TensorBoard writes output_dir/tensorboard, W&B output_dir/wandb, MLflow "
        "output_dir/mlruns unless mlflow_tracking_uri is set.",
    )
    use_wandb: bool = opt(False, "Cookbook: report to Weights & Biases (the same as report_to wandb).")
    mlflow_tracking_uri: str = opt("", "MLflow tracking URI (default: sqlite:///OUTPUT_DIR/mlflow.db).")
    mlflow_experiment: str = opt("cotune", "MLflow experiment name.")


@dataclass
class WandbConfig:
    """llama-cookbook's ``wandb_config``: passed to ``wandb.init`` (used with report_to wandb)."""

    project: str = opt("llama_cookbook", "W&B project.")
    entity: str = opt("", "W&B entity (team or user).")
    job_type: str = opt("", "W&B job type.")
    tags: list = opt([], "W&B tags.")
    group: str = opt("", "W&B group.")
    notes: str = opt("", "W&B notes.")
    mode: str = opt("", "W&B mode: online, offline or disabled (default: wandb's, i.e. WANDB_MODE).")


def check_tracking(t: Any, prefix: str) -> None:
    """Normalises report_to (commas split, 'none' dropped, use_wandb added) and checks each tracker
    is known and installed."""
    names: list[str] = []
    for item in t.report_to:
        names += [n.strip().lower() for n in str(item).strip("[]()").replace("'", "").split(",") if n.strip()]
    if "none" in names:
        if len(names) > 1:
            raise ConfigError(f"option '{prefix}report_to': 'none' cannot be combined with {names}")
        names = []
    if t.use_wandb:
        names.append("wandb")
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(
                f"option '{prefix}report_to': unknown tracker '{name}'; choose from {', '.join(TRACKERS)}, none"
            )
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(
                f"report_to {name}: the {name} package is not installed; pip install 'cotune[{name}]'"
            )
    t.report_to = list(dict.fromkeys(names))


@dataclass
class ProfilingOptions:
    """llama-cookbook's FLOP counter and torch profiler (one or the other)."""

    flop_counter: bool = opt(
        False, "Count the FLOPs of one optimizer step (torch.utils.flop_counter): TFLOP/s, MFU on a GPU."
    )
    flop_counter_start: int = opt(3, "Optimizer steps before the one whose FLOPs are counted.")
    use_profiler: bool = opt(
        False,
        "Trace steps 2-4 with torch.profiler (wait 1, warmup 2, active 3), for TensorBoard or Perfetto.",
    )
    profiler_dir: str = opt("", "Where the profiler trace goes (default: output_dir/profiler).")


def check_profiling(p: Any, prefix: str) -> None:
    """The cookbook's rules: the FLOP counter and the profiler exclude each other."""
    if p.flop_counter and p.use_profiler:
        raise ConfigError(
            f"options '{prefix}flop_counter' and '{prefix}use_profiler' exclude each other (the profiler's "
            "own FLOP count is in its trace): choose one"
        )
    if p.flop_counter_start < 0:
        raise ConfigError(f"option '{prefix}flop_counter_start' must be >= 0; got {p.flop_counter_start}")
