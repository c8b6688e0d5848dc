"""eval/metrics.py against hand-computed cases and, where installed, scikit-learn and SciPy."""

import math
import random

import pytest

from cotune.eval.metrics import (
    NO_ANSWER,
    binary_metrics,
    class_metrics,
    confusion_matrix,
    mcnemar,
    paired_comparison,
    roc_auc,
    wilson_interval,
)


def test_wilson_interval_hand_computed():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half 1.96 * sqrt(0.016 + 0.0009604) / 1.38416
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (None, None)


def test_wilson_matches_statsmodels_formula_via_scipy():
    stats = pytest.importorskip("scipy.stats")
    z = stats.norm.ppf(0.975)
    for k, n in [(1, 7), (13, 40), (99, 100)]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half), abs=1e-12)


GOLDS = ["cat", "cat", "cat", "dog", "dog", "bird", "bird", "bird", "bird"]
PREDS = ["cat", "dog", "", "dog", "cat", "bird", "bird", "fish", "bird"]


def test_confusion_matrix_by_hand():
    labels, m = confusion_matrix(GOLDS, PREDS)
    assert labels == ["bird", "cat", "dog", "fish", NO_ANSWER]
    assert m[labels.index("cat")] == [0, 1, 1, 0, 1]
    assert m[labels.index("bird")] == [3, 0, 0, 1, 0]
    assert sum(map(sum, m)) == len(GOLDS)


def test_class_metrics_by_hand():
    r = class_metrics(GOLDS, PREDS)
    cat = r["classes"]["cat"]
    assert cat["precision"]["k"] == 1 and cat["precision"]["n"] == 2  # cat predicted twice, right once
    assert cat["recall"]["value"] == pytest.approx(1 / 3) and cat["support"] == 3
    assert cat["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert r["accuracy"]["k"] == 5 and r["accuracy"]["n"] == 9
    assert r["micro"]["recall"] == pytest.approx(5 / 9) and r["micro"]["precision"] == pytest.approx(5 / 7)


def test_class_metrics_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    golds = [rng.choice("abc") for _ in range(200)]
    preds = [g if rng.random() < 0.6 else rng.choice(["a", "b", "c", "d", ""]) for g in golds]
    r = class_metrics(golds, preds)
    labels = ["a", "b", "c"]
    p, rec, f1, support = sk.precision_recall_fscore_support(golds, preds, labels=labels, zero_division=0)
    for i, lab in enumerate(labels):
        c = r["classes"][lab]
        assert c["precision"]["value"] == pytest.approx(p[i]) and c["recall"]["value"] == pytest.approx(
            rec[i]
        )
        assert c["f1"] == pytest.approx(f1[i]) and c["support"] == support[i]
    for avg in ("macro", "micro"):
        p, rec, f1, _ = sk.precision_recall_fscore_support(
            golds, preds, labels=labels, average=avg, zero_division=0
        )
        assert (r[avg]["precision"], r[avg]["recall"], r[avg]["f1"]) == pytest.approx((p, rec, f1))
    full_labels, m = confusion_matrix(golds, preds)
    expected = sk.confusion_matrix(
        [g or NO_ANSWER for g in golds], [p or NO_ANSWER for p in preds], labels=full_labels
    ).tolist()
    assert m == expected


def test_binary_metrics_by_hand():
    golds = ["yes"] * 6 + ["no"] * 4
    preds = ["yes", "yes", "yes", "yes", "no", "", "no", "no", "no", "yes"]
    b = binary_metrics(golds, preds)
    assert (b["tp"], b["fn"], b["tn"], b["fp"]) == (4, 1, 3, 1) and b["unanswered_positive"] == 1
    assert b["sensitivity"]["value"] == pytest.approx(4 / 6)  # the unanswered positive is missed
    assert b["specificity"]["value"] == pytest.approx(3 / 4)
    assert b["ppv"]["value"] == pytest.approx(4 / 5) and b["npv"]["value"] == pytest.approx(3 / 4)
    assert b["sensitivity"]["low"] == pytest.approx(wilson_interval(4, 6)[0])
    flipped = binary_metrics(golds, preds, positive="no")
    assert flipped["sensitivity"]["value"] == pytest.approx(3 / 4) and flipped["ppv"][
        "value"
    ] == pytest.approx(3 / 4)


def test_binary_metrics_refuse_three_classes():
    with pytest.raises(ValueError, match="two gold classes"):
        binary_metrics(["yes", "no", "maybe"], ["yes", "no", "no"])


def test_roc_auc_by_brute_force_and_sklearn():
    rng = random.Random(1)
    y = [rng.random() < 0.4 for _ in range(60)]
    s = [round(rng.random() + (0.3 if t else 0.0), 1) for t in y]  # rounded: ties
    pairs = [(a, b) for a, ya in zip(s, y) if ya for b, yb in zip(s, y) if not yb]
    brute = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    r = roc_auc(y, s)
    assert r["value"] == pytest.approx(brute) and r["low"] < r["value"] < r["high"]
    sk = pytest.importorskip("sklearn.metrics")
    assert r["value"] == pytest.approx(sk.roc_auc_score(y, s))
    assert roc_auc([True, True], [0.1, 0.2])["value"] is None


def test_roc_auc_hanley_mcneil_by_hand():
    r = roc_auc([True, True, False, False], [0.9, 0.4, 0.5, 0.1])  # 3 of 4 pairs ordered: 0.75
    a, q1, q2 = 0.75, 0.75 / 1.25, 2 * 0.5625 / 1.75
    se = math.sqrt((a * (1 - a) + (q1 - a * a) + (q2 - a * a)) / 4)
    assert r["value"] == 0.75 and r["high"] == pytest.approx(min(1.0, a + 1.959964 * se), abs=1e-6)


def test_mcnemar_exact_and_chi_square():
    assert mcnemar(1, 5)["p_value"] == pytest.approx(2 * (1 + 6) / 64)  # 2 P(X <= 1), X ~ Bin(6, 1/2)
    assert mcnemar(0, 0)["p_value"] == 1.0 and mcnemar(3, 3)["p_value"] == 1.0
    big = mcnemar(10, 30)
    assert big["statistic"] == pytest.approx(19**2 / 40)
    stats = pytest.importorskip("scipy.stats")
    assert big["p_value"] == pytest.approx(stats.chi2.sf(19**2 / 40, 1))
    assert mcnemar(4, 15)["p_value"] == pytest.approx(stats.binomtest(4, 19, 0.5).pvalue)


def test_paired_comparison():
    first = [True] * 50 + [False] * 30 + [True] * 5 + [False] * 15
    second = [True] * 50 + [False] * 30 + [False] * 5 + [True] * 15
    r = paired_comparison(first, second)
    assert (r["first_only"], r["second_only"], r["n"]) == (5, 15, 100)
    assert r["difference"] == pytest.approx(0.10) and r["accuracy_second"] - r[
        "accuracy_first"
    ] == pytest.approx(0.10)
    se = math.sqrt((20 / 100 - 0.01) / 100)
    assert (r["low"], r["high"]) == pytest.approx((0.1 - 1.959964 * se, 0.1 + 1.959964 * se), abs=1e-6)
    assert r["test"] == "exact binomial" and r["p_value"] == pytest.approx(
        2 * sum(math.comb(20, i) for i in range(6)) / 2**20
    )
    with pytest.raises(ValueError, match="same questions"):
        paired_comparison([True], [True, False])
