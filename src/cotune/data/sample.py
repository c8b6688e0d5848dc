"""The one ``Sample`` type every reader produces, the ``Problem`` of a record that is not one, and the
checks that build a valid conversation from a record's turns.

A ``Sample`` is a conversation in the chat format of Hugging Face processors (a list of messages
whose content is a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` items) plus
the images it refers to. ``formats`` parses each file format into Samples with these pieces, and
``records`` reads whole files through ``formats``: the imports run records -> formats -> sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.data.chat import system_message
from cotune.data.images import resolve_image_path

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
        messages.append(system_message(system_prompt))
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
