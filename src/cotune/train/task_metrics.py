"""Task metrics during training: at each validation, greedy answers to a fixed, seeded subset of the
validation set, scored as ``cotune eval`` scores them (``data.answers``).

Off by default (``eval_generate_samples: 0``). The subset is drawn once, from the validation samples
that have a gold answer, with the run's seed, so every validation answers the same questions and the
accuracies are comparable step to step. Each question is answered on its own (batch of one), which
needs no padding logic: the generation code of ``cotune generate`` lives in ``infer/``, a layer
above training, and the subset is small. What it costs (seconds, tokens) is printed at each
validation. ``best_adapter_metric: accuracy`` keeps the adapter of the most accurate validation.

Under torchrun the ranks share the questions (rank r answers r, r + N, ...): every forward of a
sharded model is collective, so each rank keeps stepping (``generate(synced_gpus=True)``) until all
have finished their answer, and a rank short of a question answers one again and drops it; the
verdicts are gathered and scored as one process scores them.
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
from cotune.train import distributed


@dataclass
class TaskSubset:
    """The validation questions answered at each validation."""

    samples: list[Sample]
    golds: list[str]
    settings: list[dict] = field(default_factory=list)


def task_subset(samples: list[Sample], n: int, seed: int) -> TaskSubset | None:
    """``n`` of ``samples`` with a gold answer, drawn with ``seed`` (all of them if fewer); None when ``n`` is 0.

    Raises:
        ValueError: no validation sample has a gold answer.
    """
    if not n:
        return None
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
    synced: bool = False,
) -> tuple[str, int]:
    """The greedy reply to ``sample``'s first turn, and the tokens it took (prompt + generated).

    ``inputs_of`` puts a collated batch's model inputs on the device (the loop's ``model_inputs``);
    ``synced``: every rank of the job generates at once (a sharded model's forwards are collective).
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
        synced_gpus=synced,
    )  # fmt: skip
    new = out[0, len(ids) :].tolist()
    cut = next((i for i, t in enumerate(new) if t in eos), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True), len(ids) + min(cut + 1, len(new))


def _key(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "blank"


def _answer_share(
    model, processor, family, subset: TaskSubset, max_new_tokens: int, inputs_of, rank: int, world_size: int
) -> list[tuple]:
    """This rank's questions (``rank``, ``rank + world_size``, ...) answered: per question (its
    index, score, whether it had a CONCLUSION, tokens spent). Every rank answers as many times."""
    n, out = len(subset.samples), []
    for r in range(-(-n // world_size)):
        i = rank + r * world_size
        k = (
            i if i < n else rank % n
        )  # short of a question: answer one again, for the collectives, and drop it
        reply, spent = greedy_reply(
            model, processor, family, subset.samples[k], max_new_tokens, inputs_of, synced=world_size > 1
        )
        if i < n:
            conclusion = parse_stages(reply).get("CONCLUSION", "")
            setting = subset.settings[i]
            score = score_answer(
                conclusion, subset.golds[i], setting.get("kind"), None, setting.get("options")
            )
            out.append((i, score, bool(conclusion), spent))
    return out


def measure_task(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    subset: TaskSubset,
    max_new_tokens: int,
    inputs_of: Callable[[dict], dict],
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Answers the subset (shared by the ``world_size`` ranks, every rank calls it) and scores the answers.

    Returns:
        Flat figures for metrics.jsonl, the same on every rank: ``eval_accuracy``, ``eval_answered``
        (share of answers with a CONCLUSION), ``eval_recall_<class>`` per gold class (yes/no, option
        letters, numbers, or free text with up to 10 classes), ``eval_generate_seconds`` and
        ``eval_generate_tokens`` (all ranks').
    """
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        mine = _answer_share(model, processor, family, subset, max_new_tokens, inputs_of, rank, world_size)
    finally:
        model.train(was_training)
    answers = sorted((a for share in distributed.all_gather_object(mine) for a in share), key=lambda a: a[0])
    scores = [score for _, score, _, _ in answers]
    n = len(scores)
    figures = {
        "eval_accuracy": sum(s["correct"] for s in scores) / n,
        "eval_answered": sum(a[2] for a in answers) / n,
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
    figures["eval_generate_tokens"] = sum(a[3] for a in answers)
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
