"""What every source reader produces (``Item``) and how ``cotune data import`` writes it: LLaVA-CoT
JSONL with the gold ``answer`` and any grouping keys, and the images beside it.

Images are copied byte for byte when they are ordinary 8-bit PNG/JPEG/WebP files (no second JPEG
compression); 16-bit and float pictures go through a fixed window (``window.py``), and anything else
(TIFF, BMP, DICOM pixels, base64 cells) is written as PNG.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cotune.data.images import load_image, to_rgb
from cotune.data.sample import DataError, Problem
from cotune.data.sources.window import is_high_bit_depth, sixteen_bit_to_8bit

RECORDS_FILE = "data.jsonl"
IMAGES_DIR = "images"
MARKER = "import.json"  # what was imported, from where, with which options
_COPIED_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


@dataclass
class Item:
    """One record a reader found.

    Attributes:
        id: unique within the import.
        where: the file (and line or row) it came from, for problems.
        image: a path, encoded bytes, a PIL image or an 8-bit numpy array.
        question: the user's question (without ``<image>``).
        answer: the gold short answer.
        name: the image's file name under ``images/`` (its extension may change).
        extra: fields kept in the record: grouping keys (patient_id, study_uid...), options, aliases.
    """

    id: str
    where: str
    image: Any
    question: str
    answer: str
    name: str
    extra: dict = field(default_factory=dict)


def _safe_name(name: str) -> str:
    parts = [
        re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip("._") or "x"
        for p in Path(name).parts
        if p not in ("..", "/")
    ]
    return "/".join(parts) or "image"


def _open(image: Any) -> Image.Image:
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    if isinstance(image, bytes | bytearray):
        return load_image(bytes(image), decode=False)
    if isinstance(image, Image.Image):
        return image
    return load_image(str(image), decode=False)  # header checks: missing, empty, bombs, aspect


class ImportWriter:
    """Collects records and writes their images into ``folder`` (a temporary folder of ``atomic_dir``).

    Args:
        folder: where ``data.jsonl`` and ``images/`` go.
        window: a fixed (center, width) for 16-bit pictures, or None for their type's full range.
    """

    def __init__(self, folder: Path, window: tuple[float, float] | None = None):
        self.folder = Path(folder)
        self.window = window
        self.records: list[dict] = []
        self.names: set[str] = set()
        self.ids: set[str] = set()
        self.written: dict[str, str] = {}
        self.converted = Counter()  # 'copied', 'windowed', 'png'

    def _unique(self, name: str, suffix: str) -> str:
        stem = str(Path(_safe_name(name)).with_suffix(""))
        candidate, k = f"{IMAGES_DIR}/{stem}{suffix}", 1
        while candidate in self.names:
            k += 1
            candidate = f"{IMAGES_DIR}/{stem}-{k}{suffix}"
        self.names.add(candidate)
        return candidate

    def _write_image(self, source: Any, name: str) -> str:
        image = _open(source)
        image.load()  # decodes fully: a file cut short fails here, with its reason
        if is_high_bit_depth(image):
            image, how = sixteen_bit_to_8bit(image, self.window), "windowed"
        elif image.format in _COPIED_FORMATS and isinstance(source, str | Path | bytes):
            rel = self._unique(name, _COPIED_FORMATS[image.format])
            (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                (self.folder / rel).write_bytes(source)
            else:
                shutil.copyfile(source, self.folder / rel)
            self.converted["copied"] += 1
            return rel
        else:
            how = "png"
            image = image if image.mode in ("L", "RGB") else to_rgb(image)
        rel = self._unique(name, ".png")
        (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(self.folder / rel, format="PNG")
        self.converted[how] += 1
        return rel

    def _image(self, source: Any, name: str) -> str:
        key = str(source) if isinstance(source, str | Path) else None
        if key not in self.written:  # a source file used by several records is written once
            rel = self._write_image(source, name)
            if key is None:
                return rel
            self.written[key] = rel
        return self.written[key]

    def add(self, item: Item) -> Problem | None:
        """Writes the item's image and keeps its record; returns the Problem instead when it cannot."""
        if not str(item.answer).strip():
            return Problem(item.where, "no answer (an empty label)")
        if item.id in self.ids:
            return Problem(item.where, f"id '{item.id}' appears twice (ids must be unique)")
        sources = item.image if isinstance(item.image, list) else [item.image]
        try:
            stem, dot, suffix = item.name.rpartition(".")
            names = (
                [item.name]
                if len(sources) == 1
                else [f"{stem or suffix}-{k}.{suffix}" for k in range(len(sources))]
            )
            rels = [self._image(src, name) for src, name in zip(sources, names)]
        except (ValueError, OSError, DataError) as e:
            reason = str(e)
            if "image" not in reason:
                reason = f"image cannot be read ({type(e).__name__}: {reason})"
            return Problem(item.where, reason)
        self.ids.add(item.id)
        record = {
            "id": item.id,
            "image": rels if isinstance(item.image, list) else rels[0],
            "conversations": [
                {"from": "human", "value": "<image>\n" * len(rels) + item.question.strip()},
                {"from": "gpt", "value": str(item.answer).strip()},
            ],
            "answer": str(item.answer).strip(),
            **item.extra,
        }
        self.records.append(record)
        return None

    def finish(self, marker: dict) -> Path:
        """Writes ``data.jsonl`` and ``import.json``; returns the records file."""
        path = self.folder / RECORDS_FILE
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for record in self.records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        (self.folder / MARKER).write_text(json.dumps(marker, indent=1, default=str) + "\n")
        return path
