"""``cotune data import``: the data users hold -> LLaVA-CoT JSONL with its images, one reader per kind.

    folder.py   a class-per-folder tree (ImageFolder) + a question template
    table.py    CSV / TSV / JSON lines of image, question, answer (columns mapped)
    coco.py     COCO captions, VQA v2 questions + annotations
    vlmeval.py  VLMEvalKit benchmark TSV (base64 pictures, options, answer letter)
    dicom.py    DICOM files + a labels table (pydicom), windowed, grouping keys kept

Every reader yields ``writer.Item``s or ``Problem``s; ``import_source`` writes the items into a new
folder in one atomic step (``cotune.files.atomic_dir``) and reports the problems as ``cotune data
check`` does: each with its file (and line) and reason.

>>> report = import_source("photos/", "data/photos", ImportOptions(question="Is it scratched?"))
>>> report.records_file
PosixPath('data/photos/data.jsonl')
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cotune.data.sample import DataError, Problem
from cotune.data.sources.writer import MARKER, ImportWriter, Item
from cotune.files import atomic_dir

KINDS = ("folder", "table", "coco", "vqa", "vlmeval", "dicom")


def detect_kind(source: Path) -> tuple[str, str]:
    """(kind, the evidence in words) for a source path.

    Raises:
        DataError: nothing identifies it, naming what to set.
    """
    from cotune.data.sources.coco import coco_kind
    from cotune.data.sources.dicom import dicom_files, is_dicom_file
    from cotune.data.sources.folder import is_image_folder
    from cotune.data.sources.table import TABLE_SUFFIXES
    from cotune.data.sources.vlmeval import is_vlmeval_tsv

    if not source.exists():
        raise FileNotFoundError(f"source '{source}' not found")
    if source.is_dir():
        if is_image_folder(source):
            return "folder", "a folder of class folders holding pictures"
        if next(iter(dicom_files(source)), None) is not None:
            return "dicom", "a folder of DICOM files"
        raise DataError(
            f"{source}: a folder, but neither class folders of pictures nor DICOM files (set --kind)"
        )
    if is_dicom_file(source):
        return "dicom", "a DICOM file"
    if is_vlmeval_tsv(source):
        return "vlmeval", "a TSV with index, image and question columns (VLMEvalKit)"
    kind = coco_kind(source)
    if kind == "vqa":
        return "vqa", "a JSON file with a 'questions' list (VQA v2)"
    if kind == "coco":
        return "coco", "a JSON file with 'images' and 'annotations' (COCO captions)"
    if source.suffix.lower() in TABLE_SUFFIXES:
        return "table", f"a {source.suffix[1:].upper()} table"
    raise DataError(f"{source}: cannot tell what it is; set --kind to one of {', '.join(KINDS)}")


@dataclass
class ImportReport:
    """What ``import_source`` did."""

    kind: str
    records_file: Path
    records: int = 0
    problems: list[Problem] = field(default_factory=list)  # items not imported
    warnings: list[Problem] = field(default_factory=list)  # imported, but worth a look
    answers: Counter = field(default_factory=Counter)
    images: Counter = field(default_factory=Counter)  # copied / windowed / png

    def summary(self) -> str:
        """A few lines: what was written, the answers' balance, each problem."""
        top = ", ".join(f"{a} {n}" for a, n in self.answers.most_common(12))
        more = len(self.answers) - 12
        lines = [
            f"imported {self.records} records ({self.kind}) to {self.records_file}",
            f"  answers: {top}" + (f" and {more} more" if more > 0 else ""),
            "  images: " + ", ".join(f"{n} {how}" for how, n in sorted(self.images.items())),
        ]
        if self.problems:
            lines.append(f"\nproblems ({len(self.problems)}; not imported):")
            lines += [f"  {p}" for p in self.problems]
        if self.warnings:
            lines.append(f"\nwarnings ({len(self.warnings)}):")
            lines += [f"  {p}" for p in self.warnings]
        return "\n".join(lines)


def _items(kind: str, source: Path, opts: Any, data: Any, window: Any) -> tuple[Iterator, Callable | None]:
    """The reader's items, and a callback for the warnings found once they are all read (or None)."""
    root = Path(data.image_root) if data.image_root else (source if source.is_dir() else source.parent)
    if kind == "folder":
        from cotune.data.sources.folder import read_folder

        return read_folder(source, opts.classes, opts.question), None
    if kind == "table":
        from cotune.data.sources.table import read_table

        return read_table(source, root, data.columns, opts.question), None
    if kind == "coco":
        from cotune.data.sources.coco import read_coco_captions

        return read_coco_captions(source, root), None
    if kind == "vqa":
        from cotune.data.sources.coco import read_vqa

        return read_vqa(source, root, opts.annotations), None
    if kind == "vlmeval":
        from cotune.data.sources.vlmeval import read_vlmeval

        return read_vlmeval(source), None
    from cotune.data.sources.dicom import Labels, read_dicom, unused_labels

    labels = Labels(Path(opts.labels), data.columns, opts.label_key) if opts.labels else None
    return read_dicom(source, labels, opts.question, window, opts.frames), lambda: unused_labels(labels)


def import_source(
    source: str | Path,
    output_dir: str | Path,
    opts: Any,
    data: Any = None,
    log: Callable[[str], None] = print,
) -> ImportReport:
    """Reads ``source`` and writes ``output_dir/data.jsonl`` and ``output_dir/images/``.

    Args:
        source: a folder tree, a table, a COCO/VQA JSON file, a VLMEvalKit TSV or DICOM files.
        output_dir: a new folder (or one an earlier import wrote: it is replaced, in one rename).
        opts: ``ImportOptions`` (the ``source`` section).
        data: the ``data`` section (``columns``, ``image_root``, ``on_error``); None for defaults.
        log: where the detected kind is said.

    Returns:
        An ``ImportReport``: the records written and every problem, with file and reason.

    Raises:
        DataError: nothing to import, an unusable source, or problems under ``data.on_error: raise``.
    """
    from cotune.data.sources.window import parse_window
    from cotune.options.data import DataOptions

    source, out = Path(source), Path(output_dir)
    data = data or DataOptions()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise DataError(
            f"{out} exists and was not written by 'cotune data import'; give a new --output folder"
        )
    kind = opts.kind
    if kind == "auto":
        kind, why = detect_kind(source)
        log(f"{source}: kind '{kind}' detected ({why}); set --kind to override")
    window = parse_window(opts.window)
    items, late_warnings = _items(kind, source, opts, data, window)
    report = ImportReport(kind=kind, records_file=out / "data.jsonl")
    marker = {"source": str(source.resolve()), "kind": kind, "options": vars(opts)}
    with atomic_dir(out) as tmp:
        writer = ImportWriter(tmp, window)
        for item in tqdm(items, desc=f"importing ({kind})", unit="item", dynamic_ncols=True, mininterval=1.0):
            problem = item if isinstance(item, Problem) else writer.add(item)
            if problem is not None:
                report.problems.append(problem)
        if late_warnings is not None:
            report.warnings += late_warnings()
        if report.problems and data.on_error == "raise":
            listing = "\n".join(f"  {p}" for p in report.problems)
            raise DataError(
                f"{len(report.problems)} problems (data.on_error=raise; nothing written):\n{listing}"
            )
        if not writer.records:
            raise DataError(f"{source}: nothing to import" + "".join(f"\n  {p}" for p in report.problems))
        writer.finish(marker)
        report.records = len(writer.records)
        report.answers = Counter(r["answer"] for r in writer.records)
        report.images = writer.converted
    return report


def read_marker(folder: str | Path) -> dict:
    """The ``import.json`` an import left in ``folder`` ({} when none)."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return {}


__all__ = ["KINDS", "ImportReport", "Item", "detect_kind", "import_source", "read_marker"]
