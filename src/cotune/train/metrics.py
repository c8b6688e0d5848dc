"""metrics.jsonl, the loss-curve plot, and a throughput meter."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per line to ``path`` (flushed, so a crash loses nothing written)."""

    def __init__(self, path: str | Path | None, resume: bool = False) -> None:
        self.path = Path(path) if path else None
        if self.path is not None and not resume:
            self.path.write_text("")

    def write(self, **record) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def plot_loss(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Training loss per step and validation loss, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("cotune: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


class Throughput:
    """Tokens per second over a sliding interval."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self, reset: bool = True) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        if reset:
            self.start, self.tokens = now, 0
        return rate


def write_cookbook_metrics(metrics_path: str | Path, out_json: str | Path) -> Path:
    """metrics.jsonl in llama-cookbook's ``save_metrics`` shape: per-step and per-epoch train and
    validation loss and perplexity (an epoch's train loss is the mean of its steps', its validation
    loss the last one of the epoch)."""
    rows = read_metrics(metrics_path) if Path(metrics_path).is_file() else []
    train = [(r["epoch"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["epoch"], r["eval_loss"]) for r in rows if "eval_loss" in r and r["step"] > 0]
    epochs = sorted({e for e, _ in train})
    train_epoch = [sum(v for e, v in train if e == k) / sum(1 for e, _ in train if e == k) for k in epochs]
    val_epoch = [[v for e, v in val if e == k][-1] for k in sorted({e for e, _ in val})]
    data = {
        "train_step_loss": [v for _, v in train],
        "train_epoch_loss": train_epoch,
        "train_step_perplexity": [perplexity(v) for _, v in train],
        "train_epoch_perplexity": [perplexity(v) for v in train_epoch],
        "val_step_loss": [v for _, v in val],
        "val_epoch_loss": val_epoch,
        "val_step_perplexity": [perplexity(v) for _, v in val],
        "val_epoch_perplexity": [perplexity(v) for v in val_epoch],
    }
    Path(out_json).write_text(json.dumps(data))
    return Path(out_json)
