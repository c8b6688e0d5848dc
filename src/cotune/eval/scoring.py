"""From generated replies to the figures of ``cotune eval``: format, accuracy, and the per-class view.

``generation_metrics`` scores each reply's CONCLUSION against its gold answer
(``data.answers.score_answer``: by the kind of answer, with the dataset's alias table), counts
format compliance and accuracy by kind and by task; ``answer_metrics`` adds, for each kind of answer,
the confusion matrix, per-class precision / recall / F1 and, for yes/no questions, sensitivity,
specificity, PPV, NPV and ROC AUC (``eval/metrics.py``); ``compare_models`` pairs every two models
on the questions both were scored on.
"""

from __future__ import annotations

from typing import Any

from cotune.data.answers import score_answer
from cotune.data.cot import STAGES, follows_format, parse_stages
from cotune.eval.metrics import binary_metrics, class_metrics, paired_comparison, rate, roc_auc


def answer_text(reply: str, answer_from: str = "conclusion") -> str:
    """The part of a reply that is scored: its CONCLUSION ('' without one); with
    ``answer_from='reply'`` (benchmarks, as VLMEvalKit scores), the whole reply when it has none."""
    conclusion = parse_stages(reply).get("CONCLUSION", "")
    if conclusion or answer_from == "conclusion":
        return conclusion
    return reply.strip()


def _count(groups: dict[str, list[int]], key: str, correct: bool) -> None:
    groups.setdefault(key, [0, 0])
    groups[key][0] += int(correct)
    groups[key][1] += 1


def generation_metrics(
    replies: list[str],
    golds: list[str | None],
    tasks: list[str | None] | None = None,
    settings: list[dict] | None = None,
    aliases: dict[str, list[str]] | None = None,
    answer_from: str = "conclusion",
) -> dict[str, Any]:
    """Format compliance, stage presence and answer accuracy of generated replies.

    Args:
        replies: the generated replies.
        golds: the gold answer of each (None: not scored).
        tasks: a label per reply (or None) for ``accuracy_by_task``: ``{task: {"correct", "n"}}``.
        settings: per reply ``{"kind", "options"}`` (``data.answers.sample_answer_settings``);
            None: the kind is guessed from the gold answer.
        aliases: the alias table (``eval.answer_aliases``).
        answer_from: 'conclusion' (a reply without a CONCLUSION is wrong) or 'reply' (see ``answer_text``).

    Returns:
        The figures, ``accuracy_interval`` (a ``metrics.rate``) and ``scores`` (per reply, the
        ``score_answer`` dict, or None when not scored).
    """
    n = len(replies)
    settings = settings or [{} for _ in replies]
    parsed = [parse_stages(r) for r in replies]
    scores: list[dict | None] = []
    for reply, gold, s in zip(replies, golds, settings):
        if gold is None:
            scores.append(None)
            continue
        score = score_answer(
            answer_text(reply, answer_from), gold, s.get("kind"), None, s.get("options"), aliases
        )
        scores.append(score)
    scored = [s for s in scores if s is not None]
    by_kind: dict[str, list[int]] = {}
    by_task: dict[str, list[int]] = {}
    for score, task in zip(scores, tasks or [None] * n):
        if score is None:
            continue
        _count(by_kind, score["kind"], score["correct"])
        if task is not None:
            _count(by_task, task, score["correct"])
    correct = sum(s["correct"] for s in scored)
    return {
        "format_rate": sum(follows_format(r) for r in replies) / n if n else 0.0,
        "stage_rate": {s: sum(bool(p.get(s)) for p in parsed) / n if n else 0.0 for s in STAGES},
        "accuracy": correct / len(scored) if scored else None,
        "accuracy_interval": rate(correct, len(scored)),
        "exact_match": sum(s["exact"] for s in scored) / len(scored) if scored else None,
        "accuracy_by_kind": {k: {"correct": c, "n": t} for k, (c, t) in sorted(by_kind.items())},
        "accuracy_by_task": {k: {"correct": c, "n": t} for k, (c, t) in sorted(by_task.items())},
        "scored": len(scored),
        "scores": scores,
    }


def answer_metrics(
    scores: list[dict | None], positive: str = "yes", probabilities: list[float | None] | None = None
) -> dict[str, Any]:
    """The per-class view of each kind of answer.

    Args:
        scores: ``generation_metrics``' scores (None: not scored).
        positive: the positive class of yes/no questions ('yes' or 'no').
        probabilities: per reply, the model's probability of 'yes' at the CONCLUSION (or None):
            gives the yes/no ROC AUC.

    Returns:
        ``{kind: {"n", "classes": class_metrics, "binary": binary_metrics (yes/no only),
        "roc_auc": roc_auc (yes/no with probabilities)}}``; a kind with a single gold class or
        free text with more than 20 classes has no confusion matrix (``classes`` None).
    """
    out: dict[str, Any] = {}
    probabilities = probabilities or [None] * len(scores)
    kinds = sorted({s["kind"] for s in scores if s is not None})
    for kind in kinds:
        rows = [(s, p) for s, p in zip(scores, probabilities) if s is not None and s["kind"] == kind]
        golds = [s["gold_label"] for s, _ in rows]
        preds = [s["label"] for s, _ in rows]
        entry: dict[str, Any] = {"n": len(rows), "classes": None}
        if kind != "text" or len(set(golds)) <= 20:  # free text: a matrix only for a few classes
            entry["classes"] = class_metrics(golds, preds)
        if kind == "yes_no" and set(golds) <= {"yes", "no"}:
            entry["binary"] = binary_metrics(golds, preds, positive)
            pairs = [(g == positive, p) for g, (_, p) in zip(golds, rows) if p is not None]
            if pairs:
                scores_pos = [p if positive == "yes" else 1 - p for _, p in pairs]
                entry["roc_auc"] = roc_auc([y for y, _ in pairs], scores_pos)
        out[kind] = entry
    return out


def compare_models(correct: dict[str, list[bool | None]]) -> list[dict[str, Any]]:
    """Every pair of models (in order: the base first) on the questions both were scored on.

    Args:
        correct: per model, per question, right / wrong (None: not scored).

    Returns:
        One ``metrics.paired_comparison`` per pair, with ``first`` and ``second`` naming the models.
    """
    names = list(correct)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = [(x, y) for x, y in zip(correct[a], correct[b]) if x is not None and y is not None]
            result = paired_comparison([x for x, _ in both], [y for _, y in both])
            out.append({"first": a, "second": b, **result})
    return out


def consistency_accuracy(
    groups: list[dict[str, str] | None], scores: list[dict | None], categories: list[str | None]
) -> dict[str, dict[str, Any]] | None:
    """HallusionBench's three accuracies, as VLMEvalKit reports them: ``aAcc`` (per question),
    ``fAcc`` (per figure: every question asked of one picture right) and ``qAcc`` (per question:
    right on the original and on every edited picture), over all scored questions ('Overall'), per
    ``category`` and per l2 category.

    Args:
        groups: per sample its ``question_group`` (``data.benchmarks.question_group``) or None.
        scores: per sample the ``score_answer`` dict, or None when not scored.
        categories: per sample its category (or None).

    Returns:
        ``{split: {"aAcc", "fAcc", "qAcc" (fractions), "n" (questions)}}``, or None unless every
        scored sample has a group.
    """
    rows = [(g, s["correct"], c) for g, s, c in zip(groups, scores, categories) if s is not None]
    if not rows or any(g is None for g, _, _ in rows):
        return None
    splits: dict[str, list] = {"Overall": rows}
    for g, correct, category in rows:
        if category:
            splits.setdefault(category, []).append((g, correct, category))
    for g, correct, category in rows:
        if g["l2"]:
            splits.setdefault(f"l2: {g['l2']}", []).append((g, correct, category))
    return {name: _consistency(split) for name, split in splits.items()}


def _consistency(rows: list[tuple[dict[str, str], bool, Any]]) -> dict[str, Any]:
    by_figure: dict[tuple, bool] = {}
    by_question: dict[tuple, bool] = {}
    for g, correct, _ in rows:
        figure, question = (g["l2"], g["set"], g["figure"]), (g["l2"], g["set"], g["question"])
        by_figure[figure] = by_figure.get(figure, True) and bool(correct)
        by_question[question] = by_question.get(question, True) and bool(correct)
    return {
        "aAcc": sum(bool(c) for _, c, _ in rows) / len(rows),
        "fAcc": sum(by_figure.values()) / len(by_figure),
        "qAcc": sum(by_question.values()) / len(by_question),
        "n": len(rows),
    }
