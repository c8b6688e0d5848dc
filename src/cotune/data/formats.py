"""Every supported annotation format, read into ``sample.Sample``; ``detect_format`` for ``auto``.

Formats (``data.format``):
  * ``llava_cot_jsonl``: LLaVA-CoT-100k, one ``{"id", "image", "conversations"}`` object per line;
  * ``llava_json``: LLaVA's JSON list ``[{"id", "image", "conversations": [{"from", "value"}]}]``;
  * ``sharegpt``: ShareGPT / LLaMA-Factory, ``{"messages": [{"role", "content"}], "images": [...]}``
    objects as a JSON list or JSON lines, ``<image>`` placeholders in the content;
  * ``hf``: a Hugging Face ``datasets`` table on disk (a ``save_to_disk`` folder, ``.arrow``,
    ``.parquet`` or a folder of them, or JSON lines) whose image column holds bytes, a path or an
    Image cell; ``data.columns`` maps the canonical names (``messages``, ``conversations``,
    ``images``/``image``, ``question``/``answer``, ``system``, ``id``) to the table's;
  * ``cookbook``: a llama-cookbook dataset ``.py`` file (read by ``data/cookbook.py``).

Every problem is located as ``file:line`` (JSON) or ``file:row N`` (tables).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.data.sample import (
    IMAGE_PLACEHOLDER,
    ROLES,
    DataError,
    Problem,
    Sample,
    conversation_to_messages,
    image_refs,
    record_turn_list,
)

FORMATS = ("llava_cot_jsonl", "llava_json", "sharegpt", "hf", "cookbook")
_PEEK_BYTES = 1 << 22


# ----------------------------------------------------------------------------- detection


def _json_layout(path: Path) -> str:
    """'list' for a JSON array, 'lines' for JSON objects one per line."""
    with open(path, encoding="utf-8", errors="replace") as f:  # a bad byte is its line's problem, not here
        head = f.read(4096).lstrip("\ufeff \t\r\n")
    return "list" if head.startswith("[") else "lines"


def _first_record(path: Path) -> Any:
    if _json_layout(path) == "lines":
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    try:
                        return json.loads(line)
                    except json.JSONDecodeError:
                        return None
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read(_PEEK_BYTES)
    for _, obj in _iter_json_list_text(text, stop_after=1):
        return obj
    return None


def _map_keys(keys: set[str], columns: dict) -> set[str]:
    return {next((c for c, src in columns.items() if src == k), k) for k in keys}


def detect_format(path: str | Path, columns: dict | None = None) -> tuple[str, str]:
    """Guesses the format of ``path`` from its suffix and its first record.

    Returns:
        (format name, the evidence in words, for the log).

    Raises:
        DataError: when nothing identifies the format, naming what was found and what to set.
    """
    path, columns = Path(path), columns or {}
    if path.is_dir():
        if any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf", "a Hugging Face datasets save_to_disk folder"
        if next(path.rglob("*.parquet"), None) or next(path.rglob("*.arrow"), None):
            return "hf", "a folder of parquet/arrow files"
        raise DataError(f"{path}: a folder, but not a datasets save_to_disk folder nor one of parquet files")
    suffix = path.suffix.lower()
    if suffix == ".py":
        return "cookbook", "a Python file (llama-cookbook get_custom_dataset)"
    if suffix in (".parquet", ".arrow"):
        return "hf", f"a {suffix[1:]} table"
    first = _first_record(path)
    if not isinstance(first, dict):
        raise DataError(
            f"{path}: cannot tell its format: the first record is not a JSON object (set data.format)"
        )
    keys = _map_keys(set(first), columns)
    layout = _json_layout(path)
    if "conversations" in keys and not columns:
        if layout == "lines":
            return "llava_cot_jsonl", "JSON lines whose records have 'conversations' (LLaVA-CoT-100k)"
        return "llava_json", "a JSON list whose records have 'conversations' (LLaVA)"
    if "messages" in keys and not columns:
        return "sharegpt", f"JSON {layout} whose records have 'messages' (ShareGPT / LLaMA-Factory)"
    if columns or {"question", "answer"} <= keys:
        return "hf", f"JSON {layout} read as a table with column mapping {columns or '(none)'}"
    raise DataError(
        f"{path}: cannot tell its format: the first record has keys {sorted(first)}; expected "
        "'conversations' (LLaVA) or 'messages' (ShareGPT), or map your columns with data.columns "
        "(e.g. {messages: chat, images: img}), or set data.format"
    )


# ----------------------------------------------------------------------------- JSON containers


def _iter_json_list_text(text: str, stop_after: int | None = None) -> Iterator[tuple[int, Any]]:
    """Yields (line number, element) of a JSON array; an unreadable element ends it with an error."""
    decoder = json.JSONDecoder()
    pos, line, n = 0, 1, 0
    length = len(text)

    def skip(p: int) -> int:
        while p < length and text[p] in " \t\r\n,\ufeff":
            p += 1
        return p

    start = skip(0)
    if start >= length or text[start] != "[":
        raise ValueError("not a JSON list")
    line += text.count("\n", 0, start)
    pos = skip(start + 1)
    line += text.count("\n", start, pos)
    while pos < length and text[pos] != "]":
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield line + text.count("\n", pos, e.pos), e
            return
        yield line, obj
        n += 1
        if stop_after and n >= stop_after:
            return
        nxt = skip(end)
        line += text.count("\n", pos, nxt)
        pos = nxt


def is_json_lines(path: Path) -> bool:
    """True for a JSON-lines file (one record a line): the layout a process can read a share of."""
    return path.is_file() and path.suffix.lower() in (".jsonl", ".json") and _json_layout(path) == "lines"


def iter_json_records(path: Path, byte_range: tuple[int, int] | None = None) -> Iterator[tuple[str, Any]]:
    """Yields ("file:line", object or JSONDecodeError) for a JSON list or a JSON-lines file.

    With ``byte_range`` ``(lo, hi)`` (JSON lines only), only the lines that start at a byte in
    ``[lo, hi)``, numbered as in the whole file: the shares of ``[0, size)`` cut anywhere read every
    line once, in order.
    """
    if _json_layout(path) == "lines":
        yield from _iter_json_lines(path, byte_range or (0, path.stat().st_size))
        return
    text = path.read_text(encoding="utf-8")
    try:
        for lineno, obj in _iter_json_list_text(text):
            yield f"{path.name}:{lineno}", obj
    except ValueError:
        yield f"{path.name}:1", json.JSONDecodeError("not a JSON list", text[:80], 0)


def _iter_json_lines(path: Path, byte_range: tuple[int, int]) -> Iterator[tuple[str, Any]]:
    lo, hi = byte_range
    with open(path, "rb") as f:
        if lo > 0:
            f.seek(lo - 1)
            f.readline()  # the rest of the line that started before lo: the previous share's
        start = f.tell()
        lineno = _newlines_before(path, start) + 1
        while start < hi:
            raw = f.readline()
            if not raw:
                return
            where, lineno, start = f"{path.name}:{lineno}", lineno + 1, start + len(raw)
            if not raw.strip():
                continue
            try:
                yield where, json.loads(raw.decode("utf-8").strip())
            except UnicodeDecodeError as e:
                yield where, json.JSONDecodeError(f"not UTF-8 text ({e.reason} at byte {e.start + 1})", "", 0)
            except json.JSONDecodeError as e:
                yield where, e


def _newlines_before(path: Path, end: int) -> int:
    """Line breaks in the first ``end`` bytes of ``path``."""
    count = 0
    with open(path, "rb") as f:
        while end > 0:
            chunk = f.read(min(end, 1 << 24))
            if not chunk:
                break
            count, end = count + chunk.count(b"\n"), end - len(chunk)
    return count


# ----------------------------------------------------------------------------- record parsers


def _apply_columns(obj: dict, columns: dict) -> dict:
    if not columns:
        return obj
    sources = set(columns.values())
    out = {k: v for k, v in obj.items() if k not in sources}
    for canonical, source in columns.items():
        if source in obj:
            out[canonical] = obj[source]
    return out


def _content_text(content: Any, k: int) -> str:
    """A message's content as text with ``<image>`` placeholders (OpenAI-style part lists too)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind in ("image", "image_url"):
                parts.append(IMAGE_PLACEHOLDER)
            else:
                raise ValueError(f"message {k + 1}: content part {part!r:.60} is neither text nor image")
        return "\n".join(parts)
    raise ValueError(f"message {k + 1}: 'content' is {type(content).__name__}, not a string or a list")


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


def parse_messages_record(obj: Any, where: str, root: Path, system_prompt: str = "") -> Sample:
    """One ShareGPT / LLaMA-Factory record (``messages`` with ``role``/``content``) -> Sample."""
    msgs = record_turn_list(obj, "messages")
    turns = []
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        turns.append(("system", obj["system"]))
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"message {k + 1} is not an object")
        role = m.get("role", m.get("from"))
        if role not in ROLES:
            raise ValueError(f"message {k + 1}: unknown role {role!r} (expected user, assistant or system)")
        text = _content_text(m.get("content", m.get("value")), k)
        if not text.strip():
            raise ValueError(f"message {k + 1}: 'content' is empty")
        turns.append((ROLES[role], text))
    refs = image_refs(obj.get("images", obj.get("image")), root)
    messages = conversation_to_messages(turns, len(refs), system_prompt)
    meta = {k: v for k, v in obj.items() if k not in ("messages", "images", "image", "system")}
    return Sample(id=str(obj.get("id", where)), messages=messages, images=refs, where=where, meta=meta)


def parse_qa_record(obj: dict, where: str, root: Path, system_prompt: str = "") -> Sample:
    """A VQA-style row with ``question`` and ``answer`` (and optionally an image) -> one exchange."""
    q, a = obj.get("question"), obj.get("answer")
    for name, v in (("question", q), ("answer", a)):
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"'{name}' is missing, empty or not a string")
    refs = image_refs(obj.get("images", obj.get("image")), root)
    messages = conversation_to_messages([("user", q), ("assistant", a)], len(refs), system_prompt)
    meta = {k: v for k, v in obj.items() if k not in ("question", "images", "image")}
    return Sample(id=str(obj.get("id", where)), messages=messages, images=refs, where=where, meta=meta)


def parse_record(obj: Any, where: str, fmt: str, root: Path, system_prompt: str = "") -> Sample:
    """Dispatches one record to its parser. Raises ValueError with a reason fit for a user."""
    if fmt in ("llava_cot_jsonl", "llava_json"):
        return parse_llava_record(obj, where, root, system_prompt)
    if fmt == "sharegpt":
        return parse_messages_record(obj, where, root, system_prompt)
    if not isinstance(obj, dict):
        raise ValueError(f"expected an object, got {type(obj).__name__}")
    if "messages" in obj:
        return parse_messages_record(obj, where, root, system_prompt)
    if "conversations" in obj:
        return parse_record(obj, where, "llava_json", root, system_prompt)
    if "question" in obj or "answer" in obj:
        return parse_qa_record(obj, where, root, system_prompt)
    raise ValueError(
        f"no messages/conversations/question+answer column (has {sorted(obj)}; map them with data.columns)"
    )


# ----------------------------------------------------------------------------- tables


@functools.lru_cache(maxsize=8)
def open_table(source: str) -> Any:
    """A ``pyarrow.Table`` for a datasets folder, .arrow or .parquet file or folder (memory-mapped
    where the format allows); cached per process, so DataLoader workers open it once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(source)
    if path.is_dir() and any((path / n).is_file() for n in ("state.json", "dataset_dict.json")):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
        return ds.data.table if hasattr(ds.data, "table") else ds.data
    files = sorted(path.rglob("*.parquet")) + sorted(path.rglob("*.arrow")) if path.is_dir() else [path]
    tables = []
    for f in files:
        if f.suffix == ".parquet":
            tables.append(pq.read_table(f, memory_map=True))
        else:
            with pa.memory_map(str(f)) as source_file:
                try:
                    tables.append(pa.ipc.open_stream(source_file).read_all())
                except pa.ArrowInvalid:
                    tables.append(pa.ipc.open_file(source_file).read_all())
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


@dataclass(frozen=True)
class TableImage:
    """A lazy reference to an image cell of a table; decoded only when the sample is fetched."""

    source: str
    row: int
    column: str
    k: int | None = None

    def fetch(self) -> Any:
        cell = open_table(self.source).column(self.column)[self.row].as_py()
        return cell[self.k] if self.k is not None else cell

    def __str__(self) -> str:
        index = "" if self.k is None else f"[{self.k}]"
        return f"'{Path(self.source).name}' row {self.row + 1} column '{self.column}'{index}"


TABLE_MARK = "\x01"  # starts a stored TableImage in the cache's image column (no path starts so)


def image_ref_text(ref: Any) -> str | None:
    """An image reference as the cache stores it: a path as it is, a ``TableImage`` as its
    coordinates after ``TABLE_MARK``; None for what only lives in memory (bytes, PIL images)."""
    if isinstance(ref, str):
        return ref
    if isinstance(ref, TableImage):
        return TABLE_MARK + json.dumps([ref.source, ref.row, ref.column, ref.k])
    return None


def image_ref_from_text(text: str) -> Any:
    """The reference ``image_ref_text`` stored."""
    return TableImage(*json.loads(text[1:])) if text.startswith(TABLE_MARK) else text


def _table_image_column(names: list[str], columns: dict) -> str | None:
    for canonical in ("images", "image"):
        if canonical in columns and columns[canonical] in names:
            return columns[canonical]
    return next((n for n in ("images", "image") if n in names), None)


def _table_image_cells(table: Any, source: str, column: str) -> list[Any]:
    """Per row, what the record's image field holds: paths as they are (joined to the image root
    later), stored images as lazy ``TableImage`` references (a list of them for list columns)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(column)
    is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
    kind = col.type.value_type if is_list else col.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return col.to_pylist()
    if is_list:  # a list of stored images per row
        counts = [int(n or 0) for n in pc.list_value_length(col).to_pylist()]
        return [[TableImage(source, i, column, k) for k in range(n)] for i, n in enumerate(counts)]
    valid = pc.is_valid(col).to_pylist()
    return [TableImage(source, i, column) if ok else None for i, ok in enumerate(valid)]


def read_table(
    path: Path, root: Path, system_prompt: str = "", columns: dict | None = None
) -> tuple[list[Sample], list[Problem]]:
    """Reads a datasets table; image cells stay in the table (``TableImage``) until needed."""
    columns = columns or {}
    table = open_table(str(path))
    image_col = _table_image_column(table.column_names, columns)
    rows = table.select([n for n in table.column_names if n != image_col]).to_pylist()
    if image_col is not None:
        for row, cell in zip(rows, _table_image_cells(table, str(path), image_col)):
            row[image_col] = cell
    samples, problems = [], []
    for i, row in enumerate(rows):
        where = f"{path.name}:row {i + 1}"
        try:
            samples.append(parse_record(_apply_columns(row, columns), where, "hf", root, system_prompt))
        except ValueError as e:
            problems.append(Problem(where, str(e)))
    return samples, problems


# ----------------------------------------------------------------------------- entry point


def read_records(
    path: Path,
    fmt: str,
    root: Path,
    system_prompt: str = "",
    columns: dict | None = None,
    byte_range: tuple[int, int] | None = None,
) -> tuple[list[Sample], list[Problem]]:
    """Reads every record of ``path`` in format ``fmt`` (not 'auto'), or of a JSON-lines file those
    of ``byte_range`` (``iter_json_records``); images are not decoded here."""
    if fmt == "cookbook":
        raise DataError(f"{path} is a llama-cookbook dataset file: train with --custom_dataset.file {path}")
    if fmt not in FORMATS:
        raise DataError(f"unknown data.format '{fmt}' (expected auto or one of {', '.join(FORMATS)})")
    if fmt == "hf" and (path.is_dir() or path.suffix.lower() in (".parquet", ".arrow")):
        return read_table(path, root, system_prompt, columns)
    samples, problems = [], []
    for where, obj in iter_json_records(path, byte_range):
        if isinstance(obj, json.JSONDecodeError):
            problems.append(Problem(where, f"invalid JSON ({obj.msg} at column {obj.colno})"))
            continue
        try:
            if fmt == "hf":
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                obj = _apply_columns(obj, columns or {})
            samples.append(parse_record(obj, where, fmt, root, system_prompt))
        except ValueError as e:
            problems.append(Problem(where, str(e)))
    return samples, problems
