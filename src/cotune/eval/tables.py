"""The per-class tables of ``eval.md``: per answer kind, the yes/no clinical table (sensitivity,
specificity, PPV, NPV, ROC AUC), precision / recall / F1 per class, the confusion matrices (also
as PNGs), and the paired comparison of every two models (accuracy difference, McNemar's p)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cotune.eval.ablation import IMAGE_CONDITIONS

KIND_NAMES = {"yes_no": "yes/no", "choice": "multiple choice", "number": "numbers", "text": "free text"}


def fmt(value: Any, kind: str = "float") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if kind == "pct":
        return f"{value:.1%}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def fmt_rate(r: dict | None, counts: bool = True) -> str:
    """A ``metrics.rate`` as '85.0% (72.1-92.6%) 17/20'; '-' when undefined."""
    if not r or r.get("value") is None:
        return "-" + (f" 0/{r['n']}" if r and counts else "")
    text = f"{r['value']:.1%} ({r['low']:.1%}-{r['high']:.1%})"
    return text + (f" {r['k']}/{r['n']}" if counts else "")


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = "| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1) + "\n"
    return out + "".join("| " + " | ".join(r) + " |\n" for r in rows)


def _auc(r: dict | None) -> str:
    if not r or r.get("value") is None:
        return "-"
    return f"{r['value']:.3f} ({r['low']:.3f}-{r['high']:.3f})"


def clinical_rows(answers: dict[str, dict], names: list[str]) -> list[list[str]]:
    """Sensitivity, specificity, PPV, NPV (95% Wilson intervals) and ROC AUC, one column per model."""
    binary = {n: answers[n].get("yes_no", {}).get("binary") for n in names}
    rows = []
    for key, label in (
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("ppv", "PPV"),
        ("npv", "NPV"),
    ):
        rows.append([label] + [fmt_rate(binary[n][key]) if binary[n] else "-" for n in names])
    rows.append(
        ["ROC AUC (P(yes) at CONCLUSION)"]
        + [_auc(answers[n].get("yes_no", {}).get("roc_auc")) for n in names]
    )
    unanswered = [
        str(b["unanswered_positive"] + b["unanswered_negative"]) if b else "-" for b in binary.values()
    ]
    rows.append(["no yes/no answer"] + unanswered)
    return rows


def class_rows(answers: dict[str, dict], names: list[str], kind: str, suffix: str = "") -> list[list[str]]:
    """Per gold class: precision, recall (95% intervals) and F1; then macro and micro F1."""
    tables = {n: (answers[n].get(kind) or {}).get("classes") for n in names}
    labels = sorted({c for t in tables.values() if t for c in t["classes"]})
    rows = []
    for lab in labels:
        cells = {n: (tables[n] or {}).get("classes", {}).get(lab) for n in names}
        if not suffix:
            rows.append(
                [f"{lab}: precision"] + [fmt_rate(c["precision"]) if c else "-" for c in cells.values()]
            )
        rows.append(
            [f"{lab}: recall{suffix}"] + [fmt_rate(c["recall"]) if c else "-" for c in cells.values()]
        )
        if not suffix:
            rows.append([f"{lab}: F1"] + [fmt(c["f1"]) if c else "-" for c in cells.values()])
    for avg in ("macro", "micro"):
        rows.append([f"{avg} F1{suffix}"] + [fmt(t[avg]["f1"]) if t else "-" for t in tables.values()])
    return rows


def confusion_markdown(classes: dict[str, Any]) -> str:
    """The confusion matrix as a table: rows the gold class, columns the answer's class."""
    labels, matrix = classes["labels"], classes["matrix"]
    rows = [[lab, *map(str, row)] for lab, row in zip(labels, matrix) if lab in classes["classes"]]
    return _table(["gold \\ answer", *labels], rows)


def answer_tables(results: dict[str, Any]) -> str:
    """One section per kind of answer: clinical table (yes/no), per-class table, confusion matrices."""
    models = results["models"]
    names = list(models)
    answers = {n: models[n].get("answers", {}) for n in names}
    kinds = [k for k in KIND_NAMES if any(k in answers[n] for n in names)]
    parts = []
    for kind in kinds:
        n_questions = max((answers[n].get(kind) or {}).get("n", 0) for n in names)
        parts.append(f"\n## Answers: {KIND_NAMES[kind]} ({n_questions} questions)\n")
        if kind == "yes_no" and any((answers[n].get(kind) or {}).get("binary") for n in names):
            positive = next(
                answers[n][kind]["binary"]["positive"]
                for n in names
                if answers[n].get(kind, {}).get("binary")
            )
            parts.append(f"Positive class: '{positive}'. Rates with Wilson 95% intervals and counts.\n\n")
            parts.append(_table(["metric", *names], clinical_rows(answers, names)))
        rows = class_rows(answers, names, kind)
        for condition, suffix in IMAGE_CONDITIONS.items():
            key = f"answers{suffix}"
            if suffix and any(key in models[n] for n in names):
                other = {n: models[n].get(key, {}) for n in names}
                rows += class_rows(other, names, kind, f", {condition} images")
        if any((answers[n].get(kind) or {}).get("classes") for n in names):
            parts.append("\n" + _table(["class", *names], rows))
        for n in names:
            classes = (answers[n].get(kind) or {}).get("classes")
            if classes and len(classes["labels"]) <= 12:
                parts.append(f"\nConfusion matrix, {n} (rows: gold answer, columns: the model's answer):\n\n")
                parts.append(confusion_markdown(classes))
    return "".join(parts)


def consistency_table(results: dict[str, Any]) -> str:
    """HallusionBench's aAcc / fAcc / qAcc per split (rows) and model (columns), or ''."""
    models = results["models"]
    names = [n for n in models if models[n].get("consistency")]
    if not names:
        return ""
    splits = list(dict.fromkeys(s for n in names for s in models[n]["consistency"]))
    rows = []
    for split in splits:
        cells = []
        for n in names:
            c = models[n]["consistency"].get(split)
            cells.append(
                " / ".join(fmt(c[k], "pct") for k in ("aAcc", "fAcc", "qAcc")) + f" ({c['n']})" if c else "-"
            )
        rows.append([split, *cells])
    intro = (
        "\n## HallusionBench consistency (aAcc / fAcc / qAcc, questions)\n\naAcc: questions answered right; "
        "fAcc: figures whose every question is right; qAcc: questions right on the original and on every "
        "edited figure (VLMEvalKit's definitions).\n\n"
    )
    return intro + _table(["split", *names], rows)


def comparison_table(comparisons: list[dict[str, Any]]) -> str:
    """The paired comparison of every two models on the same questions."""
    if not comparisons:
        return ""
    rows = []
    for c in comparisons:
        diff = (
            "-"
            if c["difference"] is None
            else f"{c['difference']:+.1%} ({c['low']:+.1%} to {c['high']:+.1%})"
        )
        rows.append([
            f"{c['first']} -> {c['second']}", str(c["n"]), fmt(c["accuracy_first"], "pct"),
            fmt(c["accuracy_second"], "pct"), diff, f"{c['first_only']} / {c['second_only']}",
            f"{c['p_value']:.4g} ({c['test']})",
        ])  # fmt: skip
    header = ["models", "questions", "accuracy first", "accuracy second", "difference (95% CI)",
              "right only by first / second", "McNemar p"]  # fmt: skip
    return "\n## Paired comparison (the same questions)\n\n" + _table(header, rows)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def write_confusion_pngs(results: dict[str, Any], out: Path) -> list[Path]:
    """``confusion_<model>_<kind>.png`` for each model and kind with a confusion matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, metrics in results["models"].items():
        for kind, entry in metrics.get("answers", {}).items():
            classes = entry.get("classes")
            if not classes or len(classes["labels"]) > 30:
                continue
            labels, matrix = classes["labels"], classes["matrix"]
            size = 2.5 + 0.45 * len(labels)
            fig, ax = plt.subplots(figsize=(size + 1, size), dpi=110)
            image = ax.imshow(matrix, cmap="Blues")
            ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
            ax.set_yticks(range(len(labels)), labels)
            ax.set_xlabel("model's answer")
            ax.set_ylabel("gold answer")
            ax.set_title(f"{name}: {KIND_NAMES.get(kind, kind)} (n={sum(map(sum, matrix))})")
            top = max(max(row) for row in matrix) or 1
            for i, row in enumerate(matrix):
                for j, v in enumerate(row):
                    ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
            fig.colorbar(image, ax=ax, fraction=0.046)
            fig.tight_layout()
            path = out / f"confusion_{_slug(name)}_{kind}.png"
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written
