"""Shards of a data cache entry: a run of records checked, encoded and written in the entry's
columns, and the concatenation of shards, in order, into one.

A build (``cache.prepare_file``) splits a file's records into contiguous shares, one per process
of the job; a process with several CPUs splits its share again into parts encoded by worker
processes (``shard_pool``). Every split is undone here by the same concatenation, so the entry
equals the one a single process writes alone, array for array.
"""

from __future__ import annotations

import json
import shutil
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cotune.data.augment import mention_flags
from cotune.data.chat import IGNORE_INDEX
from cotune.data.dataset import KEPT, TRUNCATED, encode_one
from cotune.data.formats import image_ref_text
from cotune.data.prepared import DTYPES, STRINGS
from cotune.data.records import check_sample_images
from cotune.data.sample import Problem, Sample
from cotune.models.families import ModelFamily


class _Strings:
    """A growing column of strings: UTF-8 bytes and offsets."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.offsets = array("q", [0])

    def append(self, text: str) -> None:
        self.data += text.encode()
        self.offsets.append(len(self.data))


@dataclass
class Shard:
    """A run of records in the columns of an entry (see ``prepared.EncodedFile``)."""

    problems: list[Problem]  # records unusable when read or checked
    encode_problems: dict[int, str]  # position among the checked samples -> why not kept
    status: array
    rendered: array
    mentions: array
    token_offsets: array
    ids: array
    labels: array
    strings: dict[str, _Strings]

    @classmethod
    def empty(cls) -> Shard:
        return cls([], {}, array("b"), array("i"), array("B"), array("q", [0]), array("i"), array("B"),
                   {name: _Strings() for name in STRINGS})  # fmt: skip

    def add(self, sample: Sample, processor: Any, family: ModelFamily, d: Any) -> None:
        """Encodes ``sample`` (an image-checked one) and appends it."""
        r = encode_one(sample, processor, family, d.max_seq_len, d.overlength)
        position = len(self.status)
        self.status.append(r.status)
        self.rendered.append(r.rendered_len)
        self.mentions.append(mention_flags(sample))
        for name, value in zip(STRINGS, _sample_strings(sample)):
            self.strings[name].append(value)
        if r.status not in (KEPT, TRUNCATED):
            self.encode_problems[position] = r.reason
            return
        mask = [lab != IGNORE_INDEX for lab in r.labels]
        if any(lab != tok for lab, tok, m in zip(r.labels, r.input_ids, mask) if m):
            raise AssertionError("a label differs from its token: the cache stores labels as a mask")
        self.ids.extend(r.input_ids)
        self.labels.extend(mask)
        self.token_offsets.append(len(self.ids))

    def save(self, folder: Path, info: dict) -> None:
        """Writes the columns and ``info.json`` (last: a folder without it is incomplete)."""
        folder.mkdir(parents=True)
        for name in ("status", "rendered", "mentions", "token_offsets", "ids", "labels"):
            np.save(folder / f"{name}.npy", np.frombuffer(getattr(self, name), dtype=DTYPES[name]))
        for name, column in self.strings.items():
            np.save(folder / f"{name}.bytes.npy", np.frombuffer(bytes(column.data), dtype=np.uint8))
            np.save(folder / f"{name}.offsets.npy", np.frombuffer(column.offsets, dtype=np.int64))
        info = info | {
            "problems": [[p.where, p.reason] for p in self.problems],
            "encode_problems": {str(k): v for k, v in self.encode_problems.items()},
        }
        (folder / "info.json").write_text(json.dumps(info))


def _sample_strings(sample: Sample) -> tuple[str, str, str, str]:
    images = "\0".join(image_ref_text(ref) for ref in sample.images)
    return sample.where, str(sample.id), images, json.dumps(sample.meta)


def share_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous ``[lo, hi)`` of ``n`` records that share ``rank`` of ``world_size`` holds."""
    return n * rank // world_size, n * (rank + 1) // world_size


def build_shard(
    samples: list[Sample], problems: list[Problem], processor: Any, family: ModelFamily, d: Any, log=None
) -> Shard:
    """Checks the images of ``samples`` and encodes those that pass, in this process; ``problems``
    (reading's) come first in the shard's list, then the image check's, in record order."""
    from tqdm.auto import tqdm

    decode = d.image_check == "decode"
    good, image_problems = check_sample_images(samples, d.image_workers, decode, progress=log is not None)
    shard = Shard.empty()
    shard.problems = problems + image_problems
    for s in tqdm(
        good, desc="tokenizing", unit="record", disable=log is None or len(good) < 2000, dynamic_ncols=True
    ):
        shard.add(s, processor, family, d)
    return shard


def concat_shards(parts: list[Path], dest: Path) -> dict:
    """Concatenates the columns of the shard folders ``parts`` (in order) into ``dest``, removes
    the parts and returns their joined ``info``: ``problems`` in order,
    ``encode_problems`` at their positions in the whole, ``samples`` (checked samples in all) and
    ``infos`` (each part's own ``info.json``). ``dest`` gets no ``info.json``: the caller writes it."""
    dest.mkdir(parents=True, exist_ok=True)
    infos = [json.loads((p / "info.json").read_text()) for p in parts]
    for name in ("status", "rendered", "mentions", "ids", "labels"):
        np.save(dest / f"{name}.npy", np.concatenate([np.load(p / f"{name}.npy") for p in parts]))
    _concat_offsets(dest, "token_offsets", parts)
    for name in STRINGS:
        np.save(dest / f"{name}.bytes.npy", np.concatenate([np.load(p / f"{name}.bytes.npy") for p in parts]))
        _concat_offsets(dest, f"{name}.offsets", parts)
    problems, encode_problems, before = [], {}, 0
    for p, info in zip(parts, infos):
        problems += info["problems"]
        encode_problems |= {str(int(k) + before): v for k, v in info["encode_problems"].items()}
        before += len(np.load(p / "status.npy", mmap_mode="r"))
    for p in parts:
        shutil.rmtree(p)
    return {"problems": problems, "encode_problems": encode_problems, "samples": before, "infos": infos}


def _concat_offsets(dest: Path, name: str, parts: list[Path]) -> None:
    pieces, base = [np.zeros(1, dtype=np.int64)], 0
    for p in parts:
        offsets = np.load(p / f"{name}.npy")
        pieces.append(offsets[1:] + base)
        base += int(offsets[-1])
    np.save(dest / f"{name}.npy", np.concatenate(pieces))
