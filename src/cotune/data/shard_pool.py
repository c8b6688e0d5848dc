"""A process's share of a cache build spread over the CPUs it has.

Encoding a record (rendering the chat template, tokenizing, checking its image) costs about
1.5 ms of one core, mostly Python holding the GIL, so threads do not help: one process alone on a
machine would leave the other cores idle for minutes at LLaVA-CoT-100k scale. Here the share is cut
into parts of consecutive records, encoded by worker processes and concatenated in order by
``shards.concat_shards``, so the shard is the one the process would have written alone.

On Linux the workers are forked, as PyTorch's DataLoader workers are: they start at once, inherit
the records and the processor instead of receiving them pickled, and touch no accelerator; where
fork is not the platform's way (macOS, Windows) they are spawned and receive them.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from cotune.data.sample import Problem, Sample
from cotune.data.shards import build_shard, concat_shards
from cotune.models.families import FAMILIES, ModelFamily
from cotune.runtime import cpus_per_process

POOL_MIN_RECORDS = 4000  # fewer records: starting workers (about 2 s each) costs more than it saves
PART_RECORDS = 2000  # records a worker encodes at a time (progress, and balance between workers)
MAX_WORKERS = 16

_WORKER: dict[str, Any] = {}  # in a worker process: its processor, family and data options


def pool_workers(requested: int, records: int) -> int:
    """Worker processes for a share of ``records``: ``requested`` when >= 0 (0 or 1: none, the
    process encodes alone); -1 (auto): one per CPU of this process's part of the machine, none for
    fewer than ``POOL_MIN_RECORDS`` records or a single CPU."""
    if requested >= 0:
        return requested if requested > 1 else 0
    workers = min(MAX_WORKERS, cpus_per_process())
    return workers if workers > 1 and records >= POOL_MIN_RECORDS else 0


def _start_worker(samples: list[Sample], processor: Any, family_name: str, d: Any) -> None:
    family = next(f for f in FAMILIES if f.name == family_name)
    _WORKER.update(samples=samples, processor=processor, family=family, d=d)


def _encode_part(lo: int, hi: int, folder: str) -> int:
    """In a worker: checks and encodes records ``[lo, hi)``, writes them as the shard ``folder``."""
    w = _WORKER
    build_shard(w["samples"][lo:hi], [], w["processor"], w["family"], w["d"]).save(Path(folder), {})
    return hi - lo


def _context() -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def build_share_in_pool(
    samples: list[Sample],
    problems: list[Problem],
    processor: Any,
    family: ModelFamily,
    d: Any,
    dest: Path,
    workers: int,
    show_progress: bool,
) -> dict:
    """Checks and encodes ``samples`` with ``workers`` processes into the shard folder ``dest``
    (columns, no ``info.json``); returns its info: ``problems`` (``problems`` first, then the image
    check's in record order), ``encode_problems``. Equal to ``build_shard`` run here."""
    from tqdm.auto import tqdm

    size = max(1, min(PART_RECORDS, math.ceil(len(samples) / (4 * workers))))
    bounds = [(lo, min(lo + size, len(samples))) for lo in range(0, len(samples), size)]
    parts = [dest.with_name(f"{dest.name}.part-{k:05d}") for k in range(len(bounds))]
    pool = ProcessPoolExecutor(workers, _context(), _start_worker, (samples, processor, family.name, d))
    bar = tqdm(total=len(samples), desc=f"checking and tokenizing ({workers} processes)", unit="record",
               disable=not show_progress, dynamic_ncols=True)  # fmt: skip
    ours = "TOKENIZERS_PARALLELISM" not in os.environ  # said, so tokenizers warns of no fork
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        pending = {pool.submit(_encode_part, lo, hi, str(p)) for (lo, hi), p in zip(bounds, parts)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                bar.update(f.result())  # a worker's error is raised here, the rest cancelled below
    except BrokenProcessPool as e:
        raise RuntimeError(
            f"a worker process preparing {dest.parent} died ({e}): out of memory? "
            "Set data.prepare_workers 0 to prepare in the training process"
        ) from e
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
        if ours:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
    joined = concat_shards(parts, dest)
    return {"problems": [[p.where, p.reason] for p in problems] + joined["problems"],
            "encode_problems": joined["encode_problems"]}  # fmt: skip


def encode_share(
    samples: list[Sample], problems: list[Problem], processor: Any, family: ModelFamily, d: Any,
    dest: Path, info: dict, started: float, log=None,
) -> None:  # fmt: skip
    """Writes the shard ``dest`` of ``samples``: in this process, or spread over worker processes
    (``data.prepare_workers``); ``info`` (rank, records) goes into its ``info.json`` with the
    seconds since ``started`` (a ``time.perf_counter()``) and the workers used."""
    workers = pool_workers(d.prepare_workers, len(samples))
    if workers < 2:
        shard = build_shard(samples, problems, processor, family, d, log=log)
        shard.save(dest, info | {"seconds": time.perf_counter() - started, "workers": 1})
        return
    show = log is not None and len(samples) >= 2000
    joined = build_share_in_pool(samples, problems, processor, family, d, dest, workers, show)
    info |= joined | {"seconds": time.perf_counter() - started, "workers": workers}
    (dest / "info.json").write_text(json.dumps(info))
