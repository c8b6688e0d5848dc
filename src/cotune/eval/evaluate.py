"""``cotune eval``: the base model and each adapter, side by side, on a labelled test set.

For every model (the base is ``none``; the adapters are loaded once into one PEFT model):

* **loss and perplexity**: the training loss (``data.dataset.encode_samples`` + ``PaddingCollator``,
  cross-entropy over the reply tokens, token-weighted over the whole set);
* **loss per stage**: the same per-token losses, grouped by the stage whose content holds each
  token (tags, whitespace and end-of-turn tokens go to 'other') - which stage did the adapter learn;
* from greedy generations of the first turn: **four-stage format compliance** (all tags present,
  in order, non-empty), each stage's presence, and **answer accuracy** of the CONCLUSION against the
  gold answer (the record's ``answer`` field, else the CONCLUSION of the reference reply; scored by
  ``cot.score_answer``: letter, number or normalised exact match).

* with ``--image_ablation``: the same answers and the CONCLUSION loss with each sample's images
  taken from another sample and with blank images (``eval/ablation.py``), and the image reliance.

Writes ``eval.json`` (everything), ``eval.md`` (a table, one column per model) and
``predictions.jsonl`` (every reply) to the output folder (``eval/report.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cotune.data.answers import answer_kind, score_answer
from cotune.data.batching import PaddingCollator, to_device
from cotune.data.build import load_data_file
from cotune.data.chat import IGNORE_INDEX
from cotune.data.cot import (
    STAGES,
    follows_format,
    label_stages,
    mean_stage_losses,
    parse_stages,
    stage_loss_totals,
)
from cotune.data.dataset import SFTDataset, encode_samples
from cotune.data.records import Sample, report_problems
from cotune.eval.ablation import IMAGE_CONDITIONS, ablate_images
from cotune.eval.report import fmt, markdown_table, write_results
from cotune.infer.adapters import NONE, AdapterSpec, load_model_with_adapters, use_adapter
from cotune.infer.generate import TokenMeter, generate, model_device_dtype
from cotune.models.families import ModelFamily
from cotune.train.loss import ChunkedLossModel
from cotune.train.metrics import perplexity


@torch.no_grad()
def label_token_losses(
    model: torch.nn.Module, inputs: dict, labels: torch.Tensor, chunk_size: int = 2048
) -> torch.Tensor:
    """Per-token cross-entropy at every labelled position: the training loss (``train.loss``) unsummed.

    Returns:
        (batch, seq) fp32 losses; ``out[b, j]`` is the loss of predicting ``labels[b, j]`` from the
        positions before it, 0 where there is no label. Its sum is ChunkedLossModel's loss sum.
    """
    return ChunkedLossModel(model, chunk_size)(labels, per_token=True, **inputs)[0]


def first_turn(sample: Sample) -> tuple[list[dict], str]:
    """The messages before the first reply, and that reply's text (the reference)."""
    k = next(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
    reply = sample.messages[k]["content"]
    text = reply if isinstance(reply, str) else "".join(c.get("text", "") for c in reply)
    return sample.messages[:k], text


def gold_answer(sample: Sample) -> str | None:
    """The record's ``answer`` field, else the CONCLUSION of the reference reply, else None."""
    answer = sample.meta.get("answer")
    if isinstance(answer, str | int | float) and str(answer).strip():
        return str(answer).strip()
    return parse_stages(first_turn(sample)[1]).get("CONCLUSION") or None


def loss_by_stage(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    dataset: SFTDataset,
    stages: list[list[str | None]],
    batch_size: int,
    desc: str = "loss",
) -> dict[str, Any]:
    """Token-weighted loss over the dataset, in total and per stage (``stages``: per sample, per position)."""
    tokenizer = processor.tokenizer
    collate = PaddingCollator(tokenizer.pad_token_id, family, family.image_token_id(tokenizer))
    device, dtype = model_device_dtype(model)
    total, count = 0.0, 0
    totals = {s: [0.0, 0] for s in (*STAGES, "other")}
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, dynamic_ncols=True, leave=False):
        index = list(range(start, min(start + batch_size, len(dataset))))
        items = [dataset[i] for i in index]
        kept = [i for i, it in zip(index, items) if it is not None and "error" not in it]
        batch = collate(items)
        if batch.get("empty"):
            continue
        inputs = {k: v for k, v in family.model_inputs(batch).items() if k != "labels"}
        inputs = to_device(inputs, device, float_dtype=dtype)
        labels = batch["labels"].to(device)
        losses = label_token_losses(model, inputs, labels).cpu()
        has_label = batch["labels"] != IGNORE_INDEX
        has_label[:, 0] = False  # the first position is never predicted
        total += float(losses[has_label].sum())
        count += int(has_label.sum())
        for row, i in enumerate(kept):
            positions = has_label[row].nonzero().flatten().tolist()
            part = stage_loss_totals(
                [float(losses[row, j]) for j in positions], [stages[i][j] for j in positions]
            )
            for s, (v, n) in part.items():
                totals[s][0] += v
                totals[s][1] += n
    loss = total / count if count else float("nan")
    return {
        "loss": loss,
        "perplexity": perplexity(loss),
        "label_tokens": count,
        "stage_loss": mean_stage_losses(totals),
        "stage_tokens": {s: int(v[1]) for s, v in totals.items()},
    }


def sample_task(sample: Sample) -> str | None:
    """The record's ``task`` field (a label for grouping accuracy, e.g. 'colour'), if it has one."""
    task = sample.meta.get("task")
    return str(task) if isinstance(task, str | int) and str(task).strip() else None


def generation_metrics(
    replies: list[str], golds: list[str | None], tasks: list[str | None] | None = None
) -> dict[str, Any]:
    """Format compliance, stage presence and answer accuracy of generated replies.

    ``tasks`` (one label or None per reply) adds ``accuracy_by_task``: ``{task: {"correct", "n"}}``.
    """
    n = len(replies)
    parsed = [parse_stages(r) for r in replies]
    scores = [
        score_answer(p.get("CONCLUSION", ""), g) if g is not None and p.get("CONCLUSION") else None
        for p, g in zip(parsed, golds)
    ]
    scored = [(s, g) for s, g in zip(scores, golds) if g is not None]
    by_kind: dict[str, list[int]] = {}
    for score, gold in scored:
        kind = score["kind"] if score else answer_kind(gold)
        by_kind.setdefault(kind, [0, 0])
        by_kind[kind][0] += int(bool(score and score["correct"]))
        by_kind[kind][1] += 1
    by_task: dict[str, list[int]] = {}
    for score, gold, task in zip(scores, golds, tasks or [None] * n):
        if gold is not None and task is not None:
            by_task.setdefault(task, [0, 0])
            by_task[task][0] += int(bool(score and score["correct"]))
            by_task[task][1] += 1
    n_scored = len(scored)
    return {
        "format_rate": sum(follows_format(r) for r in replies) / n if n else 0.0,
        "stage_rate": {s: sum(bool(p.get(s)) for p in parsed) / n if n else 0.0 for s in STAGES},
        "accuracy": sum(bool(s and s["correct"]) for s, _ in scored) / n_scored if n_scored else None,
        "exact_match": sum(bool(s and s["exact"]) for s, _ in scored) / n_scored if n_scored else None,
        "accuracy_by_kind": {k: {"correct": c, "n": t} for k, (c, t) in sorted(by_kind.items())},
        "accuracy_by_task": {k: {"correct": c, "n": t} for k, (c, t) in sorted(by_task.items())},
        "scored": n_scored,
        "scores": scores,
    }


def evaluate_condition(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    samples: list[Sample],
    name: str,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    max_seq_len: int = 4096,
    log=print,
    desc: str = "",
    overlength: str = "drop",
) -> dict[str, Any]:
    """Loss (in total and per stage) and greedy first-turn replies of one adapter on ``samples``.

    Samples longer than ``max_seq_len`` are dropped from the loss or truncated (``overlength``), as
    training does.

    Returns:
        The metrics of ``loss_by_stage`` and ``generation_metrics`` (with ``scores``), plus
        ``replies`` and the generation cost.
    """
    tokenizer = processor.tokenizer
    encoded, problems, _ = encode_samples(samples, processor, family, max_seq_len, overlength)
    for p in problems:
        log(f"eval: left out of the loss: {p}")
    dataset = SFTDataset(encoded, processor, family)
    stages = [label_stages(tokenizer, e.input_ids, e.labels) for e in encoded]
    turns = [first_turn(s) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: len(str(turns[i][0])))  # similar lengths batch well
    label = f"{name}{desc}"
    with use_adapter(model, name):
        metrics = loss_by_stage(model, processor, family, dataset, stages, batch_size, f"loss ({label})")
        replies: list[str] = [""] * len(samples)
        meter, start = TokenMeter(), time.perf_counter()
        bar = tqdm(total=len(samples), desc=f"generating ({label})", dynamic_ncols=True)
        for k in range(0, len(order), batch_size):
            index = order[k : k + batch_size]
            prompts = [(turns[i][0], samples[i].images) for i in index]
            out = generate(model, processor, family, prompts, max_new_tokens=max_new_tokens, meter=meter)
            for i, reply in zip(index, out):
                replies[i] = reply
            bar.update(len(index))
        bar.close()
    golds = [gold_answer(s) for s in samples]
    metrics.update(generation_metrics(replies, golds, [sample_task(s) for s in samples]))
    metrics["replies"] = replies
    metrics["generated_tokens_per_reply"] = meter.generated / max(len(samples), 1)
    metrics["generation_seconds"] = round(time.perf_counter() - start, 2)
    return metrics


def _ablation_figures(suffix: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The keys an image condition adds to a model's results: accuracy, CONCLUSION loss, by task."""
    return {
        f"accuracy{suffix}": metrics["accuracy"],
        f"conclusion_loss{suffix}": metrics["stage_loss"]["CONCLUSION"],
        f"format_rate{suffix}": metrics["format_rate"],
        f"accuracy_by_task{suffix}": metrics["accuracy_by_task"],
    }


def evaluate_models(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    samples: list[Sample],
    names: list[str],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    max_seq_len: int = 4096,
    log=print,
    image_conditions: tuple[str, ...] = ("true",),
    seed: int = 0,
    overlength: str = "drop",
) -> dict[str, Any]:
    """Evaluates each adapter of ``names`` ('none': the base) on ``samples``; see the module docstring.

    Args:
        image_conditions: ``ablation.IMAGE_CONDITIONS`` to run besides the true images: with
            'shuffled' and/or 'blank', each model's results gain ``accuracy_shuffled_images``,
            ``conclusion_loss_shuffled_images`` (and the ``_blank_images`` keys) and
            ``image_reliance`` (accuracy with true minus shuffled images).
        seed: Seed of the image shuffle.
        overlength: ``data.overlength`` for samples over ``max_seq_len``.
    """
    golds = [gold_answer(s) for s in samples]
    ablated = {c: ablate_images(samples, c, seed) for c in image_conditions if c != "true"}
    results: dict[str, Any] = {"models": {}, "predictions": {}}
    for name in names:
        metrics = evaluate_condition(
            model, processor, family, samples, name, batch_size, max_new_tokens, max_seq_len, log,
            overlength=overlength,
        )  # fmt: skip
        replies, scores = metrics.pop("replies"), metrics.pop("scores")
        metrics["conclusion_loss"] = metrics["stage_loss"]["CONCLUSION"]
        other_replies: dict[str, list[str]] = {}  # predictions.jsonl's reply_shuffled_images, ...
        for condition, changed in ablated.items():
            other = evaluate_condition(
                model, processor, family, changed, name, batch_size, max_new_tokens, max_seq_len,
                log=lambda *_: None, desc=f", {condition} images", overlength=overlength,
            )  # fmt: skip
            metrics.update(_ablation_figures(IMAGE_CONDITIONS[condition], other))
            other_replies["reply" + IMAGE_CONDITIONS[condition]] = other["replies"]
        if "shuffled" in ablated and metrics["accuracy"] is not None:
            metrics["image_reliance"] = metrics["accuracy"] - metrics["accuracy_shuffled_images"]
        results["models"][name] = metrics
        results["predictions"][name] = [
            {"id": s.id, "gold": g, "reply": r, "score": sc, **{k: v[i] for k, v in other_replies.items()}}
            for i, (s, g, r, sc) in enumerate(zip(samples, golds, replies, scores))
        ]
        acc = metrics["accuracy"]
        line = (
            f"eval [{name}]: loss {metrics['loss']:.4f} (ppl {metrics['perplexity']:.2f}), "
            f"format {metrics['format_rate']:.0%}, accuracy {fmt(acc, 'pct')}"
        )
        for condition in ablated:
            line += (
                f", with {condition} images {fmt(metrics['accuracy' + IMAGE_CONDITIONS[condition]], 'pct')}"
            )
        log(line)
    return results


def run_eval(cfg: Any, specs: list[AdapterSpec], log=print) -> dict[str, Any]:
    """What ``cotune eval`` runs: load once, evaluate the base ('none') and every adapter, write the files.

    Args:
        cfg: ``cotune eval``'s options (``cotune.config``): the model (``model_name``,
            ``tokenizer_name``, ``torch_dtype``, ``device``), ``data`` (the file ``test_file``,
            read, rendered and length-limited exactly as training does: format, columns, image_root,
            system_prompt, on_error, max_seq_len, overlength), ``generation.max_new_tokens`` and
            ``eval`` (batch_size, limit, image_ablation, output_dir).
        specs: the adapters. The base is evaluated too unless ``specs`` is only ``none`` (then it
            alone is). With ``eval.image_ablation``, every model is also evaluated with shuffled and
            with blank images.
        log: where progress and the table go.
    """
    d, e, max_new_tokens = cfg.data, cfg.eval, cfg.generation.max_new_tokens
    names = [s.name for s in specs]
    if NONE not in names:
        names = [NONE, *names]
    model, processor, family = load_model_with_adapters(
        cfg.model_name, specs, cfg.torch_dtype, cfg.device, cfg.tokenizer_name,
        cfg.quantization, cfg.quantization_config,
    )  # fmt: skip
    processor.date_string = d.date_string  # the template's date, as training rendered it
    samples, problems = load_data_file(cfg, d.test_file, log)
    report_problems(problems, d.on_error, len(samples) + len(problems), log=log)
    if e.limit:
        samples = samples[: e.limit]
    if not samples:
        raise FileNotFoundError(f"{d.test_file}: no usable samples to evaluate")
    conditions = tuple(IMAGE_CONDITIONS) if e.image_ablation else ("true",)
    results = evaluate_models(
        model, processor, family, samples, names, e.batch_size, max_new_tokens, d.max_seq_len, log,
        conditions, overlength=d.overlength,
    )  # fmt: skip
    results.update(
        image_conditions=list(conditions),
        data=str(d.test_file),
        n_samples=len(samples),
        model_name=str(cfg.model_name),
        adapters={s.name: s.path for s in specs if s.path},
        max_new_tokens=max_new_tokens,
        max_seq_len=d.max_seq_len,
    )
    first = next((s.path for s in specs if s.path), None)
    out_dir = e.output_dir or (str(Path(first).parent / "eval") if first else "eval")
    paths = write_results(results, out_dir)
    log(markdown_table(results))
    log(f"eval: wrote {paths['json']}, {paths['md']} and {paths['predictions']}")
    return results


def run_eval_command(cfg: Any) -> int:
    """``cotune eval``: the base and each adapter on ``data.test_file``, read as training reads it."""
    from cotune.config import ConfigError
    from cotune.infer.commands import adapter_specs

    if not cfg.data.test_file:
        raise ConfigError(
            "cotune eval needs --data TEST.jsonl (or data.test_file in CONFIG.yaml): a labelled file"
        )
    run_eval(cfg, adapter_specs(cfg))
    return 0
