"""DICOM files (pydicom: ``pip install 'cotune[dicom]'``): pixels in the modality's units, a fixed
window, labels joined from a table, the patient and study kept as grouping keys.

Per file: stored values -> ``RescaleSlope * value + RescaleIntercept`` (Hounsfield units for CT) ->
the window: ``--window`` (a preset: lung, mediastinum, bone, brain, abdomen; or CENTER,WIDTH), else
the file's first Window Center/Width, else the full range its ``BitsStored`` allows (never the
slice's own minimum and maximum) -> 8-bit grey (MONOCHROME1 inverted). A multi-frame file gives the
frames ``--frames`` chooses (middle, all, or indices '0,5,9'), one record each.

Labels come from ``--labels labels.csv``: its key column (``--label_key``, else the first column
whose values match) holds file names, file stems, paths under the source folder, or SOP / series /
study instance UIDs or patient IDs; its answer column (answer, label, diagnosis... or
``data.columns``) is the answer, and a question column, if any, the question.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cotune.data.sample import DataError, Problem
from cotune.data.sources.folder import fill_question
from cotune.data.sources.table import find_column, read_rows
from cotune.data.sources.window import apply_window, full_range_window
from cotune.data.sources.writer import Item

DEFAULT_QUESTION = "What is the finding in this scan? Answer with one of: {classes}."
GROUP_KEYS = {  # record field <- DICOM attribute
    "patient_id": "PatientID",
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "sop_uid": "SOPInstanceUID",
}


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise DataError("reading DICOM needs pydicom: pip install 'cotune[dicom]'") from None
    return pydicom


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or any file with DICOM's 'DICM' preamble marker."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def dicom_files(root: Path) -> list[Path]:
    """The DICOM files of a file or a folder tree, sorted."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and is_dicom_file(p))


def _first(value: Any) -> float:
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def dicom_window(ds: Any, window: tuple[float, float] | None) -> tuple[float, float]:
    """The window for ``ds``: the given one, the file's first Window Center/Width, or the full range
    of its stored bits after the rescale."""
    if window is not None:
        return window
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return _first(ds.WindowCenter), _first(ds.WindowWidth)
    bits = int(ds.get("BitsStored", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return full_range_window(*ends)


def frames_to_take(n: int, frames: str) -> list[int]:
    """``--frames``: 'middle', 'all' or comma-separated indices (from 0).

    Raises:
        DataError: an index out of range or a word it does not know.
    """
    if frames in ("", "middle"):
        return [n // 2]
    if frames == "all":
        return list(range(n))
    try:
        picked = [int(x) for x in frames.split(",")]
    except ValueError:
        raise DataError(f"--frames '{frames}': expected middle, all or indices such as 0,5,9") from None
    bad = [k for k in picked if not 0 <= k < n]
    if bad:
        raise DataError(f"frame(s) {bad} out of range: the file has {n} frames (0-{n - 1})")
    return picked


def dicom_to_8bit(
    ds: Any, window: tuple[float, float] | None, frames: str = "middle"
) -> list[tuple[int, np.ndarray]]:
    """(frame index, 8-bit picture) for each chosen frame of a read dataset.

    Raises:
        DataError: pixels that cannot be decoded (a compressed transfer syntax without its plugin).
    """
    try:
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises RuntimeError, NotImplementedError, ValueError...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise DataError(
            f"pixels cannot be decoded ({type(e).__name__}: {e}); transfer syntax {syntax} "
            "(compressed files need pylibjpeg or gdcm: pip install pylibjpeg pylibjpeg-libjpeg)"
        ) from None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    colour = int(ds.get("SamplesPerPixel", 1)) == 3
    stack = pixels if n_frames > 1 else pixels[None]
    out = []
    for k in frames_to_take(n_frames, frames) if n_frames > 1 else [0]:
        frame = stack[k]
        if colour:  # RGB scans (photographs, some ultrasound) are shown as stored
            out.append((k, np.clip(frame, 0, 255).astype(np.uint8)))
            continue
        values = frame * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        grey = apply_window(values, *dicom_window(ds, window))
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            grey = 255 - grey  # MONOCHROME1: the lowest value is white
        out.append((k, grey))
    return out


class Labels:
    """A labels table keyed by file name, stem, relative path or a DICOM UID / patient ID."""

    def __init__(self, path: Path, columns: dict, key: str = ""):
        self.path, rows = path, read_rows(path)
        if not rows:
            raise DataError(f"{path}: no rows")
        names = list(rows[0][1])
        self.answer_col = find_column(names, "answer", columns, path.name)
        self.question_col = find_column(names, "question", columns, path.name, required=False)
        if key and key not in names:
            raise DataError(f"{path.name}: --label_key '{key}' is not a column ({names})")
        self.key_cols = [key] if key else [n for n in names if n not in (self.answer_col, self.question_col)]
        self.rows, self.used = rows, set()
        self.index = {c: {} for c in self.key_cols}  # column -> value -> row number
        for i, (_, row) in enumerate(rows):
            for c in self.key_cols:
                self.index[c].setdefault(str(row.get(c, "")).strip(), i)
        self.classes = sorted({str(r.get(self.answer_col, "")).strip() for _, r in rows} - {""})

    def find(self, path: Path, root: Path, ds: Any) -> tuple[str, dict] | None:
        """The (where, row) labelling this file, or None."""
        rel = str(path.relative_to(root)) if root.is_dir() else path.name
        wanted = {path.name, path.stem, rel, *(str(ds.get(a, "")) for a in GROUP_KEYS.values())} - {""}
        for col in self.key_cols:
            for value in sorted(wanted):
                if value in self.index[col]:
                    i = self.index[col][value]
                    self.used.add(i)
                    return self.rows[i]
        return None


def read_dicom(
    root: Path, labels: Labels | None, question: str, window: tuple[float, float] | None, frames: str
) -> Iterator[Item | Problem]:
    """Yields one Item per chosen frame of each DICOM file under ``root``."""
    pydicom = _pydicom()
    files = dicom_files(root)
    if not files:
        raise DataError(f"{root}: no DICOM files (*.dcm, or files with the DICM marker)")
    if labels is None:
        raise DataError(f"{root}: DICOM files carry no answer; give a table with --labels labels.csv")
    base = root if root.is_dir() else root.parent
    for path in files:
        where = str(path.relative_to(base))
        try:
            ds = pydicom.dcmread(path)
        except Exception as e:  # InvalidDicomError, OSError, struct errors in damaged files
            yield Problem(where, f"not a readable DICOM file ({type(e).__name__}: {e})")
            continue
        found = labels.find(path, base, ds)
        if found is None:
            yield Problem(where, f"no label in {labels.path.name} (its key columns {labels.key_cols} hold "
                          "none of this file's name, stem, path, UIDs or patient ID)")  # fmt: skip
            continue
        _, row = found
        answer = str(row.get(labels.answer_col, "")).strip()
        text = str(row.get(labels.question_col) or "").strip() if labels.question_col else ""
        text = text or fill_question(question or DEFAULT_QUESTION, labels.classes)
        keys = {k: str(ds.get(a)) for k, a in GROUP_KEYS.items() if ds.get(a)}
        keys.update({"modality": str(ds.get("Modality", "")), "source_file": where})
        try:
            pictures = dicom_to_8bit(ds, window, frames)
        except DataError as e:
            yield Problem(where, str(e))
            continue
        stem = where.rsplit(".", 1)[0] if path.suffix else where
        for k, grey in pictures:
            many = len(pictures) > 1 or int(ds.get("NumberOfFrames", 1) or 1) > 1
            name = f"{stem}-f{k}" if many else stem
            extra = {**keys, "frame": k} if many else keys
            yield Item(id=name.replace("/", "-"), where=where, image=grey, question=text, answer=answer,
                       name=f"{name}.png", extra=extra)  # fmt: skip


def unused_labels(labels: Labels) -> list[Problem]:
    """Rows of the labels table no file matched (reported as warnings)."""
    return [
        Problem(where, "no DICOM file matches this label row")
        for i, (where, _) in enumerate(labels.rows)
        if i not in labels.used
    ]
