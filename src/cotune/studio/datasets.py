"""The Data page: every record of a data file with its pictures, its four stages and what ``cotune data
check`` says about it; filters; the augmentation preview.

Records are read as training reads them (``data.formats.read_records`` with the run's ``data``
settings) and checked by ``data.check.check_data``, the function behind ``cotune data check``: the
problems it lists are the records training skips, its warnings (four-stage format, augmentation
against colour or side words) are shown on the record they name.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from cotune.data.cot import STAGES, parse_stages
from cotune.data.records import problem_order
from cotune.studio.safety import Folders


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join("<image>" if i.get("type") == "image" else i.get("text", "") for i in content)


def record_view(sample: Any, folders: Folders) -> dict[str, Any]:
    """One usable record as the page shows it: turns (assistant turns split into stages), pictures, answer."""
    turns = []
    for m in sample.messages:
        text = _text(m["content"])
        turn = {"role": m["role"], "text": text}
        if m["role"] == "assistant":
            stages = parse_stages(text)
            turn["stages"] = {s: stages[s] for s in STAGES if s in stages}
        turns.append(turn)
    first = next((t for t in turns if t["role"] == "assistant"), {})
    answer = sample.meta.get("answer")
    if not (isinstance(answer, str | int | float) and str(answer).strip()):
        answer = first.get("stages", {}).get("CONCLUSION", "")
    question = next((t["text"] for t in turns if t["role"] == "user"), "")
    return {
        "id": str(sample.id),
        "where": sample.where,
        "images": [folders.url(p) if isinstance(p, str | Path) else None for p in sample.images],
        "question": question.replace("<image>", "").strip(),
        "turns": turns,
        "answer": str(answer).strip(),
    }


class DataView:
    """One data file, read and checked once (on first use), then filtered per request.

    Args:
        path: the data file.
        cfg: ``cotune data``'s options (``load_options('data', ...)``): how records are read, the
            seed and the augmentation settings of the run.
        folders: the studio's folders; the file's image root is added to them.
    """

    def __init__(self, path: str | Path, cfg: Any, folders: Folders) -> None:
        self.path, self.cfg, self.folders = Path(path), cfg, folders
        root = cfg.data.image_root or (self.path if self.path.is_dir() else self.path.parent)
        self.image_root = Path(root)
        folders.add(self.image_root)
        folders.add(self.path if self.path.is_dir() else self.path.parent)
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] | None = None
        self._samples: dict[str, Any] = {}
        self.fmt = ""

    def records(self) -> list[dict[str, Any]]:
        """Every record, in file order, with ``problems`` (skipped by training) and ``warnings``."""
        with self._lock:
            if self._records is None:
                self._records = self._read()
            return self._records

    def _read(self) -> list[dict[str, Any]]:
        from cotune.data.check import check_data
        from cotune.data.formats import detect_format, iter_json_records, read_records

        d = self.cfg.data
        fmt = d.format if d.format != "auto" else detect_format(self.path, d.columns)[0]
        self.fmt = fmt
        samples, _ = read_records(self.path, fmt, self.image_root, d.system_prompt, d.columns)
        report = check_data(self.cfg, self.path, log=lambda s: None)
        by_where: dict[str, dict[str, Any]] = {}
        for s in samples:
            by_where[s.where] = record_view(s, self.folders)
            self._samples[s.where] = s
        if self.path.is_file() and self.path.suffix.lower() in (".jsonl", ".json"):
            for where, obj in iter_json_records(self.path):  # records that did not parse: shown raw
                by_where.setdefault(where, {"id": "", "where": where, "images": [], "question": "",
                                            "turns": [], "answer": "", "raw": str(obj)[:2000]})  # fmt: skip
        for kind, found in (("problems", report.problems), ("warnings", report.warnings)):
            for p in found:
                if p.where in by_where:
                    by_where[p.where].setdefault(kind, []).append(p.reason)
        out = sorted(by_where.values(), key=lambda r: problem_order(r["where"]))
        for k, r in enumerate(out):
            r["index"] = k
            r.setdefault("problems", [])
            r.setdefault("warnings", [])
        self.file_warnings = [p.reason for p in report.warnings if p.where not in by_where]
        return out

    def summary(self) -> dict[str, Any]:
        records = self.records()
        answers = Counter(r["answer"] for r in records if r["answer"])
        return {
            "path": str(self.path),
            "format": self.fmt,
            "total": len(records),
            "with_problems": sum(bool(r["problems"]) for r in records),
            "with_warnings": sum(bool(r["warnings"]) for r in records),
            "answers": answers.most_common(50),
            "file_warnings": self.file_warnings,
            "augment": dataclasses.asdict(self.cfg.data.augment),
        }

    def filtered(self, answer: str = "", problem: str = "", text: str = "") -> list[dict[str, Any]]:
        """Records matching all filters: the exact answer, 'problems' / 'warnings' / 'clean' / a word in
        a problem, and words in the id, question or replies (case ignored)."""
        out = self.records()
        if answer:
            out = [r for r in out if r["answer"].lower() == answer.lower()]
        if problem == "problems":
            out = [r for r in out if r["problems"]]
        elif problem == "warnings":
            out = [r for r in out if r["warnings"]]
        elif problem == "clean":
            out = [r for r in out if not r["problems"] and not r["warnings"]]
        elif problem:
            out = [r for r in out if any(problem.lower() in p.lower() for p in r["problems"] + r["warnings"])]
        if text:
            t = text.lower()
            out = [r for r in out if t in " ".join([r["id"], *(x["text"] for x in r["turns"])]).lower()]
        return out

    def augmented(self, index: int, epoch: int):
        """The record's first picture as training epoch ``epoch`` augments it (-1: the original), with
        the run's ``data.augment`` settings switched on, as ``cotune data preview`` draws them."""
        from cotune.data.augment import Augmenter
        from cotune.data.images import load_image

        records = self.records()
        if not 0 <= index < len(records) or records[index]["where"] not in self._samples:
            raise KeyError(f"record {index} has no usable picture")
        sample = self._samples[records[index]["where"]]
        if not sample.images:
            raise KeyError(f"record {index} has no picture")
        image = load_image(sample.images[0])
        if epoch < 0:
            return image
        position = list(self._samples).index(records[index]["where"])  # index among usable samples
        augmenter = Augmenter(dataclasses.replace(self.cfg.data.augment, enabled=True), self.cfg.seed)
        return augmenter(image, position, epoch=epoch)
