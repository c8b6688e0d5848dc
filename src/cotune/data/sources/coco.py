"""COCO captions (``captions_train2017.json``) and VQA v2 (``v2_OpenEnded_mscoco_*_questions.json``
with its ``v2_mscoco_*_annotations.json``).

COCO captions: one record per image, the question a fixed request for a caption, the answer its
first caption and ``answers`` all of them (aliases for the answer matcher). VQA v2: one record per
question, the answer the annotators' ``multiple_choice_answer``, ``answers`` the answers at least
three of the ten annotators gave (VQA's own accuracy counts an answer right from three), and
``answer_type`` (yes/no, number, other) kept for per-class summaries. Images are found under
``data.image_root`` (default: the annotation file's folder) by COCO's file names.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cotune.data.images import resolve_image_path
from cotune.data.sample import DataError, Problem
from cotune.data.sources.writer import Item

CAPTION_QUESTION = "Describe the image in one sentence."


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path.name}:{e.lineno}: not JSON ({e.msg})") from None


def coco_kind(path: Path) -> str | None:
    """'coco' for a captions file, 'vqa' for a VQA questions file, None otherwise (reads the file)."""
    if path.suffix.lower() != ".json":
        return None
    try:
        obj = _load(path)
    except (DataError, OSError, UnicodeDecodeError):
        return None
    if isinstance(obj, dict) and isinstance(obj.get("questions"), list):
        return "vqa"
    if (
        isinstance(obj, dict)
        and isinstance(obj.get("images"), list)
        and isinstance(obj.get("annotations"), list)
    ):
        return "coco"
    return None


def _find_image(root: Path, names: list[str]) -> str | None:
    for name in names:
        for candidate in (name, f"images/{name}"):
            path = resolve_image_path(candidate, root)
            if Path(path).is_file():
                return path
    return None


def read_coco_captions(path: Path, image_root: Path) -> Iterator[Item | Problem]:
    """Yields one Item per image that has captions."""
    obj = _load(path)
    captions: dict[Any, list[str]] = {}
    for ann in obj["annotations"]:
        captions.setdefault(ann.get("image_id"), []).append(str(ann.get("caption", "")).strip())
    for k, image in enumerate(obj["images"]):
        where = f"{path.name}: images[{k}] (id {image.get('id')})"
        texts = [c for c in captions.get(image.get("id"), []) if c]
        if not texts:
            yield Problem(where, "no caption in annotations")
            continue
        name = str(image.get("file_name", ""))
        found = _find_image(image_root, [name]) if name else None
        if found is None:
            yield Problem(where, f"image '{name}' not found under {image_root} (set data.image_root?)")
            continue
        yield Item(
            id=f"coco-{image['id']}", where=where, image=found, question=CAPTION_QUESTION,
            answer=texts[0], name=name, extra={"answers": texts, "image_id": image["id"]},
        )  # fmt: skip


def _annotations_file(questions: Path, given: str) -> Path:
    if given:
        return Path(given)
    name = (
        questions.name.replace("OpenEnded_", "")
        .replace("MultipleChoice_", "")
        .replace("_questions", "_annotations")
    )
    guess = questions.with_name(name)
    if guess.name == questions.name or not guess.is_file():
        raise DataError(
            f"{questions}: its annotations file was not found (looked for {guess}); give --annotations FILE"
        )
    return guess


def _consensus(answers: list[dict]) -> list[str]:
    counts = Counter(str(a.get("answer", "")).strip() for a in answers)
    return [a for a, n in counts.most_common() if a and n >= 3]


def read_vqa(path: Path, image_root: Path, annotations: str = "") -> Iterator[Item | Problem]:
    """Yields one Item per VQA v2 question that has an annotation."""
    questions = _load(path)
    ann_path = _annotations_file(path, annotations)
    by_question = {a["question_id"]: a for a in _load(ann_path).get("annotations", [])}
    subtype = questions.get("data_subtype", "")
    for k, q in enumerate(questions["questions"]):
        where = f"{path.name}: questions[{k}] (question_id {q.get('question_id')})"
        ann = by_question.get(q.get("question_id"))
        if ann is None:
            yield Problem(where, f"no annotation in {ann_path.name}")
            continue
        image_id = int(q["image_id"])
        names = [f"COCO_{subtype}_{image_id:012d}.jpg", f"{image_id:012d}.jpg"]
        names = [f"{subtype}/{n}" for n in names] + names if subtype else names
        found = _find_image(image_root, names)
        if found is None:
            yield Problem(
                where,
                f"image '{names[-2] if subtype else names[0]}' not found under {image_root} (set data.image_root?)",
            )
            continue
        answer = str(ann.get("multiple_choice_answer", "")).strip()
        extra = {"answers": _consensus(ann.get("answers", [])) or [answer], "image_id": image_id}
        if ann.get("answer_type"):
            extra["answer_type"] = ann["answer_type"]
        yield Item(
            id=f"vqa-{q['question_id']}", where=where, image=found, question=str(q.get("question", "")),
            answer=answer, name=Path(found).name, extra=extra,
        )  # fmt: skip
