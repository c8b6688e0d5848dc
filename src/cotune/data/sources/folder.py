"""A class-per-folder tree (torchvision's ImageFolder): ``ROOT/CLASS/**/picture``; the folder's name
is the answer, the question comes from a template.

    photos/good/001.jpg   photos/scratch/a/17.png   photos/dent/x.tif
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cotune.data.sample import DataError, Problem
from cotune.data.sources.writer import Item

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DEFAULT_QUESTION = "Which of these best describes the image: {classes}? Answer with one of them."


def is_image_folder(path: Path) -> bool:
    """True when ``path`` is a folder whose subfolders hold pictures."""
    if not path.is_dir():
        return False
    return any(
        sub.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in sub.rglob("*"))
        for sub in path.iterdir()
    )


def fill_question(template: str, classes: list[str], **fields: Any) -> str:
    """The template with ``{classes}`` (the class list, comma-separated) and any other field filled."""
    try:
        return template.format(classes=", ".join(classes), **fields)
    except (KeyError, IndexError) as e:
        known = ", ".join(["{classes}", *(f"{{{k}}}" for k in fields)])
        raise DataError(
            f"question template '{template}' names {e}, which is not known (known: {known})"
        ) from None


def read_folder(root: Path, classes: list[str], question: str) -> Iterator[Item | Problem]:
    """Yields one Item per picture under each class folder, in sorted order.

    Args:
        root: the tree's root.
        classes: the class folders to read, in this order (empty: every subfolder, sorted).
        question: the template (``{classes}`` is the class list).

    Raises:
        DataError: a named class has no folder, or there is no class at all.
    """
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = list(classes) or found
    missing = [c for c in classes if c not in found]
    if missing:
        raise DataError(f"{root}: no folder for class(es) {missing} (folders there: {found})")
    if not classes:
        raise DataError(f"{root}: no class folders (expected ROOT/CLASS/picture.png)")
    text = fill_question(question or DEFAULT_QUESTION, classes)
    for label in classes:
        for path in sorted(p for p in (root / label).rglob("*") if p.is_file()):
            rel = path.relative_to(root)
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                yield Problem(str(rel), f"not a picture ({path.suffix or 'no suffix'}); skipped")
                continue
            stem = str(rel.with_suffix("")).replace("/", "-")
            yield Item(id=stem, where=str(rel), image=path, question=text, answer=label, name=str(rel))
