"""The Review page: accept, reject or edit generated reasoning, one record at a time, saved as decided.

A queue is a JSONL file. ``cotune data reason`` writes the accepted records to ``OUT.jsonl`` and every
attempt to ``OUT.attempts.jsonl`` (one line per attempt: id, attempt, image, question, answer, reply,
accepted, why, teacher, hinted); when that file is there the queue is its attempts, so a person sees
the teacher's rejected replies too. Any other JSONL of LLaVA records is a queue of its records (the
reply is the last ``gpt`` turn).

Beside ``OUT.jsonl`` the studio writes, each time a decision is made and each atomically:

* ``OUT.review.json``: the decisions (``{key: {"decision", "reply"}}``); reopening resumes from it;
* ``OUT.reviewed.jsonl``: the accepted and edited replies as LLaVA-CoT training records;
* ``OUT.pairs.jsonl``: preference pairs in cotune's pair format
  (``{"id", "image", "conversations": [human turn], "chosen", "rejected"}``): for each rejected reply,
  an accepted or edited reply of the same record is chosen; an edited reply is also chosen over the
  reply it replaced.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from cotune.studio.runs import read_jsonl
from cotune.studio.safety import Folders, atomic_write_text

DECISIONS = ("accept", "reject", "edit")
ATTEMPT_KEYS = {"id", "attempt", "reply"}


def queue_stem(path: Path) -> Path:
    """``OUT`` of ``OUT.jsonl`` or ``OUT.attempts.jsonl``: the outputs are named after it."""
    name = path.name
    for suffix in (".attempts.jsonl", ".jsonl", ".json"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path


def _turns(record: dict) -> list[dict]:
    turns = record.get("conversations") or []
    return [t for t in turns if isinstance(t, dict)]


def _item_from_record(k: int, record: dict) -> dict[str, Any]:
    turns = _turns(record)
    human = next((str(t.get("value", "")) for t in turns if t.get("from") in ("human", "user")), "")
    reply = next(
        (str(t.get("value", "")) for t in reversed(turns) if t.get("from") in ("gpt", "assistant")), ""
    )
    key = str(record.get("id", f"line{k + 1}"))
    return {"key": key, "id": key, "image": record.get("image"), "question": human, "reply": reply,
            "answer": record.get("answer"), "record": record}  # fmt: skip


def _item_from_attempt(row: dict) -> dict[str, Any]:
    question = str(row.get("question", ""))
    if row.get("image") and "<image>" not in question:
        question = "<image>\n" + question
    return {
        "key": f"{row['id']}#{row.get('attempt', 0)}",
        "id": str(row["id"]),
        "image": row.get("image"),
        "question": question,
        "reply": str(row.get("reply", "")),
        "answer": row.get("answer"),
        "teacher": {k: row.get(k) for k in ("accepted", "why", "teacher", "hinted", "attempt")},
    }


class ReviewQueue:
    """One queue and its decisions file.

    Args:
        path: ``OUT.jsonl`` (its ``OUT.attempts.jsonl`` is used when present) or any JSONL of records.
        folders: the studio's folders; outputs are written only inside them.
    """

    def __init__(self, path: str | Path, folders: Folders) -> None:
        path = Path(path)
        attempts = queue_stem(path).with_name(queue_stem(path).name + ".attempts.jsonl")
        self.source = attempts if attempts.is_file() else path
        self.stem = queue_stem(path)
        self.folders = folders
        folders.inside(self.stem.parent)  # refuses a queue outside the studio's folders
        self.decisions_path = self.stem.with_name(self.stem.name + ".review.json")
        self.reviewed_path = self.stem.with_name(self.stem.name + ".reviewed.jsonl")
        self.pairs_path = self.stem.with_name(self.stem.name + ".pairs.jsonl")
        self._lock = threading.Lock()
        rows = read_jsonl(self.source)
        self.attempts = bool(rows) and all(ATTEMPT_KEYS <= set(r) for r in rows)
        self.items = [
            _item_from_attempt(r) if self.attempts else _item_from_record(k, r) for k, r in enumerate(rows)
        ]
        self.decisions: dict[str, dict] = {}
        if self.decisions_path.is_file():
            self.decisions = json.loads(self.decisions_path.read_text(encoding="utf-8"))

    def state(self) -> dict[str, Any]:
        """The items with their decisions, the counts and the output files."""
        items = []
        for item in self.items:
            view = {k: v for k, v in item.items() if k != "record"}
            view["image_url"] = self.image_url(item)
            view["decision"] = self.decisions.get(item["key"])
            items.append(view)
        return {"source": str(self.source), "attempts": self.attempts, "items": items, **self.counts()}

    def counts(self) -> dict[str, Any]:
        made = [d["decision"] for d in self.decisions.values()]
        return {
            "total": len(self.items),
            "decided": len(made),
            "counts": {d: made.count(d) for d in DECISIONS},
            "outputs": {
                "decisions": str(self.decisions_path),
                "reviewed": str(self.reviewed_path),
                "pairs": str(self.pairs_path),
            },  # fmt: skip
        }

    def image_url(self, item: dict) -> str | None:
        image = item.get("image")
        if isinstance(image, list):
            image = image[0] if image else None
        if not isinstance(image, str) or "://" in image:
            return None
        return self.folders.url(self.source.parent / image)

    def decide(self, key: str, decision: str, reply: str | None = None) -> dict[str, Any]:
        """Records one decision and rewrites the three output files (each atomically).

        Raises:
            KeyError: an unknown item. ValueError: an unknown decision or an edit without a reply.
        """
        if decision not in (*DECISIONS, "undo"):
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)} or undo; got '{decision}'")
        if not any(i["key"] == key for i in self.items):
            raise KeyError(f"no item '{key}' in {self.source.name}")
        if decision == "edit" and not (reply or "").strip():
            raise ValueError("an edit needs the new reply")
        with self._lock:
            if decision == "undo":
                self.decisions.pop(key, None)
            else:
                entry = {"decision": decision, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
                if decision == "edit":
                    entry["reply"] = reply
                self.decisions[key] = entry
            atomic_write_text(self.decisions_path, json.dumps(self.decisions, indent=1, ensure_ascii=False))
            self._write_outputs()
            return self.counts()

    def _kept(self) -> list[tuple[dict, str]]:
        """(item, reply) of every accepted or edited item, in queue order."""
        out = []
        for item in self.items:
            d = self.decisions.get(item["key"])
            if d and d["decision"] in ("accept", "edit"):
                out.append((item, d.get("reply") or item["reply"]))
        return out

    def _write_outputs(self) -> None:
        kept = self._kept()
        per_id: dict[str, int] = {}
        for item, _ in kept:
            per_id[item["id"]] = per_id.get(item["id"], 0) + 1
        lines = [json.dumps(training_record(item, reply, per_id[item["id"]] > 1), ensure_ascii=False)
                 for item, reply in kept]  # fmt: skip
        atomic_write_text(self.reviewed_path, "".join(line + "\n" for line in lines))
        pairs = [json.dumps(p, ensure_ascii=False) for p in self.pairs()]
        atomic_write_text(self.pairs_path, "".join(line + "\n" for line in pairs))

    def pairs(self) -> list[dict[str, Any]]:
        """Preference pairs: each rejected reply against the first kept reply of its record, and each
        edited reply against the reply it replaced."""
        chosen: dict[str, str] = {}
        for item, reply in self._kept():
            chosen.setdefault(item["id"], reply)
        out: list[tuple[dict, str, str]] = []
        for item in self.items:
            d = self.decisions.get(item["key"])
            if not d:
                continue
            if d["decision"] == "reject" and item["id"] in chosen:
                out.append((item, chosen[item["id"]], item["reply"]))
            elif d["decision"] == "edit" and d["reply"].strip() != item["reply"].strip():
                out.append((item, d["reply"], item["reply"]))
        rows = []
        for k, (item, good, bad) in enumerate(out):
            same = sum(1 for other, _, _ in out[:k] if other["id"] == item["id"])
            rows.append({
                "id": item["id"] + (f"-{same}" if same else ""),
                "image": item["image"],
                "conversations": [{"from": "human", "value": item["question"]}],
                "chosen": good,
                "rejected": bad,
            })  # fmt: skip
        return rows


def training_record(item: dict, reply: str, several: bool) -> dict[str, Any]:
    """A kept reply as a LLaVA-CoT record: the original record with its last reply replaced, or one built
    from an attempt (id suffixed with the attempt when a record keeps several)."""
    if "record" in item:
        record = json.loads(json.dumps(item["record"]))
        turns = _turns(record)
        last = next((t for t in reversed(turns) if t.get("from") in ("gpt", "assistant")), None)
        if last is not None:
            last["value"] = reply
        return record
    attempt = item.get("teacher", {}).get("attempt")
    record = {"id": item["id"] + (f"-a{attempt}" if several else "")}
    if item.get("image"):
        record["image"] = item["image"]
    record["conversations"] = [{"from": "human", "value": item["question"]}, {"from": "gpt", "value": reply}]
    if item.get("answer") is not None:
        record["answer"] = item["answer"]
    return record
