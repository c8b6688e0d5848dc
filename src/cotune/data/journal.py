"""An append-only JSON-lines journal that survives a kill: each line is fsynced as it is written, a
line cut short by a kill is dropped when the file is read again, and files derived from the journal
are written whole or not at all. ``cotune data reason`` keeps every attempt this way
(``OUT.attempts.jsonl``), and ``read_journal`` reads it back for a resume or for preference pairs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cotune.data.sample import DataError


def read_journal(path: Path) -> list[dict]:
    """The attempts written so far; a last line cut short by a kill is removed from the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]  # a line is complete once its newline is on disk
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    lines = []
    for lineno, line in enumerate(keep.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not JSON ({e.msg}); move the file away to start over"
                ) from None
    return lines


def append_line(f, entry: dict) -> None:
    """Appends one JSON line to the open file ``f`` and fsyncs it: on disk before it counts as done."""
    f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    """Writes JSON lines to a temporary sibling, fsyncs it, and renames it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
