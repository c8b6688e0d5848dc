"""The Runs and Answers pages: a run folder's curves, resolved configuration and eval output.

A run folder is what ``cotune train`` leaves (``metrics.jsonl``, ``config.yaml``, ``adapter/``) and
what ``cotune eval`` adds (``eval.json``, ``eval.md``, ``predictions.jsonl``, by default in
``RUN/eval``). Curves are every numeric key of ``metrics.jsonl`` (``loss``, ``eval_loss``, the
per-stage ``eval_loss_*`` and any task metric ``eval_*`` a run logs), drawn by the page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cotune.studio.safety import Folders

SKIP_KEYS = ("step", "epoch")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSON-lines file; a line cut short by a running writer is left out."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


class RunView:
    """One run folder.

    Args:
        path: the folder.
        folders: the studio's folders (the run folder is added).
    """

    def __init__(self, path: str | Path, folders: Folders) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"run folder '{path}' not found")
        self.name = self.path.resolve().name
        self.folders = folders
        folders.add(self.path)

    def curves(self) -> dict[str, list[list[float]]]:
        """Every numeric metric as ``[[step, value], ...]``."""
        path = self.path / "metrics.jsonl"
        out: dict[str, list[list[float]]] = {}
        for row in read_jsonl(path) if path.is_file() else []:
            step = row.get("step")
            for key, value in row.items():
                if key in SKIP_KEYS or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                if value != value or value in (float("inf"), float("-inf")):
                    continue
                out.setdefault(key, []).append([step, value])
        return out

    def config_text(self) -> str:
        path = self.path / "config.yaml"
        return path.read_text(encoding="utf-8") if path.is_file() else ""

    def adapter_dir(self) -> Path | None:
        path = self.path / "adapter"
        return path if (path / "adapter_config.json").is_file() else None

    def evals(self) -> list[str]:
        """Folders under the run (itself included) that hold a ``predictions.jsonl``, relative to it."""
        found = sorted(p.parent for p in self.path.glob("**/predictions.jsonl") if len(p.parts) < 64)
        return [p.relative_to(self.path).as_posix() or "." for p in found]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "curves": self.curves(),
            "config": self.config_text(),
            "evals": self.evals(),
            "adapter": str(self.adapter_dir() or ""),
        }

    def answers(self, folder: str, lookup) -> dict[str, Any]:
        """One eval folder: the models' replies side by side per sample, joined with the records.

        Args:
            folder: a folder of ``evals()``.
            lookup: ``id -> record view`` (from the studio's data files; None when unknown).
        """
        if folder not in self.evals():
            raise KeyError(f"no eval output '{folder}' in run {self.name}")
        where = self.path / folder
        summary = json.loads((where / "eval.json").read_text()) if (where / "eval.json").is_file() else {}
        rows: dict[str, dict[str, Any]] = {}
        models: list[str] = []
        for p in read_jsonl(where / "predictions.jsonl"):
            model = str(p.get("model", "?"))
            if model not in models:
                models.append(model)
            key = str(p.get("id"))
            row = rows.setdefault(key, {"id": key, "gold": p.get("gold"), "by_model": {}})
            row["by_model"][model] = prediction_view(p)
        for row in rows.values():
            record = lookup(row["id"])
            row["question"] = record["question"] if record else ""
            row["images"] = record["images"] if record else []
        return {
            "models": models,
            "rows": list(rows.values()),
            "metrics": summary.get("models", {}),
            "settings": {k: v for k, v in summary.items() if k != "models"},
            "table": (where / "eval.md").read_text() if (where / "eval.md").is_file() else "",
            "pictures": [
                self.folders.url(p) for p in sorted(where.iterdir()) if p.suffix.lower() in PICTURE_SUFFIXES
            ],
        }


def prediction_view(p: dict[str, Any]) -> dict[str, Any]:
    """A predictions.jsonl row as the page shows it: the reply's stages, the verdict and, with image
    ablation, the reply with shuffled pictures and whether the answer stayed the same."""
    from cotune.data.cot import parse_stages

    reply = str(p.get("reply", ""))
    score = p.get("score")
    if isinstance(score, dict):
        correct = bool(score.get("correct"))
    else:  # eval scores no reply without a CONCLUSION: wrong when there is a reference
        correct = False if p.get("gold") is not None else None
    view = {"reply": reply, "stages": parse_stages(reply), "correct": correct}
    shuffled = p.get("reply_shuffled_images")
    if isinstance(shuffled, str):
        ours = parse_stages(reply).get("CONCLUSION", reply).strip().lower()
        theirs = parse_stages(shuffled).get("CONCLUSION", shuffled).strip().lower()
        view["reply_shuffled"] = shuffled
        view["unchanged_when_shuffled"] = ours == theirs
    return view
