"""Batches: right padding, length-grouped batch order, and packing several samples per row.

Padding (``batching_strategy: padding``): each sample is a row, right-padded to the batch's longest;
``LengthGroupedBatchSampler`` puts samples of similar length together to waste less.

Packing (``batching_strategy: packing``): ``PackedBatchSampler`` fills rows of ``context_length``
tokens with several samples (first-fit decreasing within shuffled windows) and ``PackingCollator``
concatenates them. Each sample keeps its own positions (``position_ids`` restart at 0), which is
how transformers recognises packed rows and confines self-attention to each sample (a
block-diagonal causal mask, built by ``masking_utils.find_packed_sequence_indices`` when no 2D
``attention_mask`` is passed: so packed batches carry ``token_mask`` instead). The first token of
each sample is not predicted from the previous sample (its label is -100), and each sample's
text cross-attends only to its own images (``ModelFamily.collate_packed_images``).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch

from cotune.data.chat import IGNORE_INDEX
from cotune.data.dataset import ItemKey
from cotune.models.families import ModelFamily


class _Collator(ABC):
    """What both collators share: their settings, leaving out items that failed to load, rounding up.

    ``__call__`` drops the items that failed (``{"error": ...}``, listed under ``skipped``) and hands
    the rest to the subclass's ``collate``; a batch with no usable item is ``{"empty": True}``.
    """

    def __init__(
        self, pad_token_id: int, family: ModelFamily, image_token_id: int, pad_to_multiple_of: int = 1
    ):
        self.pad_token_id = pad_token_id
        self.family = family
        self.image_token_id = image_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict | None]) -> dict:
        skipped = [it["error"] for it in items if it is not None and "error" in it]
        items = [it for it in items if it is not None and "error" not in it]
        if not items:
            return {"skipped": skipped, "empty": True}
        batch = self.collate(items)
        if skipped:
            batch["skipped"] = skipped
        return batch

    @abstractmethod
    def collate(self, items: list[dict]) -> dict:
        """The batch of ``items`` (all loaded); each collator lays its rows out in its own way."""

    def _blank_rows(self, n_rows: int, longest: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(row length: ``longest`` rounded up to ``pad_to_multiple_of``, padded input_ids, labels)."""
        m = self.pad_to_multiple_of
        seq_len = (longest + m - 1) // m * m
        input_ids = torch.full((n_rows, seq_len), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n_rows, seq_len), IGNORE_INDEX, dtype=torch.long)
        return seq_len, input_ids, labels


class PaddingCollator(_Collator):
    """Pads a list of items (from ``SFTDataset``) on the right into one batch.

    The batch holds ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding) and the family's
    image inputs (for Mllama: pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask).
    Items that failed to load (``{"error": ...}``) are left out and listed under ``skipped``.
    """

    def collate(self, items: list[dict]) -> dict:
        batch_size = len(items)
        seq_len, input_ids, labels = self._blank_rows(batch_size, max(len(it["input_ids"]) for it in items))
        attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n] = it["input_ids"]
            labels[b, :n] = it["labels"]
            attention_mask[b, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        batch.update(self.family.collate_images(items, seq_len, self.image_token_id))
        return batch


def pad_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of padding tokens when ``batches`` (lists of indices) are right-padded."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    return 1.0 - real / padded if padded else 0.0


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> tuple[list[int], random.Random]:
    """The epoch's order of ``n`` samples (a seeded shuffle, or 0..n-1), and the RNG that drew it."""
    order = list(range(n))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    return order, rng


def _global_batches(order: list, size: int, drop_last: bool) -> list[list]:
    """``order`` cut into global batches of ``size``; an incomplete last one is dropped when ``drop_last``."""
    batches = [order[s : s + size] for s in range(0, len(order), size)]
    if batches and drop_last and len(batches[-1]) < size:
        batches.pop()
    return batches


def _rank_slice(global_batch: list, rank: int, world_size: int) -> list:
    """This rank's share of a global batch; a rank whose share would be empty repeats the last item."""
    per = -(-len(global_batch) // world_size)
    return global_batch[rank * per : (rank + 1) * per] or global_batch[-1:]


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's batches of indices; samples of similar length share a batch.

    The order is a seeded shuffle per epoch; within "mega-batches" of ``mega_batch_mult`` global
    batches the samples are sorted by length, then cut into global batches (``batch_size`` x
    ``world_size``) whose order is shuffled again. Each rank takes its slice of every global batch,
    so all ranks run the same number of steps. The last incomplete global batch is dropped when
    ``drop_last``; otherwise it is kept (ranks whose slice would be empty get one repeated index).

    Args:
        lengths: token length of every sample.
        batch_size: samples per rank per batch.
        seed: base seed; the epoch is added via ``set_epoch``.
        shuffle: False keeps the dataset order (validation).
        group_by_length: False disables sorting inside mega-batches.
        rank, world_size: this process's place among the data-parallel processes.
        keys: yield ``ItemKey(index, epoch)`` instead of plain indices, so the dataset knows the
            epoch (augmentation draws from it) even in persistent workers.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
        mega_batch_mult: int = 50,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        keys: bool = False,
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.mega = mega_batch_mult
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.keys = keys
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """Every global batch of this epoch, as lists of dataset indices."""
        order, rng = _epoch_order(len(self.lengths), self.seed, self.epoch, self.shuffle)
        global_size = self.batch_size * self.world_size
        if self.group_by_length:
            span = global_size * self.mega
            order = [
                i
                for start in range(0, len(order), span)
                for i in sorted(order[start : start + span], key=lambda j: -self.lengths[j])
            ]
        batches = _global_batches(order, global_size, self.drop_last)
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for global_batch in self.global_batches():
            mine = _rank_slice(global_batch, self.rank, self.world_size)
            yield [ItemKey(i, self.epoch) for i in mine] if self.keys else mine

    def __len__(self) -> int:
        n, g = len(self.lengths), self.batch_size * self.world_size
        return n // g if self.drop_last else -(-n // g)


def pack_rows(lengths: list[int], indices: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: ``indices`` into rows of at most ``capacity`` tokens.

    A sample longer than ``capacity`` gets a row of its own (it is never cut here).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda j: -lengths[j]):
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


class PackedBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's packed batches: ``batch_size`` rows of up to ``context_length`` tokens.

    Per epoch: a seeded shuffle, first-fit-decreasing packing within windows of ``window``
    samples (so rows mix samples from across the epoch but packing stays fast), then the rows are
    shuffled and cut into global batches of ``batch_size`` x ``world_size`` rows; each rank takes
    its slice. Items are ``ItemKey(index, epoch, row)``, ``row`` being the row within the batch.

    Args:
        lengths: token length of every sample.
        batch_size: rows per rank per batch.
        context_length: tokens per row.
        seed, shuffle, rank, world_size, drop_last: as ``LengthGroupedBatchSampler``.
        window: samples packed together.
        has_images: per sample, whether it has images; when given, text-only samples share rows
            only with text-only samples (with transformers' Mllama, a token attending to no image
            still receives the mean of its row's images through the gated cross-attention residual,
            transformers issue #39379; so a text-only sample must not share a row with images).
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        context_length: int,
        seed: int = 0,
        shuffle: bool = True,
        window: int = 2048,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        has_images: list[bool] | None = None,
    ) -> None:
        self.lengths = list(lengths)
        self.has_images = list(has_images) if has_images is not None else None
        self.batch_size = batch_size
        self.context_length = context_length
        self.seed = seed
        self.shuffle = shuffle
        self.window = window
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._cache: tuple[int, list] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[list[int]]]:
        """Every global batch of this epoch: lists of rows, each a list of dataset indices."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        order, rng = _epoch_order(len(self.lengths), self.seed, self.epoch, self.shuffle)
        rows = []
        for start in range(0, len(order), self.window):
            window = order[start : start + self.window]
            if self.has_images is None:
                rows += pack_rows(self.lengths, window, self.context_length)
                continue
            for kind in (True, False):
                same = [i for i in window if self.has_images[i] == kind]
                rows += pack_rows(self.lengths, same, self.context_length)
        if self.shuffle:
            rng.shuffle(rows)
        batches = _global_batches(rows, self.batch_size * self.world_size, self.drop_last)
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[ItemKey]]:
        for global_batch in self.global_batches():
            mine = _rank_slice(global_batch, self.rank, self.world_size)
            yield [ItemKey(i, self.epoch, r) for r, row in enumerate(mine) for i in row]

    def __len__(self) -> int:
        return len(self.global_batches())


def packed_pad_fraction(lengths: list[int], batches: list[list[list[int]]]) -> float:
    """Share of padding tokens when each batch of packed rows is padded to its longest row."""
    real = sum(lengths[i] for b in batches for row in b for i in row)
    padded = sum(max(sum(lengths[i] for i in row) for row in b) * len(b) for b in batches if b)
    return 1.0 - real / padded if padded else 0.0


class PackingCollator(_Collator):
    """Concatenates the items of each packed row (``item["row"]``) and pads the rows on the right.

    The batch holds ``input_ids``, ``labels`` (-100 on padding and on each sample's first token),
    ``position_ids`` (restarting at 0 for each sample, and for the padding), ``token_mask`` (1 on
    real tokens; deliberately not called ``attention_mask``, whose presence would make transformers
    ignore the packing) and the family's packed image inputs. Items without a row get their own.
    """

    def __init__(
        self, pad_token_id: int, family: ModelFamily, image_token_id: int, pad_to_multiple_of: int = 1
    ):
        if family.collate_packed_images is None:
            raise ValueError(f"batching_strategy 'packing' is not available for {family.name} models")
        super().__init__(pad_token_id, family, image_token_id, pad_to_multiple_of)

    def collate(self, items: list[dict]) -> dict:
        grouped: dict[int, list[dict]] = {}
        for k, it in enumerate(items):
            row = it.get("row", -1)
            grouped.setdefault(row if row is not None and row >= 0 else -1 - k, []).append(it)
        rows = [grouped[r] for r in sorted(grouped, key=lambda r: (r < 0, abs(r)))]
        lengths = [sum(len(it["input_ids"]) for it in row) for row in rows]
        seq_len, input_ids, labels = self._blank_rows(len(rows), max(lengths))
        position_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
        token_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
        for b, row in enumerate(rows):
            start = 0
            for it in row:
                n = len(it["input_ids"])
                input_ids[b, start : start + n] = it["input_ids"]
                labels[b, start : start + n] = it["labels"]
                labels[b, start] = IGNORE_INDEX  # never predicted from the previous sample's last token
                position_ids[b, start : start + n] = torch.arange(n)
                start += n
            token_mask[b, :start] = 1
            position_ids[b, start:] = torch.arange(seq_len - start)  # padding: a segment of its own
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "token_mask": token_mask,
            "samples_per_row": [len(row) for row in rows],
        }
        batch.update(self.family.collate_packed_images(rows, seq_len, self.image_token_id))
        return batch


def count_tokens(batch: dict) -> int:
    """Real (non-padding) tokens of a padded or packed batch."""
    mask = batch.get("attention_mask", batch.get("token_mask"))
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def to_device(batch: dict, device: torch.device, float_dtype: torch.dtype | None = None) -> dict:
    """Moves tensors to ``device``; floating tensors (pixel values) are cast to ``float_dtype``."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if float_dtype is not None and v.is_floating_point():
                v = v.to(float_dtype)
        out[k] = v
    return out
