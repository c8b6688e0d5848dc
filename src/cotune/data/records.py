"""Reading annotation files into one ``Sample`` type, with every problem located by file and line.

A ``Sample`` is a conversation in the chat format of Hugging Face processors (a list of messages
whose content is a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` items) plus
the images it refers to. Every reader produces Samples; nothing downstream knows the file format.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.data.images import check_image

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """Raised with every problem listed when ``on_error`` is 'raise'."""


@dataclass
class Problem:
    """One bad record: where it is and why it cannot be used."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Sample:
    """One training example.

    Attributes:
        id: the record's id (or file:line when it has none).
        messages: chat messages, content as lists of image/text items.
        images: one entry per image item, in order: a path, raw bytes or a PIL image.
        where: "file:line" of the record, for messages about it.
        meta: extra fields of the record (e.g. a gold "answer"), kept for evaluation.
    """

    id: str
    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    where: str = ""
    meta: dict = field(default_factory=dict)


def split_placeholders(text: str, placeholder: str = IMAGE_PLACEHOLDER) -> list[dict]:
    """'<image>\\nWhat is this?' -> [{"type": "image"}, {"type": "text", "text": "What is this?"}]."""
    items: list[dict] = []
    pieces = text.split(placeholder)
    for k, piece in enumerate(pieces):
        if k > 0:
            items.append({"type": "image"})
        piece = piece.strip() if len(pieces) > 1 else piece
        if piece:
            items.append({"type": "text", "text": piece})
    return items


def conversation_to_messages(
    turns: list[tuple[str, str]], n_images: int, system_prompt: str = ""
) -> list[dict]:
    """Builds chat messages from (role, text) turns; places images at their ``<image>`` markers.

    When the text has no marker but the record has images, they go before the first user text,
    as in LLaVA-CoT-100k records that omit the marker.

    Raises:
        ValueError: structural problems, with a reason fit for a user.
    """
    messages: list[dict] = []
    if system_prompt and not any(role == "system" for role, _ in turns):
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    seen_user = False
    for k, (role, text) in enumerate(turns):
        if role == "assistant" and not seen_user:
            raise ValueError(f"turn {k + 1} is a reply before any question")
        if role == "system" and k > 0:
            raise ValueError(f"turn {k + 1}: a system message may only come first")
        seen_user = seen_user or role == "user"
        if messages and messages[-1]["role"] == role:
            raise ValueError(f"turns {k} and {k + 1} are both from '{role}'; turns must alternate")
        items = split_placeholders(text) if role == "user" else [{"type": "text", "text": text}]
        messages.append({"role": role, "content": items})
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the conversation does not end with a reply: nothing to learn")
    n_markers = sum(item["type"] == "image" for m in messages for item in m["content"])
    if n_markers == 0 and n_images:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"][:0] = [{"type": "image"} for _ in range(n_images)]
    elif n_markers != n_images:
        raise ValueError(f"{n_markers} '<image>' markers but {n_images} images")
    return messages


def parse_llava_record(obj: Any, where: str, image_root: Path, system_prompt: str = "") -> Sample:
    """One LLaVA / LLaVA-CoT-100k record -> Sample. Raises ValueError with the reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    convs = obj.get("conversations")
    if convs is None:
        raise ValueError("no 'conversations' field")
    if not isinstance(convs, list) or not convs:
        raise ValueError("'conversations' is empty or not a list")
    turns = []
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {k + 1} is not an object")
        who, value = turn.get("from"), turn.get("value")
        if who not in ROLES:
            raise ValueError(f"turn {k + 1}: unknown speaker {who!r} (expected human, gpt or system)")
        if not isinstance(value, str):
            raise ValueError(f"turn {k + 1}: 'value' is {type(value).__name__}, not a string")
        if not value.strip():
            raise ValueError(f"turn {k + 1}: 'value' is empty")
        turns.append((ROLES[who], value))
    image = obj.get("image", obj.get("images"))
    refs = [] if image in (None, "", []) else ([image] if isinstance(image, str) else image)
    if not all(isinstance(r, str) and r for r in refs):
        raise ValueError("'image' must be a path or a list of paths")
    messages = conversation_to_messages(turns, len(refs), system_prompt)
    meta = {k: v for k, v in obj.items() if k not in ("conversations", "image", "images")}
    return Sample(
        id=str(obj.get("id", where)),
        messages=messages,
        images=[str(image_root / r) for r in refs],
        where=where,
        meta=meta,
    )


def read_jsonl(path: Path, image_root: Path, system_prompt: str = "") -> tuple[list[Sample], list[Problem]]:
    """Reads a LLaVA-CoT-100k style JSONL file (one record per line; blank lines ignored)."""
    samples, problems = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(Problem(where, f"invalid JSON ({e.msg} at column {e.colno})"))
                continue
            try:
                samples.append(parse_llava_record(obj, where, image_root, system_prompt))
            except ValueError as e:
                problems.append(Problem(where, str(e)))
    return samples, problems


def check_sample_images(samples: list[Sample], workers: int = 4) -> tuple[list[Sample], list[Problem]]:
    """Decodes every image once, in threads; returns the samples whose images are all usable."""

    def first_problem(sample: Sample) -> str | None:
        for ref in sample.images:
            reason = check_image(ref)
            if reason:
                return reason
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(first_problem, samples))
    good = [s for s, r in zip(samples, reasons) if r is None]
    problems = [Problem(s.where, r) for s, r in zip(samples, reasons) if r is not None]
    return good, problems


def load_samples(
    path: str | Path, image_root: str = "", system_prompt: str = ""
) -> tuple[list[Sample], list[Problem]]:
    """Reads and validates a data file: records parsed, structure checked, images decoded.

    Args:
        path: a JSONL file in LLaVA-CoT-100k format.
        image_root: folder image paths are relative to (default: the file's folder).
        system_prompt: added as the first message when the record has none.

    Returns:
        The usable samples and the problems of the others, each with file:line and reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file '{path}' not found")
    root = Path(image_root) if image_root else path.parent
    samples, problems = read_jsonl(path, root, system_prompt)
    samples, image_problems = check_sample_images(samples)
    problems += image_problems
    problems.sort(
        key=lambda p: int(p.where.rsplit(":", 1)[-1]) if p.where.rsplit(":", 1)[-1].isdigit() else 0
    )
    return samples, problems


def report_problems(problems: list[Problem], on_error: str, total: int, log=print) -> None:
    """Prints every problem; raises DataError listing them all when ``on_error`` is 'raise'."""
    if not problems:
        return
    listing = "\n".join(f"  {p}" for p in problems)
    if on_error == "raise":
        raise DataError(f"{len(problems)} of {total} records are unusable (data.on_error=raise):\n{listing}")
    log(f"skipping {len(problems)} of {total} records (data.on_error=skip):\n{listing}")


def split_train_test(samples: list[Sample], ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A deterministic, disjoint split: ``ratio`` of the samples (at least one) go to test."""
    if len(samples) < 2:
        raise DataError(
            "need at least 2 usable records to hold some out for validation (or give a test file)"
        )
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(samples) * ratio))
    test_idx = set(order[:n_test])
    train = [s for i, s in enumerate(samples) if i not in test_idx]
    test = [s for i, s in enumerate(samples) if i in test_idx]
    return train, test
