"""Batches: right padding, image inputs stacked per family, and length-grouped batch order."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch

from cotune.data.chat import IGNORE_INDEX
from cotune.models.families import ModelFamily


class PaddingCollator:
    """Pads a list of items (from ``SFTDataset``) on the right into one batch.

    The batch holds ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding) and the family's
    image inputs (for Mllama: pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask).
    Items that failed to load (``{"error": ...}``) are left out and listed under ``skipped``.
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
        seq_len = max(len(it["input_ids"]) for it in items)
        m = self.pad_to_multiple_of
        seq_len = (seq_len + m - 1) // m * m
        batch_size = len(items)
        input_ids = torch.full((batch_size, seq_len), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n] = it["input_ids"]
            labels[b, :n] = it["labels"]
            attention_mask[b, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        batch.update(self.family.collate_images(items, seq_len, self.image_token_id))
        if skipped:
            batch["skipped"] = skipped
        return batch


def pad_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of padding tokens when ``batches`` (lists of indices) are right-padded."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    return 1.0 - real / padded if padded else 0.0


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
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """Every global batch of this epoch, as lists of dataset indices."""
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        global_size = self.batch_size * self.world_size
        if self.group_by_length:
            span = global_size * self.mega
            order = [
                i
                for start in range(0, len(order), span)
                for i in sorted(order[start : start + span], key=lambda j: -self.lengths[j])
            ]
        batches = [order[s : s + global_size] for s in range(0, len(order), global_size)]
        if batches and self.drop_last and len(batches[-1]) < global_size:
            batches.pop()
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        return batches

    def _rank_slice(self, global_batch: list[int]) -> list[int]:
        per = -(-len(global_batch) // self.world_size)
        mine = global_batch[self.rank * per : (self.rank + 1) * per]
        return mine or global_batch[-1:]

    def __iter__(self) -> Iterator[list[int]]:
        for global_batch in self.global_batches():
            yield self._rank_slice(global_batch)

    def __len__(self) -> int:
        n, g = len(self.lengths), self.batch_size * self.world_size
        return n // g if self.drop_last else -(-n // g)


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
