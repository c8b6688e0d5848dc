"""A prepared data file (a ``cache`` entry), memory-mapped: what training reads instead of records.

An entry's files, per checked sample (a record that passed reading and the image check, in file
order): ``status`` (``dataset.KEPT`` ...), ``rendered`` (tokens before the max_seq_len policy, -1
when unrenderable), ``mentions`` (``augment.mention_flags``) and the strings ``where``, ``id``,
``images`` (NUL-separated paths, or a table's stored pictures as ``formats.image_ref_text`` writes them) and ``meta`` (JSON), each as ``<name>.bytes.npy`` (UTF-8) and
``<name>.offsets.npy``; per kept sample: ``token_offsets`` into ``ids`` (int32 token ids) and
``labels`` (1 where the token is a label: labels are the tokens of the replies, so a mask holds
them); ``meta.json``: the problems found reading and tokenizing, the shares of the build.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cotune.data.chat import IGNORE_INDEX
from cotune.data.dataset import TRUNCATED, Encoded, EncodeStats, encode_stats
from cotune.data.formats import image_ref_from_text
from cotune.data.sample import Problem, Sample

STRINGS = ("where", "id", "images", "meta")  # per-sample string columns
DTYPES = {"status": np.int8, "rendered": np.int32, "mentions": np.uint8, "token_offsets": np.int64,
          "ids": np.int32, "labels": np.uint8}  # fmt: skip


class EncodedFile:
    """An entry, memory-mapped: per checked sample (the records that passed reading and the image
    check, in file order) its tokenization status, rendered length and strings; per kept sample its
    token ids and label mask. Pickles as its folder, so a spawned DataLoader worker maps it again
    rather than receiving a copy."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        names = [*DTYPES, *(f"{s}.{part}" for s in STRINGS for part in ("bytes", "offsets"))]
        arrays = {n: np.load(self.folder / f"{n}.npy", mmap_mode="r") for n in names}
        self.arrays = arrays
        self.status = arrays["status"]
        kept = self.status <= TRUNCATED
        self.row_of = np.cumsum(kept, dtype=np.int64) - 1  # position -> token row (valid where kept)
        self.problems = [Problem(w, r) for w, r in self.meta["problems"]]
        self.encode_problems = {int(k): v for k, v in self.meta["encode_problems"].items()}

    def __getstate__(self) -> dict:
        return {"folder": str(self.folder)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])

    def __len__(self) -> int:
        return len(self.status)

    def string(self, name: str, position: int) -> str:
        offsets = self.arrays[f"{name}.offsets"]
        return bytes(self.arrays[f"{name}.bytes"][offsets[position] : offsets[position + 1]]).decode()

    def images(self, position: int) -> list[str]:
        joined = self.string("images", position)
        return [image_ref_from_text(t) for t in joined.split("\0")] if joined else []

    def tokens(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of a kept sample, as int64 arrays."""
        row = int(self.row_of[position])
        lo, hi = self.arrays["token_offsets"][row : row + 2]
        ids = self.arrays["ids"][lo:hi].astype(np.int64)
        return ids, np.where(self.arrays["labels"][lo:hi] != 0, ids, IGNORE_INDEX)

    def column(self, name: str) -> list[str]:
        """Every sample's string ``name``, decoded at once."""
        blob, offsets = bytes(self.arrays[f"{name}.bytes"]), self.arrays[f"{name}.offsets"].tolist()
        return [blob[a:b].decode() for a, b in zip(offsets, offsets[1:])]

    def samples(self) -> list[Sample]:
        """The checked samples without their messages (id, images, where, meta): what the train/test
        split looks at."""
        columns = zip(*(self.column(name) for name in ("id", "images", "where", "meta")))
        return [
            Sample(
                i,
                [],
                [image_ref_from_text(t) for t in images.split("\0")] if images else [],
                where,
                {} if meta == "{}" else json.loads(meta),
            )
            for i, images, where, meta in columns
        ]

    def label_counts(self) -> np.ndarray:
        """Label tokens of every kept sample (token row order)."""
        offsets = self.arrays["token_offsets"]
        if len(offsets) < 2:
            return np.zeros(0, dtype=np.int64)
        return np.add.reduceat(self.arrays["labels"], offsets[:-1], dtype=np.int64)

    def flags(self, positions: list[int]) -> np.ndarray:
        """The samples' ``augment.mention_flags``."""
        return self.arrays["mentions"][np.asarray(positions, dtype=np.int64)]

    def select(self, positions: np.ndarray) -> tuple[EncodedRows, list[Problem], EncodeStats]:
        """The samples at ``positions`` (checked-sample order) as ``encode_samples`` would return
        them: the kept ones, the problems of the others, the report's counts."""
        positions = np.asarray(positions, dtype=np.int64)
        status = self.status[positions]
        kept = positions[status <= TRUNCATED]
        problems = [Problem(self.string("where", int(k)), self.encode_problems[int(k)])
                    for k in positions[status > TRUNCATED]]  # fmt: skip
        rows = EncodedRows(self, kept)
        n_labels = self.label_counts()[self.row_of[kept]].tolist()
        stats = encode_stats(
            status, self.arrays["rendered"][positions], n_labels, max(rows.lengths, default=0)
        )
        return rows, problems, stats


class EncodedRows:
    """A sequence of ``Encoded`` over an entry's kept samples at ``positions``: what ``SFTDataset``
    indexes, without a Python object per sample until one is fetched."""

    def __init__(self, file: EncodedFile, positions: np.ndarray) -> None:
        self.file = file
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Encoded:
        k = int(self.positions[i])
        ids, labels = self.file.tokens(k)
        meta = json.loads(self.file.string("meta", k))
        return Encoded(
            ids, labels, self.file.images(k), self.file.string("id", k), self.file.string("where", k), meta
        )

    @property
    def lengths(self) -> list[int]:
        rows = self.file.row_of[self.positions]
        offsets = self.file.arrays["token_offsets"]
        return (offsets[rows + 1] - offsets[rows]).tolist()

    @property
    def has_images(self) -> list[bool]:
        offsets = self.file.arrays["images.offsets"]
        return (offsets[self.positions + 1] > offsets[self.positions]).tolist()

    def subset(self, indices: list[int]) -> EncodedRows:
        return EncodedRows(self.file, self.positions[np.asarray(indices, dtype=np.int64)])
