"""Task metrics during training: at each validation, greedy answers to a fixed, seeded subset of the
validation set, scored as ``cotune eval`` scores them (``data.answers``).

Off by default (``eval_generate_samples: 0``). The subset is drawn once, from the validation samples
that have a gold answer, with the run's seed, so every validation answers the same questions and the
accuracies are comparable step to step. Each question is answered on its own (batch of one), which
needs no padding logic: the generation code of ``cotune generate`` lives in ``infer/``, a layer
above training, and the subset is small. What it costs (seconds, tokens) is printed at each
validation. ``best_adapter_metric: accuracy`` keeps the adapter of the most accurate validation.

Several processes (FSDP over ranks) are not supported yet: every rank would have to run the same
number of forward passes while their answers end at different lengths.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cotune.data.answers import first_turn, gold_answer, sample_answer_settings, score_answer
from cotune.data.batching import PaddingCollator
from cotune.data.chat import prompt_ids
from cotune.data.cot import parse_stages
from cotune.data.images import load_image
from cotune.data.sample import Sample
from cotune.models.families import ModelFamily


@dataclass
class TaskSubset:
    """The validation questions answered at each validation."""

    samples: list[Sample]
    golds: list[str]
    settings: list[dict] = field(default_factory=list)


def task_subset(samples: list[Sample], n: int, seed: int, world_size: int = 1) -> TaskSubset | None:
    """``n`` of ``samples`` with a gold answer, drawn with ``seed`` (all of them if fewer); None when ``n`` is 0.

    Raises:
        ValueError: several processes, or no validation sample has a gold answer.
    """
    if not n:
        return None
    if world_size > 1:
        raise ValueError(
            "eval_generate_samples runs in one process only (not yet under torchrun with several processes): "
            "set eval_generate_samples 0 there and run `cotune eval` on the saved adapters"
        )
    answered = [s for s in samples if gold_answer(s) is not None]
    if not answered:
        raise ValueError(
            "eval_generate_samples: no validation record has a gold answer (an 'answer' field, or a reference "
            "reply with a <CONCLUSION>); set eval_generate_samples 0"
        )
    picked = sorted(random.Random(seed).sample(range(len(answered)), min(n, len(answered))))
    chosen = [answered[i] for i in picked]
    golds = [str(gold_answer(s)) for s in chosen]
    return TaskSubset(chosen, golds, [sample_answer_settings(s) for s in chosen])


@torch.no_grad()
def greedy_reply(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    sample: Sample,
    max_new_tokens: int,
    inputs_of: Callable[[dict], dict],
) -> tuple[str, int]:
    """The greedy reply to ``sample``'s first turn, and the tokens it took (prompt + generated).

    ``inputs_of`` puts a collated batch's model inputs on the device (the loop's ``model_inputs``).
    """
    tokenizer = processor.tokenizer
    messages = first_turn(sample)[0]
    ids = prompt_ids(processor, messages, family.image_token, family.tokens_per_image(processor))
    item: dict[str, Any] = {"input_ids": torch.tensor(ids), "labels": torch.full((len(ids),), -100)}
    if sample.images:
        item.update(family.image_inputs(processor, [[load_image(r) for r in sample.images]]))
    batch = PaddingCollator(tokenizer.pad_token_id, family, family.image_token_id(tokenizer))([item])
    inputs = {k: v for k, v in inputs_of(batch).items() if k != "labels"}
    eos = family.end_of_turn_ids(tokenizer)
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None, use_cache=True,
    )  # fmt: skip
    new = out[0, len(ids) :].tolist()
    cut = next((i for i, t in enumerate(new) if t in eos), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True), len(ids) + min(cut + 1, len(new))


def _key(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "blank"


def measure_task(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    subset: TaskSubset,
    max_new_tokens: int,
    inputs_of: Callable[[dict], dict],
) -> dict[str, float]:
    """Answers the subset and scores the answers.

    Returns:
        Flat figures for metrics.jsonl: ``eval_accuracy``, ``eval_answered`` (share of answers with
        a CONCLUSION), ``eval_recall_<class>`` per gold class (yes/no, option letters, numbers, or
        free text with up to 10 classes), ``eval_generate_seconds`` and ``eval_generate_tokens``.
    """
    was_training = model.training
    model.eval()
    start, tokens, scores, answered = time.perf_counter(), 0, [], 0
    try:
        for sample, gold, setting in zip(subset.samples, subset.golds, subset.settings):
            reply, spent = greedy_reply(model, processor, family, sample, max_new_tokens, inputs_of)
            tokens += spent
            conclusion = parse_stages(reply).get("CONCLUSION", "")
            answered += bool(conclusion)
            scores.append(score_answer(conclusion, gold, setting.get("kind"), None, setting.get("options")))
    finally:
        model.train(was_training)
    n = len(scores)
    figures = {
        "eval_accuracy": sum(s["correct"] for s in scores) / n,
        "eval_answered": answered / n,
        "eval_generate_n": n,
    }
    by_class: dict[str, list[int]] = {}
    for s in scores:
        by_class.setdefault(s["gold_label"], [0, 0])
        by_class[s["gold_label"]][0] += int(s["correct"])
        by_class[s["gold_label"]][1] += 1
    if len(by_class) <= 10:
        figures |= {f"eval_recall_{_key(c)}": k / m for c, (k, m) in sorted(by_class.items())}
    figures["eval_generate_seconds"] = round(time.perf_counter() - start, 2)
    figures["eval_generate_tokens"] = tokens
    return figures


def describe(figures: dict[str, float]) -> str:
    """One log line: accuracy, recall per class, and the cost."""
    per_class = ", ".join(
        f"{k[len('eval_recall_') :]} {v:.0%}" for k, v in figures.items() if k.startswith("eval_recall_")
    )
    return (
        f"task metrics: accuracy {figures['eval_accuracy']:.1%} on {figures['eval_generate_n']} questions"
        + (f" (recall: {per_class})" if per_class else "")
        + f"; answered with a CONCLUSION {figures['eval_answered']:.0%}; cost {figures['eval_generate_seconds']:.1f} s, "
        f"{figures['eval_generate_tokens']:,} forward tokens"
    )
