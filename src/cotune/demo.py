"""The embedded default, end to end: tiny model -> synthetic data -> train -> validate -> generate."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cotune.config import load_config
from cotune.data.records import load_samples
from cotune.data.synthetic import write_synthetic_dataset
from cotune.eval.cot import format_rate
from cotune.infer.generate import generate, prompt_messages
from cotune.models.load import load_base_model, load_processor
from cotune.models.tiny import build_tiny_mllama, is_current_build
from cotune.train.loop import finetune

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
# What the embedded default must show: the validation loss at most this share of the base model's,
# and at least this share of greedy held-out answers in the four-stage format.
TARGET_LOSS_RATIO = 0.1
TARGET_FORMAT_RATE = 0.9


def demo_verdict(figures: dict) -> list[str]:
    """The demo's targets that ``figures`` misses, each as a sentence (empty: all met)."""
    misses = []
    base, final = figures.get("eval_loss_base"), figures.get("eval_loss_final")
    if base is None or final is None:
        misses.append("no validation loss was measured (run_validation is off)")
    elif final > TARGET_LOSS_RATIO * base:
        misses.append(
            f"validation loss {final:.3f} is above {TARGET_LOSS_RATIO:.0%} of the base model's {base:.3f}"
        )
    if figures["format_rate"] < TARGET_FORMAT_RATE:
        misses.append(f"format rate {figures['format_rate']:.0%} is below {TARGET_FORMAT_RATE:.0%}")
    return misses


def held_out_format_rate(
    model_dir: str, adapter_dir: str | None, test_file: str, n: int = 40, batch: int = 10
):
    """Greedy replies on the first ``n`` held-out prompts; returns (format rate, replies)."""
    from peft import PeftModel

    processor = load_processor(model_dir)
    model, family = load_base_model(model_dir)
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir)
    samples, _ = load_samples(test_file)
    prompts = [(prompt_messages(s), s.images) for s in samples[:n]]
    replies = []
    for start in range(0, len(prompts), batch):
        replies += generate(model, processor, family, prompts[start : start + batch], max_new_tokens=160)
    return format_rate(replies), replies


def run_demo(
    workdir: str | Path = "demo_out",
    config: str | Path = DEMO_CONFIG,
    overrides=(),
    log=print,
    n_eval: int = 40,
) -> dict:
    """Runs the whole embedded default and returns its figures (also written to ``workdir/demo.json``).

    Args:
        workdir: Where the tiny model, the data and the run go; a model written by this version of
            cotune and existing data are reused.
        config: The recipe (``configs/demo.yaml``).
        overrides: ``(key, value)`` pairs applied over the recipe, as on the command line.
        log: Where progress lines go.
        n_eval: Held-out prompts answered greedily for the format rate.
    """
    t0 = time.perf_counter()
    workdir = Path(workdir)
    model_dir, data_dir, run_dir = workdir / "tiny", workdir / "data", workdir / "run"
    if not is_current_build(model_dir):  # missing, or written by an older cotune
        log(f"building the tiny Mllama in {model_dir}")
        build_tiny_mllama(model_dir, seed=0)
    if not (data_dir / "train.jsonl").is_file():
        log(f"writing the synthetic LLaVA-CoT dataset to {data_dir}")
        write_synthetic_dataset(data_dir)
    paths = [
        ("model_name", str(model_dir)),
        ("dataset", str(data_dir / "train.jsonl")),
        ("data.test_file", str(data_dir / "test.jsonl")),
        ("output_dir", str(run_dir)),
    ]
    cfg = load_config(config, [*paths, *overrides])
    result = finetune(cfg, log=log)
    log("generating greedy answers on the held-out split ...")
    rate, replies = held_out_format_rate(
        cfg.model_name, str(result.adapter_dir), cfg.data.test_file, n=n_eval
    )
    figures = {
        "seconds": round(time.perf_counter() - t0, 1),
        "eval_loss_base": result.eval_losses[0] if result.eval_losses else None,
        "eval_loss_final": result.eval_losses[-1] if result.eval_losses else None,
        "format_rate": rate,
        "held_out_prompts": len(replies),
        "train_steps": result.steps,
        "adapter": str(result.adapter_dir),
        "example": replies[0] if replies else "",
    }
    figures["misses"] = demo_verdict(figures)
    log("\n=== cotune demo ===")
    log(
        f"validation loss: base model {figures['eval_loss_base']:.3f} -> adapter {figures['eval_loss_final']:.3f}"
    )
    log(f"four-stage format on {len(replies)} held-out prompts (greedy): {rate:.0%}")
    log(f"example answer: {figures['example'][:300]}")
    log(f"adapter: {result.adapter_dir}\nmetrics: {run_dir / 'metrics.jsonl'}\nplot: {run_dir / 'loss.png'}")
    log(f"total time: {figures['seconds']:.0f} s")
    for miss in figures["misses"]:
        log(f"below target: {miss}")
    if not figures["misses"]:
        log("targets met: the adapter learned the task and the four-stage format")
    (workdir / "demo.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures
