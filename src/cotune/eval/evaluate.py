"""``cotune eval``: the base model and each adapter, side by side, on a labelled test set.

For every model (the base is ``none``; the adapters are loaded once into one PEFT model):

* **loss and perplexity**: the training loss (``data.dataset.encode_samples`` + ``PaddingCollator``,
  cross-entropy over the reply tokens, token-weighted over the whole set);
* **loss per stage**: the same per-token losses, grouped by the stage whose content holds each
  token (tags, whitespace and end-of-turn tokens go to 'other') - which stage did the adapter learn;
* from greedy generations of the first turn: **four-stage format compliance** (all tags present,
  in order, non-empty), each stage's presence, and **answer accuracy** of the CONCLUSION against the
  gold answer (the record's ``answer`` field, else the CONCLUSION of the reference reply; scored by
  ``data.answers``: yes/no, option letter or text, number, normalised text with aliases), with its
  Wilson 95% interval;
* the **per-class view** of each kind of answer (``eval/scoring.py``, ``eval/metrics.py``): confusion
  matrix, per-class precision / recall / F1, and for yes/no questions sensitivity, specificity, PPV,
  NPV and the ROC AUC of the model's P(yes) at the CONCLUSION (``eval/probability.py``);
* the **paired comparison** of every two models on the same questions (difference, McNemar's p);
* with ``--image_ablation``: the same answers, their per-class view and the CONCLUSION loss with each
  sample's images taken from another sample and with blank images (``eval/ablation.py``), and the
  image reliance.

``eval/command.py`` runs it for ``cotune eval`` and writes the files (``eval/report.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from cotune.data.answers import first_turn, gold_answer, sample_answer_settings
from cotune.data.batching import PaddingCollator, to_device
from cotune.data.chat import IGNORE_INDEX
from cotune.data.cot import STAGES, label_stages, mean_stage_losses, stage_loss_totals
from cotune.data.dataset import SFTDataset, encode_samples
from cotune.data.records import Sample
from cotune.eval.ablation import IMAGE_CONDITIONS, ablate_images
from cotune.eval.probability import yes_probabilities
from cotune.eval.report import fmt, fmt_rate
from cotune.eval.scoring import answer_metrics, compare_models, consistency_accuracy, generation_metrics
from cotune.infer.adapters import use_adapter
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


@dataclass
class AnswerSettings:
    """How ``cotune eval`` scores answers (``eval.*`` options).

    Attributes:
        kind: 'auto' (guess per record from its gold answer) or one kind for the whole dataset.
        aliases: ``{canonical answer: [other ways of saying it]}``.
        positive: the positive class of yes/no questions.
        answer_from: 'conclusion' (LLaVA-CoT) or 'reply' (benchmarks: the whole reply when it has
            no CONCLUSION, as VLMEvalKit scores).
        roc: score P(yes) at the CONCLUSION for yes/no questions (one forward pass each).
        with_loss: compute the loss against the reference replies (none in benchmark files).
    """

    kind: str = "auto"
    aliases: dict | None = None
    positive: str = "yes"
    answer_from: str = "conclusion"
    roc: bool = True
    with_loss: bool = True


def generate_replies(
    model: torch.nn.Module, processor: Any, family: ModelFamily, samples: list[Sample], batch_size: int,
    max_new_tokens: int, label: str,
) -> tuple[list[str], TokenMeter]:  # fmt: skip
    """Greedy first-turn replies to ``samples`` (the active adapter), batched by prompt length."""
    turns = [first_turn(s) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: len(str(turns[i][0])))  # similar lengths batch well
    replies: list[str] = [""] * len(samples)
    meter = TokenMeter()
    bar = tqdm(total=len(samples), desc=f"generating ({label})", dynamic_ncols=True)
    for k in range(0, len(order), batch_size):
        index = order[k : k + batch_size]
        prompts = [(turns[i][0], samples[i].images) for i in index]
        out = generate(model, processor, family, prompts, max_new_tokens=max_new_tokens, meter=meter)
        for i, reply in zip(index, out):
            replies[i] = reply
        bar.update(len(index))
    bar.close()
    return replies, meter


def _no_loss() -> dict[str, Any]:
    nan = float("nan")
    stages = {s: None for s in (*STAGES, "other")}
    return {"loss": nan, "perplexity": nan, "label_tokens": 0, "stage_loss": stages, "stage_tokens": {}}


def _reference_loss(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    samples: list[Sample],
    batch_size: int,
    max_seq_len: int,
    overlength: str,
    label: str,
    log=print,
) -> dict[str, Any]:
    """The active adapter's loss against the reference replies, in total and per stage.

    Args:
        samples: the samples, encoded exactly as training encodes them.
        max_seq_len: the longest sample kept whole; longer ones follow ``overlength``.
        overlength: ``data.overlength`` ('drop' or 'truncate'), as in training.
        label: the model and condition, for the progress bar.
        log: where the samples left out of the loss are named.

    Returns:
        ``loss_by_stage``'s metrics.
    """
    encoded, problems, _ = encode_samples(samples, processor, family, max_seq_len, overlength)
    for p in problems:
        log(f"eval: left out of the loss: {p}")
    dataset = SFTDataset(encoded, processor, family)
    stages = [label_stages(processor.tokenizer, e.input_ids, e.labels) for e in encoded]
    return loss_by_stage(model, processor, family, dataset, stages, batch_size, f"loss ({label})")


def _yes_no_probabilities(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    samples: list[Sample],
    replies: list[str],
    golds: list[Any],
    settings: list[dict[str, Any]],
    batch_size: int,
) -> list[float | None]:
    """The active adapter's P(yes) at the CONCLUSION of each reply to a yes/no question.

    Args:
        replies: the model's replies to ``samples``, in order.
        golds: each sample's gold answer (None: unscored, so no probability either).
        settings: each sample's answer settings (``sample_answer_settings``); only 'yes_no' is scored.

    Returns:
        Per sample, P(yes), or None where it is not a scored yes/no question.
    """
    yes_no = [i for i, (g, st) in enumerate(zip(golds, settings)) if g is not None and st["kind"] == "yes_no"]
    probabilities: list[float | None] = [None] * len(samples)
    if not yes_no:  # no forward passes (nor model inputs) without a yes/no question
        return probabilities
    prompts = [(first_turn(samples[i])[0], samples[i].images) for i in yes_no]
    probs = yes_probabilities(model, processor, family, prompts, [replies[i] for i in yes_no], batch_size)
    for i, p in zip(yes_no, probs):
        probabilities[i] = p
    return probabilities


def _consistency_figures(samples: list[Sample], scores: list[dict | None]) -> dict[str, Any]:
    """``{"consistency": ...}`` (``scoring.consistency_accuracy``) where the samples carry
    HallusionBench's question groups, else {}."""
    groups = [s.meta.get("question_group") for s in samples]
    consistency = consistency_accuracy(groups, scores, [s.meta.get("category") for s in samples])
    return {} if consistency is None else {"consistency": consistency}


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
    answers: AnswerSettings | None = None,
) -> dict[str, Any]:
    """Loss (in total and per stage), greedy first-turn replies and their scores, one adapter.

    Samples longer than ``max_seq_len`` are dropped from the loss or truncated (``overlength``), as
    training does.

    Returns:
        The metrics of ``loss_by_stage`` and ``scoring.generation_metrics`` (with ``scores``), the
        per-class view (``answers``), ``replies``, P(yes) per reply (``yes_probability``, None
        where not a yes/no question) and the generation cost.
    """
    answers = answers or AnswerSettings()
    label = f"{name}{desc}"
    settings = [sample_answer_settings(s, answers.kind) for s in samples]
    golds = [gold_answer(s) for s in samples]
    with use_adapter(model, name):
        if answers.with_loss:
            metrics = _reference_loss(
                model, processor, family, samples, batch_size, max_seq_len, overlength, label, log
            )
        else:
            metrics = _no_loss()
        start = time.perf_counter()
        replies, meter = generate_replies(
            model, processor, family, samples, batch_size, max_new_tokens, label
        )
        seconds = time.perf_counter() - start
        probabilities: list[float | None] = [None] * len(samples)
        if answers.roc:
            probabilities = _yes_no_probabilities(
                model, processor, family, samples, replies, golds, settings, batch_size
            )
    metrics.update(
        generation_metrics(
            replies, golds, [sample_task(s) for s in samples], settings, answers.aliases, answers.answer_from
        )
    )
    metrics["answers"] = answer_metrics(metrics["scores"], answers.positive, probabilities)
    metrics.update(_consistency_figures(samples, metrics["scores"]))
    metrics["replies"] = replies
    metrics["yes_probability"] = probabilities
    metrics["generated_tokens_per_reply"] = meter.generated / max(len(samples), 1)
    metrics["generation_seconds"] = round(seconds, 2)
    return metrics


def _ablation_figures(suffix: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The keys an image condition adds to a model's results: accuracy, CONCLUSION loss, by task, by class."""
    return {
        f"accuracy{suffix}": metrics["accuracy"],
        f"accuracy_interval{suffix}": metrics["accuracy_interval"],
        f"conclusion_loss{suffix}": metrics["stage_loss"]["CONCLUSION"],
        f"format_rate{suffix}": metrics["format_rate"],
        f"accuracy_by_task{suffix}": metrics["accuracy_by_task"],
        f"answers{suffix}": metrics["answers"],
    }


def _evaluate_ablations(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    ablated: dict[str, list[Sample]],
    name: str,
    batch_size: int,
    max_new_tokens: int,
    max_seq_len: int,
    overlength: str,
    answers: AnswerSettings | None,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """One adapter on the samples with their images changed, once per image condition.

    Args:
        ablated: per image condition ('shuffled', 'blank'), the samples with their images changed.
        name: the adapter ('none': the base).

    Returns:
        The keys the conditions add to the model's results (``_ablation_figures``), and per
        condition the replies, keyed as predictions.jsonl names them (``reply_shuffled_images``, ...).
    """
    figures: dict[str, Any] = {}
    other_replies: dict[str, list[str]] = {}
    for condition, changed in ablated.items():
        # silent: the true-image pass already named the samples left out of the loss
        other = evaluate_condition(
            model, processor, family, changed, name, batch_size, max_new_tokens, max_seq_len,
            log=lambda *_: None, desc=f", {condition} images", overlength=overlength, answers=answers,
        )  # fmt: skip
        figures.update(_ablation_figures(IMAGE_CONDITIONS[condition], other))
        other_replies["reply" + IMAGE_CONDITIONS[condition]] = other["replies"]
    return figures, other_replies


def _prediction_rows(
    samples: list[Sample],
    golds: list[Any],
    replies: list[str],
    scores: list[dict[str, Any] | None],
    probabilities: list[float | None],
    other_replies: dict[str, list[str]],
) -> list[dict[str, Any]]:
    """One model's rows of predictions.jsonl: per sample its id, gold, reply, score and P(yes).

    Args:
        other_replies: the replies under each image condition (``_evaluate_ablations``), added to
            each row under their keys.

    Returns:
        One dict per sample, in the order of ``samples``.
    """
    return [
        {
            "id": s.id,
            "gold": g,
            "reply": r,
            "score": sc,
            "yes_probability": p,
            **{k: v[i] for k, v in other_replies.items()},
        }
        for i, (s, g, r, sc, p) in enumerate(zip(samples, golds, replies, scores, probabilities))
    ]


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
    answers: AnswerSettings | None = None,
) -> dict[str, Any]:
    """Evaluates each adapter of ``names`` ('none': the base) on ``samples``; see the module docstring.

    Args:
        image_conditions: ``ablation.IMAGE_CONDITIONS`` to run besides the true images: with
            'shuffled' and/or 'blank', each model's results gain ``accuracy_shuffled_images``,
            ``conclusion_loss_shuffled_images``, ``answers_shuffled_images`` (the per-class view;
            and the ``_blank_images`` keys) and ``image_reliance`` (accuracy with true minus
            shuffled images).
        seed: Seed of the image shuffle.
        overlength: ``data.overlength`` for samples over ``max_seq_len``.
        answers: how answers are scored (``AnswerSettings``).

    Returns:
        ``models`` (per model its metrics), ``predictions`` (per model, per sample: id, gold, reply,
        score, yes_probability) and ``comparisons`` (every pair of models: ``scoring.compare_models``).
    """
    golds = [gold_answer(s) for s in samples]
    ablated = {c: ablate_images(samples, c, seed) for c in image_conditions if c != "true"}
    results: dict[str, Any] = {"models": {}, "predictions": {}}
    correct: dict[str, list[bool | None]] = {}
    for name in names:
        metrics = evaluate_condition(
            model, processor, family, samples, name, batch_size, max_new_tokens, max_seq_len, log,
            overlength=overlength, answers=answers,
        )  # fmt: skip
        replies, scores = metrics.pop("replies"), metrics.pop("scores")
        probabilities = metrics.pop("yes_probability")
        metrics["conclusion_loss"] = metrics["stage_loss"]["CONCLUSION"]
        figures, other_replies = _evaluate_ablations(
            model, processor, family, ablated, name, batch_size, max_new_tokens, max_seq_len,
            overlength, answers,
        )  # fmt: skip
        metrics.update(figures)
        if "shuffled" in ablated and metrics["accuracy"] is not None:
            metrics["image_reliance"] = metrics["accuracy"] - metrics["accuracy_shuffled_images"]
        results["models"][name] = metrics
        correct[name] = [None if sc is None else sc["correct"] for sc in scores]
        results["predictions"][name] = _prediction_rows(
            samples, golds, replies, scores, probabilities, other_replies
        )
        log(summary_line(name, metrics, ablated))
    results["comparisons"] = compare_models(correct)
    return results


def summary_line(name: str, metrics: dict[str, Any], conditions) -> str:
    """One line per model: loss, format, accuracy with its interval, and per image condition."""
    acc = metrics["accuracy_interval"]
    line = f"eval [{name}]: "
    if metrics["loss"] == metrics["loss"]:  # not NaN: there were reference replies
        line += f"loss {metrics['loss']:.4f} (ppl {metrics['perplexity']:.2f}), "
    line += f"format {metrics['format_rate']:.0%}, accuracy {fmt_rate(acc)}"
    for condition in conditions:
        line += f", with {condition} images {fmt(metrics['accuracy' + IMAGE_CONDITIONS[condition]], 'pct')}"
    return line
