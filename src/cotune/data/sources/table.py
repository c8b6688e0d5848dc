"""A table of image path, question and answer (or label): CSV, TSV or JSON lines.

Columns are found by their usual names or mapped with ``data.columns`` (canonical name -> the
table's column): ``image`` (image, image_path, path, file, filename), ``question``, ``answer``
(answer, label, class), ``id``. A table without a question column takes the question template.
Every other column is kept in the record (a patient, a part serial, a device: keys to split by).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from cotune.data.images import resolve_image_path
from cotune.data.sample import DataError, Problem
from cotune.data.sources.folder import fill_question
from cotune.data.sources.writer import Item

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
USUAL_NAMES = {
    "image": ("image", "image_path", "path", "file", "filename", "file_name"),
    "question": ("question", "prompt"),
    "answer": ("answer", "label", "class", "diagnosis"),
    "id": ("id",),
}


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """("file:line", row) for every row of a CSV, TSV or JSON-lines file; values as strings.

    Raises:
        DataError: an unreadable line (JSON lines), naming it.
    """
    rows = []
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path.name}:{lineno}: not a JSON object ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path.name}:{lineno}: expected a JSON object per line")
                rows.append((f"{path.name}:{lineno}", row))
        return rows
    with open(path, encoding="utf-8-sig", newline="") as f:
        sample = f.read(8192)
        f.seek(0)
        delimiter = "\t" if path.suffix.lower() == ".tsv" or sample.count("\t") > sample.count(",") else ","
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            rows.append((f"{path.name}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}))
    return rows


def find_column(
    names: list[str], canonical: str, columns: dict, where: str, required: bool = True
) -> str | None:
    """The table's column for ``canonical``: the mapped one (``data.columns``) or a usual name.

    Raises:
        DataError: a mapped column that is missing, or a required one that is not found.
    """
    if canonical in columns:
        if columns[canonical] not in names:
            raise DataError(
                f"{where}: data.columns maps {canonical} to '{columns[canonical]}', not a column ({names})"
            )
        return columns[canonical]
    lowered = {n.lower(): n for n in names}
    for usual in USUAL_NAMES[canonical]:
        if usual in lowered:
            return lowered[usual]
    if required:
        raise DataError(
            f"{where}: no {canonical} column (columns: {names}); map it with "
            f"--data.columns '{{{canonical}: YOUR_COLUMN}}'"
        )
    return None


def read_table(path: Path, image_root: Path, columns: dict, question: str) -> Iterator[Item | Problem]:
    """Yields one Item per row.

    Args:
        path: the table.
        image_root: folder image paths are relative to (paths may not leave it).
        columns: ``data.columns``.
        question: the template for tables without a question column (``{classes}``: the answers seen).
    """
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    names = list(rows[0][1])
    image_col = find_column(names, "image", columns, path.name)
    answer_col = find_column(names, "answer", columns, path.name)
    question_col = find_column(names, "question", columns, path.name, required=False)
    id_col = find_column(names, "id", columns, path.name, required=False)
    if question_col is None and not question:
        raise DataError(
            f"{path.name}: no question column; give the question with --question 'TEXT' or map one"
        )
    classes = sorted({str(r.get(answer_col, "")).strip() for _, r in rows} - {""})
    used = {image_col, answer_col, question_col, id_col}
    for where, row in rows:
        ref = str(row.get(image_col) or "").strip()
        if not ref:
            yield Problem(where, f"empty {image_col}")
            continue
        try:
            image = resolve_image_path(ref, image_root)
        except ValueError as e:
            yield Problem(where, str(e))
            continue
        text = str(row.get(question_col) or "").strip() if question_col else fill_question(question, classes)
        if not text:
            yield Problem(where, f"empty {question_col}")
            continue
        extra = {k: v for k, v in row.items() if k not in used and v not in (None, "")}
        yield Item(
            id=str(row.get(id_col) or "").strip() or Path(ref).stem if id_col else where.replace(":", "-"),
            where=where,
            image=image,
            question=text,
            answer=str(row.get(answer_col) or "").strip(),
            name=ref,
            extra=extra,
        )
