"""Preference pairs: reading them in three layouts, checking them as training data, writing them.

A pair is one prompt (turns and images) and two replies to it, the chosen one and the rejected one.
Three layouts are read, one record per line (JSON lines) or in a JSON list:

* cotune (LLaVA-CoT's conversation style; what ``cotune data pairs`` writes)::

    {"id": "7", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nQ"}],
     "chosen": "<SUMMARY>...", "rejected": "<SUMMARY>..."}

* TRL's vision preference layout (``DPOTrainer``; prompt and replies as chat messages)::

    {"images": ["a.png"], "prompt": [{"role": "user", "content": [{"type": "image"},
     {"type": "text", "text": "Q"}]}], "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [...]}     (``chosen``/``rejected`` may also be plain strings)

* LLaMA-Factory's sharegpt preference layout::

    {"conversations": [{"from": "human", "value": "<image>Q"}], "chosen": {"from": "gpt", "value": "..."},
     "rejected": {"from": "gpt", "value": "..."}, "images": ["a.png"]}

Each side becomes a ``Sample`` (the prompt turns plus its reply) through the same structural checks as
SFT records (``sample.conversation_to_messages``: alternating turns, image markers against images), and
is later tokenized by the one masking rule (``chat.tokenize_conversation``). Every problem is located as
``file:line``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cotune.data.formats import _content_text, iter_json_records
from cotune.data.records import check_sample_images
from cotune.data.sample import ROLES, Problem, Sample, conversation_to_messages, image_refs

PAIR_LAYOUTS = ("cotune", "trl", "llamafactory")


def is_pairs_file(path: str | Path) -> bool:
    """True when ``path`` is a JSON or JSON-lines file whose first record holds 'chosen' and 'rejected'."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in (".json", ".jsonl"):
        return False
    for _, obj in iter_json_records(path):
        if isinstance(obj, dict):
            return "chosen" in obj and "rejected" in obj
    return False


def pair_layout(obj: dict) -> str:
    """Which layout a record is in (see the module docstring). Raises ValueError naming the fields."""
    if "chosen" not in obj or "rejected" not in obj:
        raise ValueError(f"a preference pair needs 'chosen' and 'rejected' (the record has {sorted(obj)})")
    if "prompt" in obj:
        return "trl"
    if "conversations" in obj or "messages" in obj:
        return "llamafactory" if isinstance(obj["chosen"], dict) else "cotune"
    raise ValueError(
        "no prompt: expected 'conversations' (cotune, LLaMA-Factory) or 'prompt' (TRL) beside chosen/rejected"
    )


def _prompt_turns(obj: dict, layout: str) -> list[tuple[str, str]]:
    """The prompt as (role, text) turns, ``<image>`` where an image goes; it must end with a user turn."""
    if layout == "trl":
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            turns = [("user", prompt)]
        elif isinstance(prompt, list) and prompt:
            turns = [_message_turn(m, k, "prompt") for k, m in enumerate(prompt)]
        else:
            raise ValueError("'prompt' is empty or neither a string nor a list of messages")
    else:
        key = "conversations" if "conversations" in obj else "messages"
        convs = obj[key]
        if not isinstance(convs, list) or not convs:
            raise ValueError(f"'{key}' is empty or not a list")
        turns = [_message_turn(m, k, key) for k, m in enumerate(convs)]
    if turns[-1][0] != "user":
        raise ValueError("the prompt must end with a user turn (the replies are 'chosen' and 'rejected')")
    return turns


def _message_turn(m: Any, k: int, field: str) -> tuple[str, str]:
    if not isinstance(m, dict):
        raise ValueError(f"'{field}' turn {k + 1} is not an object")
    role = m.get("from", m.get("role"))
    if role not in ROLES:
        raise ValueError(
            f"'{field}' turn {k + 1}: unknown speaker {role!r} (expected human/user, gpt/assistant, system)"
        )
    text = _content_text(m.get("value", m.get("content")), k)
    if not text.strip():
        raise ValueError(f"'{field}' turn {k + 1} is empty")
    return ROLES[role], text


def _reply_text(value: Any, name: str) -> str:
    """A reply given as a string, a {"from": "gpt", "value"} turn, or a list of assistant messages."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"'{name}' holds {len(value)} messages; expected one assistant reply")
        role, text = _message_turn(value[0], 0, name)
        if role != "assistant":
            raise ValueError(f"'{name}' is a '{role}' message; expected the assistant's reply")
        value = text
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{name}' is missing, empty or not a reply")
    return value


def parse_pair_record(obj: Any, where: str, root: Path, system_prompt: str = "") -> tuple[Sample, Sample]:
    """One pair record in any layout -> (chosen Sample, rejected Sample) sharing prompt and images.

    Raises:
        ValueError: with a reason fit for a user (the caller adds file:line).
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    layout = pair_layout(obj)
    turns = _prompt_turns(obj, layout)
    chosen, rejected = _reply_text(obj["chosen"], "chosen"), _reply_text(obj["rejected"], "rejected")
    if chosen.strip() == rejected.strip():
        raise ValueError("'chosen' and 'rejected' are the same reply: nothing to prefer")
    image = obj.get("image")
    refs = image_refs(image if image not in (None, "", []) else obj.get("images"), root)
    skip = ("conversations", "messages", "prompt", "chosen", "rejected", "image", "images")
    meta = {k: v for k, v in obj.items() if k not in skip}
    rid = str(obj.get("id", where))
    sides = []
    for reply in (chosen, rejected):
        messages = conversation_to_messages([*turns, ("assistant", reply)], len(refs), system_prompt)
        sides.append(Sample(id=rid, messages=messages, images=refs, where=where, meta=meta))
    return sides[0], sides[1]


def read_pairs(
    path: str | Path,
    image_root: str = "",
    system_prompt: str = "",
    workers: int = 4,
    image_check: str = "decode",
) -> tuple[list[tuple[Sample, Sample]], list[Problem]]:
    """Reads and checks a pairs file: records parsed, structure checked, images checked once.

    Returns:
        The usable (chosen, rejected) pairs and the problems of the others, each with file:line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pairs file '{path}' not found")
    root = Path(image_root) if image_root else path.parent
    pairs, problems = [], []
    for where, obj in iter_json_records(path):
        if isinstance(obj, json.JSONDecodeError):
            problems.append(Problem(where, f"invalid JSON ({obj.msg} at column {obj.colno})"))
            continue
        try:
            pairs.append(parse_pair_record(obj, where, root, system_prompt))
        except ValueError as e:
            problems.append(Problem(where, str(e)))
    good, image_problems = check_sample_images([c for c, _ in pairs], workers, decode=image_check == "decode")
    kept = {id(s) for s in good}
    return [p for p in pairs if id(p[0]) in kept], problems + image_problems


# ----------------------------------------------------------------------------- building and writing


def pair_record(
    rid: str, image: Any, question: str, chosen: str, rejected: str, **meta: Any
) -> dict[str, Any]:
    """A pair in cotune's layout (``question`` holds ``<image>`` markers, or none: images go first)."""
    return {
        "id": rid,
        "image": image,
        "conversations": [{"from": "human", "value": question}],
        "chosen": chosen,
        "rejected": rejected,
        **meta,
    }


def with_image_markers(question: str, image: Any) -> str:
    """``question`` with one ``<image>`` line per image when it has no marker of its own."""
    n = len(image) if isinstance(image, list) else (1 if image else 0)
    if "<image>" in question or n == 0:
        return question
    return "<image>\n" * n + question


def match_pairs(right: list[str], wrong: list[str], per_record: int) -> list[tuple[str, str]]:
    """Up to ``per_record`` (right, wrong) pairs, each reply used as few times as possible (round robin)."""
    combos = [(i, j) for i in range(len(right)) for j in range(len(wrong))]
    combos.sort(key=lambda ij: ((ij[1] - ij[0]) % len(wrong), ij[0]))  # diagonals first: each reply once
    return [(right[i], wrong[j]) for i, j in combos[:per_record]]


def pairs_from_attempts(path: str | Path, per_record: int = 1) -> tuple[list[dict], list[Problem]]:
    """Pairs from ``cotune data reason``'s attempts file (``OUT.attempts.jsonl``): for each record id,
    its accepted attempts against its rejected ones (a record with only one kind gives no pair).

    Returns:
        The pair records (cotune layout) and the problems of unusable lines.
    """
    by_id: dict[str, dict] = {}
    problems = []
    for where, obj in iter_json_records(Path(path)):
        if isinstance(obj, json.JSONDecodeError):
            problems.append(Problem(where, f"invalid JSON ({obj.msg} at column {obj.colno})"))
            continue
        missing = [
            k for k in ("id", "question", "reply", "accepted") if not isinstance(obj, dict) or k not in obj
        ]
        if missing:
            problems.append(
                Problem(where, f"an attempt needs {', '.join(missing)} (is this an attempts file?)")
            )
            continue
        entry = by_id.setdefault(str(obj["id"]), {"obj": obj, "right": [], "wrong": []})
        reply = obj["reply"]
        if isinstance(reply, str) and reply.strip():
            entry["right" if obj["accepted"] is True else "wrong"].append(reply)
    out = []
    for rid, e in by_id.items():
        o = e["obj"]
        question = with_image_markers(o["question"], o.get("image"))
        for k, (c, r) in enumerate(match_pairs(_unique(e["right"]), _unique(e["wrong"]), per_record)):
            pid = rid if k == 0 else f"{rid}#{k}"
            out.append(
                pair_record(pid, o.get("image"), question, c, r, answer=o.get("answer"), source="attempts")
            )
    return out, problems


def rebase_images(record: dict, source_dir: str | Path, out_dir: str | Path) -> dict:
    """``record`` with its image paths (relative to ``source_dir``, or absolute) made relative to
    ``out_dir``, where the pairs file goes: the file is read with its own folder as the image root.
    An image outside that folder keeps an absolute path (then train with ``data.image_root`` set to a
    folder that holds it)."""

    def move(ref: Any) -> Any:
        if not isinstance(ref, str) or not ref or "://" in ref:
            return ref
        where = os.path.abspath(os.path.join(source_dir, ref))
        rel = os.path.relpath(where, out_dir)
        return where if rel.startswith("..") else rel

    image = record.get("image")
    return {**record, "image": [move(r) for r in image] if isinstance(image, list) else move(image)}


def _unique(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(t.strip() for t in texts))


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Writes ``records`` as JSON lines atomically (a temporary sibling, flushed, then one rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
