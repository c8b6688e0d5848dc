"""Reading annotation files into one ``Sample`` type, with every problem located by file and line.

A ``Sample`` is a conversation in the chat format of Hugging Face processors (a list of messages
whose content is a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` items) plus
the images it refers to. Every reader produces Samples; nothing downstream knows the file format.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cotune.data.images import check_image, resolve_image_path

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


def image_refs(value: Any, root: Path) -> list[Any]:
    """A record's image references: paths joined to ``root`` (and refused if they leave it);
    bytes, datasets Image cells, PIL images and lazy table references pass through.

    Raises:
        ValueError: a reference of another type, a URL, or a path escaping the root.
    """
    if value is None or (isinstance(value, str | list) and not value):
        return []
    out = []
    for ref in value if isinstance(value, list) else [value]:
        if isinstance(ref, str) and ref:
            out.append(resolve_image_path(ref, root))
        elif isinstance(ref, dict) and ref.get("path") and not ref.get("bytes"):
            out.append(resolve_image_path(ref["path"], root))
        elif isinstance(ref, bytes | dict) or hasattr(ref, "fetch") or hasattr(ref, "getpixel"):
            out.append(ref)
        else:
            raise ValueError(f"image reference {ref!r:.60} is not a path, bytes or an image")
    return out


def record_turn_list(obj: Any, name: str) -> list:
    """A record's list of turns, ``obj[name]``. Raises ValueError when ``obj`` is not an object or
    the field is missing, empty or not a list."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    turns = obj.get(name)
    if turns is None:
        raise ValueError(f"no '{name}' field")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{name}' is empty or not a list")
    return turns


def parse_llava_record(obj: Any, where: str, image_root: Path, system_prompt: str = "") -> Sample:
    """One LLaVA / LLaVA-CoT-100k record -> Sample. Raises ValueError with the reason."""
    convs = record_turn_list(obj, "conversations")
    turns = []
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {k + 1} is not an object")
        who, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if who not in ROLES:
            raise ValueError(f"turn {k + 1}: unknown speaker {who!r} (expected human, gpt or system)")
        if not isinstance(value, str):
            raise ValueError(f"turn {k + 1}: 'value' is {type(value).__name__}, not a string")
        if not value.strip():
            raise ValueError(f"turn {k + 1}: 'value' is empty")
        turns.append((ROLES[who], value))
    image = obj.get("image")
    refs = image_refs(image if image not in (None, "", []) else obj.get("images"), image_root)
    messages = conversation_to_messages(turns, len(refs), system_prompt)
    meta = {k: v for k, v in obj.items() if k not in ("conversations", "image", "images")}
    return Sample(id=str(obj.get("id", where)), messages=messages, images=refs, where=where, meta=meta)


# Checks of more images than this show a progress bar.
PROGRESS_MIN_IMAGES = 2000


def check_sample_images(
    samples: list[Sample], workers: int = 4, decode: bool = True
) -> tuple[list[Sample], list[Problem]]:
    """Checks every image once, in threads; returns the samples whose images are all usable.

    Args:
        samples: parsed samples.
        workers: threads.
        decode: decode every image (True), or read only its header (``data.image_check: header``).
    """

    def first_problem(sample: Sample) -> str | None:
        for ref in sample.images:
            reason = check_image(ref, decode=decode)
            if reason:
                return reason
        return None

    n_images = sum(len(s.images) for s in samples)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(
            tqdm(
                pool.map(first_problem, samples, chunksize=16),
                total=len(samples),
                desc=f"checking images ({'decode' if decode else 'header'})",
                unit="record",
                disable=n_images < PROGRESS_MIN_IMAGES,
                dynamic_ncols=True,
            )
        )
    good = [s for s, r in zip(samples, reasons) if r is None]
    problems = [Problem(s.where, r) for s, r in zip(samples, reasons) if r is not None]
    return good, problems


def problem_order(where: str) -> tuple[str, int]:
    """Sort key: file, then line / row number."""
    name, _, tail = where.rpartition(":")
    digits = "".join(ch for ch in tail if ch.isdigit())
    return (name, int(digits) if digits else 0)


def load_samples(
    path: str | Path,
    image_root: str = "",
    system_prompt: str = "",
    fmt: str = "auto",
    columns: dict | None = None,
    log=None,
    workers: int = 4,
    image_check: str = "decode",
) -> tuple[list[Sample], list[Problem]]:
    """Reads and validates a data file: records parsed, structure checked, images checked.

    Args:
        path: a data file or folder in any format of ``data/formats.py``.
        image_root: folder image paths are relative to (default: the file's folder); paths that
            leave it are refused.
        system_prompt: added as the first message when the record has none.
        fmt: ``data.format``; 'auto' detects it and says what it found through ``log``.
        columns: ``data.columns``, canonical name -> the table's column name.
        log: where to say which format was detected (None: silent).
        workers: threads checking images.
        image_check: 'decode' every image, or read only each image's 'header' (fast; an image
            whose data is cut short is then found, and skipped, when training reaches it).

    Returns:
        The usable samples and the problems of the others, each with file:line and reason.
    """
    from cotune.data.formats import detect_format, read_records

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file '{path}' not found")
    if fmt == "auto":
        fmt, why = detect_format(path, columns)
        if log is not None:
            log(f"{path.name}: format '{fmt}' detected ({why}); set data.format to override")
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    samples, problems = read_records(path, fmt, root, system_prompt, columns)
    if image_check not in ("decode", "header"):
        raise ValueError(f"data.image_check must be 'decode' or 'header', not '{image_check}'")
    samples, image_problems = check_sample_images(samples, workers=workers, decode=image_check == "decode")
    problems += image_problems
    problems.sort(key=lambda p: problem_order(p.where))
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
