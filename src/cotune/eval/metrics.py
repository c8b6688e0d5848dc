"""Per-class and clinical metrics with 95% intervals, and paired comparison of two models.

Every rate comes as ``{"value", "k", "n", "low", "high"}``: ``k`` of ``n`` and its Wilson score
interval (Wilson 1927), which stays inside [0, 1] and keeps its coverage at small ``n`` and at
rates near 0 or 1, where the normal approximation does not.

* ``class_metrics``: the confusion matrix over answer classes (the labels of
  ``data.answers.normalize_answer``; an answer that gives none is the class ``NO_ANSWER``), per
  class precision, recall, F1 and support, and their macro and micro averages over the gold classes.
* ``binary_metrics``: for a yes/no task, sensitivity (recall of the positive class), specificity,
  PPV and NPV. Sensitivity and specificity are over the cases (a case with no answer counts as
  missed), PPV and NPV over the answers that said positive / negative.
* ``roc_auc``: the area under the ROC curve from a score per case (the model's probability of the
  positive answer), with Hanley and McNeil's (1982) 95% interval.
* ``paired_comparison``: two models on the same questions: accuracy difference with a 95% interval
  and McNemar's test (exact binomial below 25 discordant pairs, chi-square with continuity
  correction above).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

NO_ANSWER = "(no answer)"
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval of the proportion ``k / n`` (None, None when ``n`` is 0)."""
    if n <= 0:
        return None, None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int) -> dict[str, Any]:
    """``k`` of ``n`` with its value and Wilson 95% interval (value None when ``n`` is 0)."""
    low, high = wilson_interval(k, n)
    return {"value": k / n if n else None, "k": int(k), "n": int(n), "low": low, "high": high}


def _f1(p: float | None, r: float | None) -> float | None:
    if p is None or r is None:
        return None
    return 2 * p * r / (p + r) if p + r else 0.0


def confusion_matrix(golds: Sequence[str], preds: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """Rows: gold class, columns: predicted class; labels sorted, predicted-only ones after, no answer last.

    An empty label (no answer) is shown as ``NO_ANSWER``.
    """
    golds = [g or NO_ANSWER for g in golds]
    preds = [p or NO_ANSWER for p in preds]
    gold_labels = sorted(set(golds) - {NO_ANSWER})
    others = sorted(set(preds) - set(gold_labels) - {NO_ANSWER})
    labels = gold_labels + others + ([NO_ANSWER] if NO_ANSWER in set(preds) | set(golds) else [])
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(golds, preds):
        matrix[index[g]][index[p]] += 1
    return labels, matrix


def class_metrics(golds: Sequence[str], preds: Sequence[str]) -> dict[str, Any]:
    """Confusion matrix, per-class precision / recall / F1 / support, macro and micro averages.

    Args:
        golds: the gold class label of each case.
        preds: the predicted class label of each case ('' for no answer).

    Returns:
        ``labels``, ``matrix`` (see ``confusion_matrix``), ``classes`` ({gold class: precision and
        recall as ``rate`` dicts, f1, support}), ``macro`` and ``micro`` ({precision, recall, f1};
        over the gold classes, as scikit-learn's ``labels=`` would) and ``accuracy`` (a ``rate``).
    """
    labels, matrix = confusion_matrix(golds, preds)
    gold_labels = sorted({g for g in golds if g})
    classes = {}
    for lab in gold_labels:
        i = labels.index(lab)
        tp = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        support = sum(matrix[i])
        precision, recall = rate(tp, predicted), rate(tp, support)
        classes[lab] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision["value"], recall["value"]),
            "support": support,
        }
    n = len(golds)
    if classes:
        macro_p = [c["precision"]["value"] or 0.0 for c in classes.values()]  # undefined precision: 0
        macro = {
            "precision": sum(macro_p) / len(classes),
            "recall": sum(c["recall"]["value"] for c in classes.values()) / len(classes),
            "f1": sum(c["f1"] or 0.0 for c in classes.values()) / len(classes),
        }
    else:
        macro = {"precision": None, "recall": None, "f1": None}
    tp_all = sum(matrix[labels.index(lab)][labels.index(lab)] for lab in gold_labels)
    predicted_all = sum(sum(row[labels.index(lab)] for row in matrix) for lab in gold_labels)
    micro_p = tp_all / predicted_all if predicted_all else None
    micro_r = tp_all / n if n else None
    micro = {"precision": micro_p, "recall": micro_r, "f1": _f1(micro_p, micro_r)}
    return {
        "labels": labels,
        "matrix": matrix,
        "classes": classes,
        "macro": macro,
        "micro": micro,
        "accuracy": rate(tp_all, n),
    }


def binary_metrics(golds: Sequence[str], preds: Sequence[str], positive: str = "yes") -> dict[str, Any]:
    """Sensitivity, specificity, PPV and NPV of a two-class task (e.g. yes/no) with 95% intervals.

    Args:
        golds: gold labels; every one is ``positive`` or the negative class.
        preds: predicted labels ('' or anything else: no answer).
        positive: the positive class ('yes': "is there a fracture?"; set 'no' when "no" is the
            finding, e.g. "is the part intact?").

    Returns:
        ``positive``, ``negative``, the counts ``tp``, ``fn``, ``tn``, ``fp`` (answers that said
        the other class), ``unanswered_positive`` / ``unanswered_negative``, and the rates
        ``sensitivity`` (tp / positives), ``specificity`` (tn / negatives), ``ppv`` (tp / answers
        saying positive), ``npv`` (tn / answers saying negative), as ``rate`` dicts.
    """
    others = sorted({g for g in golds if g != positive})
    if len(others) > 1:
        raise ValueError(f"binary metrics need two gold classes; found {positive} and {', '.join(others)}")
    negative = others[0] if others else ("no" if positive == "yes" else "yes" if positive == "no" else "")
    pairs = list(zip(golds, preds))
    tp = sum(g == positive and p == positive for g, p in pairs)
    fn = sum(g == positive and p == negative for g, p in pairs)
    tn = sum(g == negative and p == negative for g, p in pairs)
    fp = sum(g == negative and p == positive for g, p in pairs)
    n_pos = sum(g == positive for g in golds)
    n_neg = len(golds) - n_pos
    return {
        "positive": positive,
        "negative": negative,
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "unanswered_positive": n_pos - tp - fn,
        "unanswered_negative": n_neg - tn - fp,
        "sensitivity": rate(tp, n_pos),
        "specificity": rate(tn, n_neg),
        "ppv": rate(tp, tp + fp),
        "npv": rate(tn, tn + fn),
    }


def roc_auc(is_positive: Sequence[bool], scores: Sequence[float]) -> dict[str, Any]:
    """Area under the ROC curve: the chance a random positive case scores above a random negative one
    (ties count half; the Mann-Whitney U statistic over n_pos x n_neg), with Hanley and McNeil's
    95% interval.

    Returns:
        ``{"value", "low", "high", "n_positive", "n_negative"}``; value None without both classes.
    """
    pos = sorted(s for s, y in zip(scores, is_positive) if y)
    neg = sorted(s for s, y in zip(scores, is_positive) if not y)
    n1, n0 = len(pos), len(neg)
    out: dict[str, Any] = {"value": None, "low": None, "high": None, "n_positive": n1, "n_negative": n0}
    if not n1 or not n0:
        return out
    # Rank-sum with mid-ranks for ties: U = sum of positive ranks - n1 (n1 + 1) / 2.
    merged = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    rank_sum, i = 0.0, 0
    while i < len(merged):
        j = i
        while j < len(merged) and merged[j][0] == merged[i][0]:
            j += 1
        mid = (i + 1 + j) / 2  # ranks i+1 .. j share their mean
        rank_sum += mid * sum(flag for _, flag in merged[i:j])
        i = j
    auc = (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc)) / (n1 * n0)
    half = Z95 * math.sqrt(max(var, 0.0))
    out.update(value=auc, low=max(0.0, auc - half), high=min(1.0, auc + half))
    return out


def _binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (twice the smaller tail)."""
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar(b: int, c: int, exact_below: int = 25) -> dict[str, Any]:
    """McNemar's test on the discordant pairs: ``b`` right only by the first, ``c`` only by the second.

    Exact binomial (two-sided) when ``b + c`` is under ``exact_below``, else the chi-square
    statistic with continuity correction, ``(|b - c| - 1)^2 / (b + c)``, on one degree of freedom.
    """
    n = b + c
    if n == 0:
        return {"test": "none (no discordant pairs)", "statistic": None, "p_value": 1.0}
    if n < exact_below:
        return {"test": "exact binomial", "statistic": None, "p_value": _binomial_two_sided(b, n)}
    stat = (abs(b - c) - 1) ** 2 / n
    return {
        "test": "chi-square, continuity-corrected",
        "statistic": stat,
        "p_value": math.erfc(math.sqrt(stat / 2)),
    }


def paired_comparison(first: Sequence[bool], second: Sequence[bool]) -> dict[str, Any]:
    """Two models' correctness on the same questions: the accuracy difference and McNemar's test.

    Args:
        first, second: per question, whether each model answered right (same order, same length).

    Returns:
        ``n``, ``accuracy_first``, ``accuracy_second``, ``difference`` (second - first) with the
        Wald 95% interval for paired proportions (``low``, ``high``), the discordant counts
        ``first_only`` and ``second_only``, and McNemar's ``test`` and ``p_value``.
    """
    if len(first) != len(second):
        raise ValueError(f"paired comparison needs the same questions: {len(first)} vs {len(second)} answers")
    n = len(first)
    b = sum(x and not y for x, y in zip(first, second))
    c = sum(y and not x for x, y in zip(first, second))
    out: dict[str, Any] = {
        "n": n,
        "accuracy_first": sum(map(bool, first)) / n if n else None,
        "accuracy_second": sum(map(bool, second)) / n if n else None,
        "first_only": b,
        "second_only": c,
        "difference": (c - b) / n if n else None,
        "low": None,
        "high": None,
    }
    if n:
        d = (c - b) / n
        se = math.sqrt(max((b + c) / n - d * d, 0.0) / n)
        out.update(low=max(-1.0, d - Z95 * se), high=min(1.0, d + Z95 * se))
    out.update(mcnemar(b, c))
    return out
