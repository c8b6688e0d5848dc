"""The encoded dataset, prepared once per data file and memory-mapped by every process and later run.

Reading, checking and tokenizing 100k LLaVA-CoT records takes minutes and, held as Python lists,
gigabytes per process. ``prepare_file`` does it once: the samples' verdicts (read and image
problems, what tokenization made of each), their token ids and label masks, lengths, image paths
and record positions are written as flat numpy arrays to ``<cache_dir>/<key>/`` and opened with
``mmap_mode='r'``: every process of a job, every DataLoader worker and every later run reads the
same pages from the OS page cache instead of holding its own copy.

Why ``.npy`` files rather than Arrow: the data are a few flat integer columns, which
``np.load(mmap_mode='r')`` maps in microseconds with nothing to install; strings (paths, record
positions) are stored the same way, as UTF-8 bytes plus offsets.

The key (``cache_key``) hashes the data file (path, size, modification time; every file's for a
folder), the processor (tokenizer, chat template, image token and tokens per image) and every
option that changes the encoding (and the source of the modules that encode), so a changed file,
setting or cotune builds a new entry. An entry is written into a temporary folder and renamed
into place when complete: a process killed while writing leaves no half entry (and its temporary
folder is removed by a later build after a day).

Within one job (``torchrun``) each process reads its contiguous share of the records (of a
JSON-lines file only the lines that start in its share of the bytes), checks their images and
tokenizes them, writes them as a shard (``shards``), spreading the share over worker
processes when it has more than one CPU to itself (``shard_pool``, ``data.prepare_workers``); the
first process concatenates the shards (in order, so the result equals one process's) and renames
the entry into place while the others wait at a barrier.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cotune.data.formats import image_ref_text, is_json_lines
from cotune.data.prepared import EncodedFile
from cotune.data.records import problem_order, read_samples
from cotune.data.shard_pool import encode_share
from cotune.data.shards import concat_shards, share_bounds
from cotune.models.families import ModelFamily

CACHE_VERSION = 1
CACHE_ENV = "COTUNE_DATA_CACHE"  # overrides the default folder (tests point it at a temporary one)
STALE_SECONDS = 24 * 3600  # a temporary folder this old is a killed build's
IN_USE_SECONDS = 3600  # an entry used this recently is never evicted (a running job may be reading it)


def default_cache_dir() -> Path:
    """``$COTUNE_DATA_CACHE``, else ``$XDG_CACHE_HOME/cotune/data``, else ``~/.cache/cotune/data``.

    One folder shared by every run (like ``HF_HOME``): a sweep of learning rates or a restart in a
    new output folder reuses the preparation; the key keeps different data or settings apart.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cotune" / "data"


def file_fingerprint(path: str | Path) -> dict:
    """What identifies a data file's content cheaply: path, size, modification time (of every file
    under a folder)."""
    path = Path(path).resolve()
    if path.is_dir():
        digest = hashlib.sha256()
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(root, name))
                digest.update(
                    f"{os.path.relpath(os.path.join(root, name), path)}|{st.st_size}|{st.st_mtime_ns}\n".encode()
                )
        return {"path": str(path), "folder": digest.hexdigest()}
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


_FINGERPRINTS: dict[tuple, tuple[Any, str]] = {}  # (id(processor), family) -> (processor, hash)


def processor_fingerprint(processor: Any, family: ModelFamily) -> str:
    """A hash of everything in the processor that changes token ids: the tokenizer (its whole
    definition), the chat template and its date, the family's image token and tokens per image."""
    known = _FINGERPRINTS.get((id(processor), family.name))
    if known is not None and known[0] is processor:
        return known[1]
    tokenizer = getattr(processor, "tokenizer", processor)
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(
        backend.to_str().encode()
        if backend is not None
        else repr(sorted(tokenizer.get_vocab().items())).encode()
    )
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    parts = [type(tokenizer).__name__, str(template), family.name, family.image_token]
    parts.append(str(getattr(processor, "date_string", "")))  # written into image-less conversations
    parts += [
        str(family.tokens_per_image(processor)),
        str(tokenizer.bos_token_id),
        str(tokenizer.pad_token_id),
    ]
    digest.update("\n".join(parts).encode())
    _FINGERPRINTS[(id(processor), family.name)] = (processor, digest.hexdigest())
    return digest.hexdigest()


def encoding_settings(d: Any) -> dict:
    """The ``data`` options that change what a file encodes to."""
    return {
        "format": d.format,
        "image_root": str(Path(d.image_root).resolve()) if d.image_root else "",
        "system_prompt": d.system_prompt,
        "columns": dict(sorted(d.columns.items())),
        "image_check": d.image_check,
        "max_seq_len": d.max_seq_len,
        "overlength": d.overlength,
    }


def code_fingerprint() -> str:
    """A hash of the modules that turn records into tokens (reading, checks, chat rendering and
    masking, the max_seq_len policy): a cotune whose encoding changed builds new entries."""
    digest = hashlib.sha256()
    for name in ("formats", "sample", "records", "images", "chat", "dataset", "cache", "prepared", "shards"):
        digest.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return digest.hexdigest()


def cache_key(path: str | Path, d: Any, processor_hash: str) -> str:
    """The entry's name: a hash of the file, the processor, the encoding settings and the code."""
    inputs = {"version": CACHE_VERSION, "file": file_fingerprint(path), "settings": encoding_settings(d)}
    inputs["processor"], inputs["code"] = processor_hash, code_fingerprint()
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- joining the shares


def merge_shards(folder: Path, world_size: int, meta: dict) -> None:
    """Concatenates ``folder/shard-<k>`` (k < world_size) into the entry's files, in order, then
    writes ``meta.json`` (last: an entry without it is incomplete) and removes the shards."""
    shards = [folder / f"shard-{k}" for k in range(world_size)]
    missing = [s.name for s in shards if not (s / "info.json").exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: the shares of {', '.join(missing)} are missing: the data cache folder must be "
            "shared by every process of the job (set data.cache_dir to a shared folder, or data.cache false)"
        )
    joined = concat_shards(shards, folder)
    joined["problems"].sort(key=lambda p: problem_order(p[0]))  # in file order, however the file was shared
    meta = meta | {k: joined[k] for k in ("problems", "encode_problems", "samples")}
    keep = ("rank", "records", "seconds", "workers")
    meta["shares"] = [{k: v for k, v in i.items() if k in keep} for i in joined["infos"]]
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


# ----------------------------------------------------------------------------- preparing a file


def _collective(world_size: int) -> bool:
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier(world_size: int) -> None:
    if _collective(world_size):
        torch.distributed.barrier()


def _all_agree(flag: bool, world_size: int) -> bool:
    """True on every process when ``flag`` is true on every process."""
    if not _collective(world_size):
        return flag
    flags: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(flags, flag)
    return all(flags)


def _first_decides(value: Any, world_size: int) -> Any:
    """The first process's ``value``, on every process (so all take the same road)."""
    if not _collective(world_size):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _open_entry(final: Path, name: str, fmt: str, rank: int, say) -> EncodedFile:
    """The entry built by an earlier run, stamped as used now (its ``meta.json``'s modification
    time, which eviction goes by) and announced."""
    if rank == 0:
        with contextlib.suppress(OSError):  # a read-only shared cache: the entry is used all the same
            os.utime(final / "meta.json")
    entry = EncodedFile(final)
    say(entry.meta.get("format_line") or f"{name}: format '{fmt}'")
    say(f"{name}: prepared data read from the cache {final} (built {entry.meta['built']})")
    return entry


def _entry_bytes(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.iterdir() if f.is_file())


def evict(
    root: Path, max_bytes: int, keep: Path | None = None, log=print, idle: float = IN_USE_SECONDS
) -> list[Path]:
    """Removes the least recently used entries of ``root`` until they hold at most ``max_bytes``
    (0: no limit). Never ``keep`` (the entry just built) nor one used in the last ``idle`` seconds
    (another job may be reading it). Returns the removed entries."""
    entries = [e for e in root.iterdir() if (e / "meta.json").is_file()] if max_bytes else []
    sizes = {e: _entry_bytes(e) for e in entries}
    total, removed = sum(sizes.values()), []
    for entry in sorted(entries, key=lambda e: (e / "meta.json").stat().st_mtime):
        if total <= max_bytes:
            break
        if entry == keep or time.time() - (entry / "meta.json").stat().st_mtime < idle:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= sizes[entry]
        removed.append(entry)
    if removed:
        freed = sum(sizes[e] for e in removed) / 2**30
        log(f"data cache: removed {len(removed)} least recently used entries ({freed:.2f} GiB) to stay within "
            f"data.cache_max_gib={max_bytes / 2**30:g} ({total / 2**30:.2f} GiB now in {root})")  # fmt: skip
    return removed


def remove_stale(root: Path, older_than: float = STALE_SECONDS) -> None:
    """Removes the temporary folders of builds killed more than ``older_than`` seconds ago."""
    for tmp in root.glob("*.tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > older_than:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # renamed into place or removed by another process meanwhile: nothing to clean
            continue


def prepare_file(
    path: str | Path,
    d: Any,
    processor: Any,
    family: ModelFamily,
    cache_dir: str | Path = "",
    rank: int = 0,
    world_size: int = 1,
    log=print,
) -> EncodedFile | None:
    """The encoded entry of one data file: opened when it exists, else built (each process its
    share) and then opened. Every process of the job calls it.

    Args:
        path: the data file or folder.
        d: the ``data`` options (format, columns, image root and check, max_seq_len, overlength ...).
        processor, family: the model's processor and family.
        cache_dir: where entries live ('' for ``default_cache_dir()``).
        rank, world_size: this process among the job's (a job without a process group: 0, 1).
        log: where the first process says what it did.

    Returns:
        The entry, or None when the file's pictures live only in memory (bytes or images inside
        JSON records; a table's stored pictures are cached as references into it): those samples
        are read again each run.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"data file '{path}' not found")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    if not _collective(world_size):
        rank, world_size = 0, 1
    final = root / cache_key(path, d, processor_fingerprint(processor, family))
    token = _first_decides("" if (final / "meta.json").exists() else secrets.token_hex(4), world_size)
    say = log if rank == 0 else (lambda s: None)
    if not token:
        return _open_entry(final, Path(path).name, d.format, rank, say)
    tmp = final.with_name(f"{final.name}.tmp-{token}")
    if rank == 0:
        _make_root(root)
        remove_stale(root)
    start = time.perf_counter()
    lines = write_share(path, d, processor, family, tmp, rank, world_size, say)
    if lines is None:
        return None
    _barrier(world_size)
    if rank == 0:
        meta = {"version": CACHE_VERSION, "source": str(Path(path).resolve()), "built": time.strftime("%Y-%m-%d %H:%M:%S"),
                "format_line": lines[0] if lines else "", "settings": encoding_settings(d)}  # fmt: skip
        merge_shards(tmp, world_size, meta)
        _publish(tmp, final)
        say(
            f"{Path(path).name}: prepared in {time.perf_counter() - start:.1f} s by {world_size} process(es) into {final}"
        )
        evict(root, int(getattr(d, "cache_max_gib", 0) * 2**30), keep=final, log=say)
    _barrier(world_size)
    return EncodedFile(final)


def write_share(
    path: str | Path, d: Any, processor: Any, family: ModelFamily, tmp: Path, rank: int, world_size: int, log
) -> list[str] | None:
    """Process ``rank``'s part of a build: reads its share of the records (of a JSON-lines file only
    the lines in its share of the bytes; of other files all, keeping its share), checks their
    images and encodes them, writes ``tmp/shard-<rank>``. Returns what reading said (the detected
    format), or None when the pictures live only in memory (nothing written, on every process)."""
    start, lines = time.perf_counter(), []
    by_bytes = world_size > 1 and is_json_lines(Path(path))
    byte_range = share_bounds(Path(path).stat().st_size, rank, world_size) if by_bytes else None
    samples, problems = read_samples(
        path, d.image_root, d.system_prompt, d.format, d.columns, lines.append, byte_range
    )
    for line in lines:
        log(line)
    cached = all(image_ref_text(ref) is not None for s in samples for ref in s.images)
    if not _all_agree(cached, world_size):
        return None  # pictures held in memory only (in some process's share)
    if not by_bytes:
        lo, hi = share_bounds(len(samples), rank, world_size)
        samples, problems = samples[lo:hi], problems if rank == 0 else []  # reading's problems: once
    info = {"rank": rank, "records": len(samples)}
    encode_share(samples, problems, processor, family, d, tmp / f"shard-{rank}", info, start, log=log)
    return lines


def _make_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(
            f"cannot create the data cache folder {root}: {e} (set data.cache_dir, or data.cache false)"
        ) from e


def _publish(tmp: Path, final: Path) -> None:
    """Renames the complete entry into place; another job that got there first wins."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
