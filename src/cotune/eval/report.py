"""What ``cotune eval`` writes: ``eval.md`` (one row per metric, one column per model, then
HallusionBench's consistency table where the benchmark has one, the per-class tables, the yes/no clinical table, the confusion matrices and the paired comparisons),
``confusion_<model>_<kind>.png``, ``eval.json`` and ``predictions.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cotune.data.cot import STAGES
from cotune.eval.ablation import IMAGE_CONDITIONS
from cotune.eval.tables import (
    answer_tables,
    comparison_table,
    consistency_table,
    fmt,
    fmt_rate,
    write_confusion_pngs,
)


def markdown_table(results: dict[str, Any]) -> str:
    """One row per metric, one column per model."""
    models = results["models"]
    names = list(models)
    rows: list[tuple[str, list[str]]] = []
    if any(models[n]["loss"] == models[n]["loss"] for n in names):  # reference replies (not a benchmark)
        rows.append(("loss", [fmt(models[n]["loss"]) for n in names]))
        rows.append(("perplexity", [fmt(models[n]["perplexity"]) for n in names]))
        rows += [(f"loss: {s}", [fmt(models[n]["stage_loss"][s]) for n in names]) for s in (*STAGES, "other")]
    rows.append(("four-stage format", [fmt(models[n]["format_rate"], "pct") for n in names]))
    rows += [(f"has {s}", [fmt(models[n]["stage_rate"][s], "pct") for n in names]) for s in STAGES]
    rows.append(("answer accuracy (95% CI)", [fmt_rate(models[n].get("accuracy_interval")) for n in names]))
    for condition, suffix in IMAGE_CONDITIONS.items():
        if suffix and any(f"accuracy{suffix}" in models[n] for n in names):
            rows.append(
                (
                    f"accuracy, {condition} images",
                    [fmt(models[n].get(f"accuracy{suffix}"), "pct") for n in names],
                )
            )
    if any("image_reliance" in models[n] for n in names):
        rows.append(
            (
                "image reliance (true - shuffled)",
                [fmt(models[n].get("image_reliance"), "pct") for n in names],
            )
        )
        for condition, suffix in IMAGE_CONDITIONS.items():
            key = f"conclusion_loss{suffix}"
            if any(key in models[n] for n in names):
                rows.append(
                    (f"CONCLUSION loss, {condition} images", [fmt(models[n].get(key)) for n in names])
                )
    rows.append(("exact match", [fmt(models[n]["exact_match"], "pct") for n in names]))
    kinds = sorted({k for n in names for k in models[n]["accuracy_by_kind"]})
    for kind in kinds:
        cells = []
        for n in names:
            c = models[n]["accuracy_by_kind"].get(kind)
            cells.append(f"{c['correct']}/{c['n']}" if c else "-")
        rows.append((f"accuracy: {kind}", cells))
    tasks = sorted({t for n in names for t in models[n].get("accuracy_by_task", {})})
    for task in tasks:
        cells = []
        for n in names:
            c = models[n]["accuracy_by_task"].get(task)
            shuffled = models[n].get("accuracy_by_task_shuffled_images", {}).get(task)
            cell = f"{c['correct']}/{c['n']}" if c else "-"
            cells.append(
                cell + (f" ({shuffled['correct']}/{shuffled['n']} shuffled)" if c and shuffled else "")
            )
        rows.append((f"{results.get('group_name', 'task')}: {task}", cells))
    rows.append(("tokens per reply", [f"{models[n]['generated_tokens_per_reply']:.1f}" for n in names]))
    header = "| metric | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    return header + "".join(f"| {label} | " + " | ".join(cells) + " |\n" for label, cells in rows)


def tracker_figures(results: dict[str, Any]) -> dict[str, float]:
    """The headline figures for the trackers: per model ``eval/<model>/accuracy`` (and its interval),
    per kind macro F1, yes/no sensitivity, specificity, PPV, NPV and ROC AUC; per pair McNemar's p."""
    out: dict[str, float] = {}
    for name, m in results["models"].items():
        acc = m.get("accuracy_interval") or {}
        for key in ("value", "low", "high"):
            if acc.get(key) is not None:
                out[f"eval/{name}/accuracy" + ("" if key == "value" else f"_{key}")] = acc[key]
        for kind, entry in m.get("answers", {}).items():
            if entry.get("classes"):
                out[f"eval/{name}/{kind}/macro_f1"] = entry["classes"]["macro"]["f1"]
            for rate_name in ("sensitivity", "specificity", "ppv", "npv"):
                value = (entry.get("binary") or {}).get(rate_name, {}).get("value")
                if value is not None:
                    out[f"eval/{name}/{kind}/{rate_name}"] = value
            auc = (entry.get("roc_auc") or {}).get("value")
            if auc is not None:
                out[f"eval/{name}/{kind}/roc_auc"] = auc
        for key, value in (m.get("consistency") or {}).get("Overall", {}).items():
            if key != "n":
                out[f"eval/{name}/hallusion_{key}"] = value
    for c in results.get("comparisons", []):
        out[f"eval/{c['first']}_vs_{c['second']}/mcnemar_p"] = c["p_value"]
        if c["difference"] is not None:
            out[f"eval/{c['first']}_vs_{c['second']}/accuracy_difference"] = c["difference"]
    return {k: v for k, v in out.items() if v is not None}


def full_report(results: dict[str, Any]) -> str:
    """eval.md's body: the main table, the per-class and clinical tables, the paired comparisons."""
    parts = [
        markdown_table(results),
        consistency_table(results),
        answer_tables(results),
        comparison_table(results.get("comparisons", [])),
    ]
    return "\n".join(p for p in parts if p)


def write_results(results: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """eval.json (metrics + settings), eval.md (the tables), confusion PNGs and predictions.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {
        "json": out / "eval.json",
        "md": out / "eval.md",
        "predictions": out / "predictions.jsonl",
    }
    summary = {k: v for k, v in results.items() if k != "predictions"}
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    title = f"# cotune eval: {results.get('data', '')}\n\n{results.get('n_samples', '?')} samples.\n\n"
    paths["md"].write_text(title + full_report(results))
    paths["png"] = write_confusion_pngs(results, out)
    with open(paths["predictions"], "w", encoding="utf-8") as f:
        for name, rows in results["predictions"].items():
            for row in rows:
                f.write(json.dumps({"model": name, **row}, ensure_ascii=False) + "\n")
    return paths
