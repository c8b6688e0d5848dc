"""The embedded default, end to end: tiny model -> synthetic data -> train -> validate -> generate."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cotune.config import load_config
from cotune.data.records import load_samples
from cotune.demo.synthetic import write_synthetic_dataset
from cotune.demo.tiny import build_tiny_mllama, is_current_build
from cotune.eval.evaluate import evaluate_models
from cotune.eval.report import write_results
from cotune.infer.adapters import AdapterSpec, load_model_with_adapters
from cotune.train.loop import finetune

# The demo's synthetic data (``write_synthetic_dataset`` arguments, with ``n_test`` from the caller).
# One large shape in the middle of a one-tile (32-pixel) picture, free-form questions on its colour
# (two in five), its outline (two in five) or whether a given shape is there. What each choice bought,
# from the search in BENCHMARKS.md: a linear probe on the mean of the frozen tiny vision features reads
# the outline at 98% here against 60% for a smaller shape in one of five places on four tiles; and with
# multiple-choice questions the adapter's captions named colour and outline right on every held-out
# question while it picked the matching option's letter at chance (a text skill the tiny model does
# not learn in the demo's minutes), so the demo asks free-form questions only.
DEMO_DATA = dict(
    n_train=1600,
    image_size=32,
    max_shapes=1,
    radius=0.3,
    positions=("center",),
    multiple_choice_rate=0.0,
    tasks=("colour", "colour", "shape", "shape", "exists"),
)

DATA_MARKER = "demo_data.json"  # the data recipe, beside the data it made
DEMO_CONFIG = Path(__file__).resolve().parent / "demo" / "demo.yaml"  # shipped in the package
# What the embedded default must show: the validation loss at most this share of the base model's,
# at least this share of greedy held-out answers in the four-stage format, at least this accuracy
# on the tasks that need the picture most (with the true images), and an overall accuracy at least
# this far above the accuracy with the images shuffled across samples (the adapter reads pictures).
TARGET_LOSS_RATIO = 0.1
TARGET_FORMAT_RATE = 0.9
TARGET_TASK_ACCURACY = {"colour": 0.8, "shape": 0.8}
TARGET_IMAGE_RELIANCE = 0.3


def unjudged(figures: dict) -> list[str]:
    """The demo's targets that ``figures`` cannot judge (a figure not measured), each as a sentence."""
    if figures.get("eval_loss_base") is None or figures.get("eval_loss_final") is None:
        return ["the validation loss target (no validation loss was measured: run_validation is off)"]
    return []


def demo_verdict(figures: dict) -> list[str]:
    """The demo's targets that ``figures`` misses, each as a sentence (empty: all met).

    A target whose figure was not measured (the validation loss with ``run_validation`` off) is
    not judged (``unjudged`` names it); the accuracy targets need no validation and are judged.
    """
    misses = []
    base, final = figures.get("eval_loss_base"), figures.get("eval_loss_final")
    if base is not None and final is not None and final > TARGET_LOSS_RATIO * base:
        misses.append(
            f"validation loss {final:.3f} is above {TARGET_LOSS_RATIO:.0%} of the base model's {base:.3f}"
        )
    if figures["format_rate"] < TARGET_FORMAT_RATE:
        misses.append(f"format rate {figures['format_rate']:.0%} is below {TARGET_FORMAT_RATE:.0%}")
    by_task = figures.get("accuracy_by_task", {})
    for task, target in TARGET_TASK_ACCURACY.items():
        accuracy = by_task.get(task, {}).get("accuracy")
        if accuracy is None:
            misses.append(f"no held-out '{task}' question was answered")
        elif accuracy < target:
            misses.append(f"'{task}' accuracy {accuracy:.0%} is below {target:.0%}")
    true, shuffled = figures.get("accuracy"), figures.get("accuracy_shuffled_images")
    if true is None or shuffled is None:
        misses.append("no answer accuracy was measured")
    elif true - shuffled < TARGET_IMAGE_RELIANCE:
        misses.append(
            f"accuracy with true images {true:.0%} is less than {TARGET_IMAGE_RELIANCE * 100:.0f} points "
            f"above the {shuffled:.0%} with shuffled images"
        )
    return misses


def _by_task(metrics: dict) -> dict:
    """``{task: {accuracy, accuracy_shuffled_images, n}}`` from ``evaluate_models``' counts."""
    true, shuffled = metrics["accuracy_by_task"], metrics.get("accuracy_by_task_shuffled_images", {})
    out = {}
    for task, c in true.items():
        s = shuffled.get(task)
        out[task] = {
            "accuracy": c["correct"] / c["n"],
            "accuracy_shuffled_images": s["correct"] / s["n"] if s else None,
            "n": c["n"],
        }
    return out


def held_out_figures(model_dir: str, adapter_dir: str, test_file: str, n: int = 100, log=print) -> dict:
    """Greedy first-turn answers of the adapter on the first ``n`` held-out samples, with the true
    images and with the images shuffled across samples: format rate, accuracy, accuracy by task."""
    model, processor, family = load_model_with_adapters(model_dir, [AdapterSpec("demo", adapter_dir)])
    samples, _ = load_samples(test_file)
    results = evaluate_models(
        model, processor, family, samples[:n], ["demo"], batch_size=20, max_new_tokens=200,
        log=lambda *_: None, image_conditions=("true", "shuffled"),
    )  # fmt: skip
    results.update(data=str(test_file), n_samples=len(samples[:n]))
    write_results(
        results, Path(adapter_dir).parent / "eval"
    )  # cotune eval's files: the studio's Answers page
    metrics = results["models"]["demo"]
    replies = [p["reply"] for p in results["predictions"]["demo"]]
    return {
        "format_rate": metrics["format_rate"],
        "accuracy": metrics["accuracy"],
        "accuracy_shuffled_images": metrics["accuracy_shuffled_images"],
        "accuracy_by_task": _by_task(metrics),
        "held_out_prompts": len(replies),
        "example": replies[0] if replies else "",
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def prepare_demo(workdir: Path, n_test: int = 100, log=print) -> tuple[Path, Path]:
    """The tiny model and the synthetic data under ``workdir``, built unless already there.

    A model written by an older version of the builders (another architecture, tokenizer or
    gates) is rebuilt rather than trained silently, and data written for another recipe (their
    ``demo_data.json`` differs) are written anew; otherwise both are reused.

    Returns:
        (model directory, data directory).
    """
    model_dir, data_dir = workdir / "tiny", workdir / "data"
    if not is_current_build(model_dir):  # missing, or written by an older cotune
        log(f"building the tiny Mllama in {model_dir}")
        build_tiny_mllama(model_dir, seed=0)
    if not is_current_data(data_dir):  # missing, or written for another demo recipe
        log(f"writing the synthetic LLaVA-CoT dataset to {data_dir}")
        write_synthetic_dataset(data_dir, n_test=n_test, **DEMO_DATA)
        (data_dir / DATA_MARKER).write_text(json.dumps(DEMO_DATA, indent=1) + "\n")
    return model_dir, data_dir


def is_current_data(data_dir: Path) -> bool:
    """True when ``data_dir`` holds synthetic data written for this version's ``DEMO_DATA``."""
    try:
        return json.loads((data_dir / DATA_MARKER).read_text()) == json.loads(json.dumps(DEMO_DATA))
    except (OSError, ValueError):
        return False


def run_demo(
    workdir: str | Path = "demo_out",
    config: str | Path = DEMO_CONFIG,
    overrides=(),
    log=print,
    n_eval: int = 100,
) -> dict:
    """Runs the whole embedded default and returns its figures (also written to ``workdir/demo.json``).

    Args:
        workdir: Where the tiny model, the data and the run go; a model written by this version of
            cotune and existing data are reused.
        config: The recipe (``cotune/demo/demo.yaml``, inside the package).
        overrides: ``(key, value)`` pairs applied over the recipe, as on the command line.
        log: Where progress lines go.
        n_eval: Held-out prompts answered greedily, with true and with shuffled images.
    """
    t0 = time.perf_counter()
    workdir = Path(workdir)
    model_dir, data_dir = prepare_demo(workdir, n_test=max(n_eval, 40), log=log)
    run_dir = workdir / "run"
    paths = [
        ("model_name", str(model_dir)),
        ("dataset", str(data_dir / "train.jsonl")),
        ("data.test_file", str(data_dir / "test.jsonl")),
        ("output_dir", str(run_dir)),
    ]
    cfg = load_config(config, [*paths, *overrides])
    result = finetune(cfg, log=log)
    log("answering held-out questions greedily, with the true images and with shuffled ones ...")
    held_out = held_out_figures(cfg.model_name, str(result.adapter_dir), cfg.data.test_file, n=n_eval)
    figures = {
        "seconds": round(time.perf_counter() - t0, 1),
        "eval_loss_base": result.eval_losses[0] if result.eval_losses else None,
        "eval_loss_final": result.eval_losses[-1] if result.eval_losses else None,
        **held_out,
        "train_steps": result.steps,
        "adapter": str(result.adapter_dir),
    }
    figures["misses"] = demo_verdict(figures)
    report(figures, run_dir, log)
    (workdir / "demo.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def report(figures: dict, run_dir: Path, log=print) -> None:
    """Prints the demo's figures and its verdict."""
    base, final = figures["eval_loss_base"], figures["eval_loss_final"]
    log("\n=== cotune demo ===")
    if base is not None and final is not None:
        log(f"validation loss: base model {base:.3f} -> adapter {final:.3f}")
    else:
        log("validation loss: not measured (run_validation is off)")
    n = figures["held_out_prompts"]
    log(f"four-stage format on {n} held-out prompts (greedy): {_pct(figures['format_rate'])}")
    log(
        f"answer accuracy: {_pct(figures['accuracy'])} with the true images, "
        f"{_pct(figures['accuracy_shuffled_images'])} with images shuffled across samples"
    )
    for task, t in figures["accuracy_by_task"].items():
        log(
            f"  {task:<9} {_pct(t['accuracy']):>5} true, {_pct(t['accuracy_shuffled_images']):>5} shuffled (n={t['n']})"
        )
    log(f"example answer: {figures['example'][:400]}")
    log(f"adapter: {figures['adapter']}\nmetrics: {run_dir / 'metrics.jsonl'}\nplot: {run_dir / 'loss.png'}")
    log(f"total time: {figures['seconds']:.0f} s")
    for miss in figures["misses"]:
        log(f"below target: {miss}")
    for target in unjudged(figures):
        log(f"not judged: {target}")
    if not figures["misses"]:
        log("targets met: the adapter learned the format and reads the pictures")
