"""Benchmark files in VLMEvalKit's TSV layout (MMBench, MMStar, AI2D, HallusionBench, ...).

A VLMEvalKit TSV has one question per row: ``index``, ``image`` (the picture as base64, or for a
row that shares another row's picture, that row's index; several pictures as a Python list
literal, with ``image_path`` naming each), ``question``, optionally ``hint``, the options in
columns ``A``, ``B``, ... (empty where a question has fewer), ``answer`` (a letter, or Yes/No),
``category`` and sometimes ``l2-category``. Rows without an image are skipped, as VLMEvalKit does.

Prompts are built as VLMEvalKit builds them (``ImageMCQDataset.build_prompt`` for multiple
choice; the question plus " Please answer yes or no." for yes/no benchmarks such as
HallusionBench, as its model wrappers ask): the images first, then the text.

``read_vlmeval_tsv`` and ``build_vlmeval_prompt`` are used by ``cotune eval --benchmark`` and by
``cotune data import``; ``benchmark_samples`` turns the rows into ``Sample``s to evaluate.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import string
import sys
from pathlib import Path
from typing import Any

from cotune.data.sample import Sample

MCQ_INSTRUCTION = "Please select the correct answer from the options above. \n"
YES_NO_INSTRUCTION = " Please answer yes or no."
_SHARED_IMAGE_MAX = 64  # VLMEvalKit: an image cell this short names the row whose image it shares


def _cell(row: dict[str, str], key: str) -> str | None:
    """A cell's text, None when the column is missing or the cell empty / NaN (pandas writes '')."""
    value = row.get(key)
    if value is None:
        return None
    value = str(value)
    return None if value.strip() in ("", "nan", "NaN", "None") else value


def _decode(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(
            f"{where}: field 'image' is not base64 ({e}); VLMEvalKit files hold each picture as "
            "base64 text (or the index of the row whose picture it shares)"
        ) from None


def _image_cells(cell: str) -> list[str]:
    """One cell's image entries: a Python list literal of several, or one."""
    if cell.lstrip().startswith("["):
        try:
            value = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            return [cell]
        return [str(v) for v in value] if isinstance(value, list) else [cell]
    return [cell]


def _resolve_images(rows: list[dict], path: Path) -> None:
    """Replaces each row's image cells by decoded bytes, following shared-image references."""
    by_index = {r["index"]: r for r in rows}
    for r in rows:
        images = []
        for entry in r.pop("_image_cells"):
            where = f"{path}:{r['line']}"
            if len(entry) <= _SHARED_IMAGE_MAX:
                other = by_index.get(entry.strip())
                if other is None or not other.get("_own_image"):
                    raise ValueError(
                        f"{where}: field 'image' is '{entry}', neither base64 nor the index of a row with "
                        "a picture (VLMEvalKit writes a short image cell for a row that shares another's)"
                    )
                entry = other["_own_image"]
            images.append(_decode(entry, where))
        r["images"] = images
    for r in rows:
        r.pop("_own_image", None)


def read_vlmeval_tsv(path: str | Path) -> list[dict[str, Any]]:
    """Reads a VLMEvalKit-layout TSV file.

    Returns:
        One dict per row with a picture, in file order: ``index`` (str), ``line`` (its line in the
        file), ``question``, ``hint`` (or None), ``options`` ({letter: text} for the non-empty
        option columns, in order), ``answer`` (or None), ``category`` and ``l2_category`` (or
        None), ``images`` (the decoded bytes of each picture), ``image_path`` (list, possibly
        empty) and ``extra`` (the other columns).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a required column is missing, or a cell cannot be read; the message names the
            file, line and field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark file (a VLMEvalKit TSV, e.g. MMBench_DEV_EN.tsv)")
    csv.field_size_limit(sys.maxsize)  # base64 pictures are far longer than csv's default limit
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        missing = [c for c in ("index", "question") if c not in columns]
        if missing or not ({"image", "image_path"} & set(columns)):
            need = missing + ([] if {"image", "image_path"} & set(columns) else ["image"])
            raise ValueError(
                f"{path}:1: missing column(s) {', '.join(need)} (found: {', '.join(columns) or 'none'}); "
                "a VLMEvalKit TSV has index, image (base64), question, the option columns A, B, ... and answer"
            )
        letters = [c for c in string.ascii_uppercase if c in columns]
        known = {"index", "image", "image_path", "question", "hint", "answer", "category", "l2-category",
                 "l2_category", *letters}  # fmt: skip
        rows = []
        for row in reader:
            line = reader.line_num
            image = _cell(row, "image")
            image_path = _image_cells(_cell(row, "image_path") or "") if _cell(row, "image_path") else []
            if image is None:
                continue  # VLMEvalKit skips rows without a picture
            if _cell(row, "question") is None:
                raise ValueError(f"{path}:{line}: field 'question' is empty")
            cells = _image_cells(image)
            rows.append(
                {
                    "index": str(row["index"]).strip(),
                    "line": line,
                    "question": row["question"],
                    "hint": _cell(row, "hint"),
                    "options": {k: row[k] for k in letters if _cell(row, k) is not None},
                    "answer": _cell(row, "answer"),
                    "category": _cell(row, "category"),
                    "l2_category": _cell(row, "l2-category") or _cell(row, "l2_category"),
                    "image_path": image_path,
                    "extra": {k: v for k, v in row.items() if k not in known and k is not None},
                    "_image_cells": cells,
                    "_own_image": cells[0] if len(cells) == 1 and len(cells[0]) > _SHARED_IMAGE_MAX else None,
                }
            )
    _resolve_images(rows, path)
    return rows


def benchmark_kind(row: dict[str, Any]) -> str:
    """'choice' (the row has options), 'yes_no' (its answer is Yes or No) or 'text'."""
    if row.get("options"):
        return "choice"
    answer = (row.get("answer") or "").strip().lower()
    return "yes_no" if answer in ("yes", "no") else "text"


def build_vlmeval_prompt(row: dict[str, Any]) -> str:
    """The text of the prompt VLMEvalKit builds for a row (the pictures go before it).

    Multiple choice (MMBench, MMStar, AI2D): ``Hint: ...`` (when there is one), ``Question: ...``,
    ``Options:`` with one ``X. text`` line per option, and "Please select the correct answer from
    the options above." Yes/no (HallusionBench, POPE, MME): the question and " Please answer yes
    or no." Anything else: the question.
    """
    kind = benchmark_kind(row)
    if kind == "yes_no":
        return f"{row['question']}{YES_NO_INSTRUCTION}"
    if kind != "choice":
        return str(row["question"])
    prompt = f"Hint: {row['hint']}\n" if row.get("hint") else ""
    prompt += f"Question: {row['question']}\n"
    prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in row["options"].items())
    return prompt + MCQ_INSTRUCTION


def question_group(row: dict[str, Any], path: str | Path = "") -> dict[str, str] | None:
    """HallusionBench's grouping of a row: its ``l2`` category, question ``set``, ``figure`` (the
    original or an edited picture) and ``question``, from the ``set_id``, ``figure_id`` and
    ``question_id`` columns, else (as VLMEvalKit reads its HallusionBench file) from the 4th to 6th
    '_'-separated parts of the index; None for other benchmarks."""
    extra = row.get("extra") or {}
    ids = [str(extra.get(k) or "").strip() for k in ("set_id", "figure_id", "question_id")]
    if not all(ids):
        parts = str(row["index"]).split("_")
        if "hallusion" not in Path(path).name.lower() or len(parts) < 6:
            return None
        ids = parts[3:6]
    return {"l2": row.get("l2_category") or "", "set": ids[0], "figure": ids[1], "question": ids[2]}


def benchmark_samples(rows: list[dict[str, Any]], path: str | Path = "") -> list[Sample]:
    """Rows of ``read_vlmeval_tsv`` as evaluation ``Sample``s (a user turn, no reference reply).

    Each sample's ``meta`` holds the gold ``answer``, its ``answer_kind``, the ``options``, the
    ``category`` (also as ``task``, for the per-task view), ``l2_category``, the VLMEvalKit ``index``
    and, for HallusionBench, the ``question_group`` (``question_group``).
    """
    samples = []
    for r in rows:
        content = [{"type": "image"} for _ in r["images"]] + [
            {"type": "text", "text": build_vlmeval_prompt(r)}
        ]
        meta = {
            "answer": r["answer"],
            "answer_kind": benchmark_kind(r),
            "options": r["options"] or None,
            "category": r["category"],
            "task": r["category"],
            "l2_category": r["l2_category"],
            "index": r["index"],
            "question": r["question"],
        }
        group = question_group(r, path)
        if group is not None:
            meta["question_group"] = group
        samples.append(
            Sample(
                id=r["index"],
                messages=[{"role": "user", "content": content}],
                images=list(r["images"]),
                where=f"{path}:{r['line']}",
                meta=meta,
            )
        )
    return samples
