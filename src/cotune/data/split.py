"""Held-out splits that hold out what they should, and how to see that they do.

``split_grouped``: with ``data.split_by KEY`` every group (a patient, a part serial, a device) goes
wholly to one side, and groups are dealt per answer class so that each side keeps the classes'
shares (stratified); ``class_balance`` says what each side holds. Without a key the seeded split of
``records.split_train_test`` is unchanged.

``near_duplicates``: pictures of the training side that are almost the same as one of the held-out
side (a re-encoded, resized or re-saved copy; the next frame of a video; the neighbouring slice of
a scan), found by a 64-bit difference hash (dHash: the picture in grey shrunk to 9x8, one bit per
pair of horizontal neighbours, brighter or not). It is written here in a few lines of numpy on PIL
rather than taken from ``imagehash``: that library's pHash and wavelet hashes pull in scipy and
PyWavelets, and its dHash is the same dozen lines; dHash survives resizing, recompression and
brightness changes, which is what an accidental copy goes through. Two pictures are near-duplicates
when their hashes are within ``NEAR_BITS`` bits and their 8x8 colour thumbnails within
``THUMB_TOLERANCE`` levels (dHash sees brightness structure only: a red and a blue circle on white
hash alike); pairs are found through exact matches of
hash bands (if two 64-bit hashes differ in at most k bits, one of k+1 bands is identical), so
the search is not a comparison of every train picture with every test picture.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cotune.data.cot import parse_stages
from cotune.data.images import load_image
from cotune.data.sample import DataError, Problem, Sample

NEAR_BITS = 4  # a copy that went through resizing or JPEG stays within a few bits (tests/test_split.py)
THUMB_TOLERANCE = 12.0  # mean |difference| of the 8x8 colour thumbnails, in 0-255 levels


def sample_answer(sample: Sample) -> str:
    """The class a sample is stratified by: its ``answer`` field, else its first reply's CONCLUSION."""
    answer = sample.meta.get("answer")
    if answer is None:
        reply = next((m for m in sample.messages if m["role"] == "assistant"), None)
        text = " ".join(i.get("text", "") for i in reply["content"]) if reply else ""
        answer = parse_stages(text).get("CONCLUSION", "")
    return " ".join(str(answer).lower().split())


def sample_group(sample: Sample, key: str) -> str:
    """The value of ``key`` in the record (a dotted path reaches into a mapping: ``meta.patient``).

    Raises:
        DataError: the record has no such field, naming it and the record.
    """
    value: Any = sample.meta
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(
                f"{sample.where}: no field '{key}' to split by (data.split_by); its fields: {sorted(sample.meta)}"
            )
        value = value[part]
    return str(value)


def split_grouped(
    samples: list[Sample], ratio: float, seed: int, key: str
) -> tuple[list[Sample], list[Sample]]:
    """A seeded split keeping every group of ``key`` on one side, stratified by answer.

    Groups are labelled by their commonest answer; within each label they are shuffled (seeded)
    and moved to the held-out side until that label's held-out samples reach ``ratio`` of its
    samples. At least one group is held out and one kept.

    Raises:
        DataError: fewer than two groups, or a record without the key.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[sample_group(s, key)].append(i)
    if len(groups) < 2:
        raise DataError(f"data.split_by '{key}': {len(groups)} group(s); a split needs at least 2")
    by_label: dict[str, list[str]] = defaultdict(list)
    for name, members in sorted(groups.items()):
        label = Counter(sample_answer(samples[i]) for i in members).most_common(1)[0][0]
        by_label[label].append(name)
    rng, held = random.Random(seed), set()
    for label in sorted(by_label):
        names = by_label[label]
        rng.shuffle(names)
        target, taken = ratio * sum(len(groups[n]) for n in names), 0
        for name in names:
            if taken >= target or taken + len(groups[name]) / 2 > target:
                break
            held.add(name)
            taken += len(groups[name])
    if not held:
        held.add(sorted(groups, key=lambda n: (len(groups[n]), n))[0])
    if len(held) == len(groups):
        held.remove(sorted(held)[0])
    test = [s for s in samples if sample_group(s, key) in held]
    train = [s for s in samples if sample_group(s, key) not in held]
    return train, test


def split_for_training(
    samples: list[Sample], ratio: float, seed: int, key: str = "", log: Callable[[str], None] | None = print
) -> tuple[list[Sample], list[Sample]]:
    """The training split: grouped and stratified with ``key`` (and its balance said), else the
    plain seeded split."""
    from cotune.data.records import split_train_test

    if not key:
        return split_train_test(samples, ratio, seed)
    train, test = split_grouped(samples, ratio, seed, key)
    if log is not None:
        log(class_balance(train, test, key))
    return train, test


def class_balance(train: list[Sample], test: list[Sample], key: str = "") -> str:
    """Two lines: each side's records, groups and answer classes with their shares."""
    lines = []
    for name, side in (("train", train), ("held out", test)):
        counts = Counter(sample_answer(s) for s in side)
        shares = ", ".join(f"{a or '?'} {n} ({n / max(len(side), 1):.0%})" for a, n in counts.most_common(8))
        more = f" and {len(counts) - 8} more" if len(counts) > 8 else ""
        groups = f", {len({sample_group(s, key) for s in side})} groups of {key}" if key else ""
        lines.append(f"{name}: {len(side)} records{groups}; answers: {shares}{more}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- near-duplicates


def dhash(image: Any) -> int:
    """The 64-bit difference hash of a picture (a path, bytes or PIL image)."""
    return fingerprint(image)[0]


def fingerprint(image: Any) -> tuple[int, np.ndarray]:
    """(64-bit dHash, 8x8 RGB thumbnail). dHash sees brightness structure only: a blue and a green
    circle on white hash alike, so a candidate pair must also have thumbnails within
    ``THUMB_TOLERANCE`` grey levels on average."""
    from PIL import Image

    rgb = load_image(image)
    grey = rgb.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    thumb = np.asarray(rgb.resize((8, 8), Image.Resampling.BOX), dtype=np.int16)
    return int.from_bytes(np.packbits(bits).tobytes(), "big"), thumb


def _bands(h: int, n: int) -> list[tuple[int, int]]:
    width = -(-64 // n)
    return [(k, (h >> (k * width)) & ((1 << width) - 1)) for k in range(n)]


def near_duplicates(
    train: list[Sample], test: list[Sample], bits: int = NEAR_BITS, hashes: dict | None = None
) -> list[tuple[Sample, Sample, int]]:
    """(train sample, held-out sample, differing bits) for each held-out sample's nearest training
    picture within ``bits`` bits; each pair once. ``hashes`` caches path -> hash between calls."""
    hashes = {} if hashes is None else hashes

    def hash_of(ref: Any) -> tuple[int, np.ndarray] | None:
        key = str(ref) if isinstance(ref, str) else id(ref)
        if key not in hashes:
            try:
                hashes[key] = fingerprint(ref)
            except ValueError:
                hashes[key] = None  # an unreadable picture is reported by the checks already
        return hashes[key]

    index: dict[tuple[int, int], list[tuple[int, np.ndarray, int]]] = defaultdict(list)
    n_images = sum(len(s.images) for s in train) + sum(len(s.images) for s in test)
    bar = tqdm(
        total=n_images, desc="hashing pictures", unit="image", disable=n_images < 2000, dynamic_ncols=True
    )
    for i, s in enumerate(train):
        bar.update(len(s.images))
        for ref in s.images:
            found = hash_of(ref)
            if found is not None:
                for band in _bands(found[0], bits + 1):
                    index[band].append((*found, i))
    pairs = []
    for t in test:
        bar.update(len(t.images))
        best: tuple[int, int] | None = None
        for ref in t.images:
            found = hash_of(ref)
            if found is None:
                continue
            h, thumb = found
            for band in _bands(h, bits + 1):
                for other, other_thumb, i in index.get(band, ()):
                    d = (h ^ other).bit_count()
                    close = d <= bits and np.abs(thumb - other_thumb).mean() <= THUMB_TOLERANCE
                    if close and (best is None or d < best[0]):
                        best = (d, i)
        if best is not None:
            pairs.append((train[best[1]], t, best[0]))
    bar.close()
    return pairs


def duplicate_warnings(pairs: list[tuple[Sample, Sample, int]]) -> list[Problem]:
    """One warning per near-duplicate pair, located at the held-out record."""
    return [
        Problem(
            t.where,
            f"image nearly the same as training record {s.where} ({d} of 64 hash bits differ): "
            "the held-out score would partly measure memory (drop one, or split by a group key)",
        )  # fmt: skip
        for s, t, d in pairs
    ]


def check_split(
    cfg: Any, samples: list[Sample], held_out: list[Sample] | None = None
) -> tuple[str, list[Problem]]:
    """``cotune data check``'s view of the held-out side training would use: the balance of each side
    and the near-duplicate pictures across them (``held_out``: the samples of ``data.test_file``;
    None: the seeded split of ``samples``)."""
    d = cfg.data
    if held_out is not None:
        train, test, key = samples, held_out, ""
        how = f"held-out file {d.test_file}"
    elif len(samples) >= 2 and hasattr(d, "test_split_ratio"):
        train, test = split_for_training(samples, d.test_split_ratio, d.split_seed, d.split_by, log=None)
        how, key = f"seeded split ({d.test_split_ratio:g} held out", d.split_by
        how += f", grouped by {key})" if key else ")"
    else:
        return "", []
    pairs = near_duplicates(train, test)
    text = f"{how}\n{class_balance(train, test, key)}"
    return text + f"\nnear-duplicate pictures across the sides: {len(pairs)}", duplicate_warnings(pairs)
