"""Atomic directories: a crash mid-write leaves the previous copy whole (a neutral helper: no cotune imports).

A directory is written under a temporary sibling name and published with one rename, so a reader
sees either the old directory or the complete new one, never half of it. Training's adapters and
checkpoints and the merged model are written this way.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final: str | Path):
    """Yields a temporary sibling directory; on success it replaces ``final`` in one rename.

    If the block raises (or the process dies), ``final`` is untouched and the temporary
    directory (named ``.<name>.tmp-*``) is left for the next cleanup.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_tree(folder: str | Path) -> None:
    """Flushes every file under ``folder`` and the folder entries themselves to disk."""
    folder = Path(folder)
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_dir(tmp: str | Path, final: str | Path) -> Path:
    """Makes ``tmp`` (a finished directory) become ``final`` with one rename; an old ``final`` is removed."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def cleanup_partial(folder: str | Path) -> None:
    """Removes temporary directories left by a crash during ``atomic_dir``."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in folder.glob(".*.old-*"):
            shutil.rmtree(p, ignore_errors=True)
