"""From a TrainConfig to training and validation DataLoaders (the data half of a recipe's setup)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cotune.data.augment import augment_conflicts, build_augmenter
from cotune.data.batching import (
    LengthGroupedBatchSampler,
    PackedBatchSampler,
    PackingCollator,
    PaddingCollator,
    packed_pad_fraction,
    pad_fraction,
)
from cotune.data.cookbook import cookbook_dataset
from cotune.data.dataset import SFTDataset, encode_samples
from cotune.data.records import DataError, Problem, Sample, load_samples, report_problems
from cotune.data.split import split_for_training
from cotune.models.families import ModelFamily


@dataclass
class DataBundle:
    """What the training loop needs from the data step."""

    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader | None
    train_sampler: Any = None
    report: list[str] = field(default_factory=list)
    cookbook: bool = False
    val_samples: list = field(default_factory=list)  # the validation Samples (task metrics answer them)


def _loader(dataset, sampler, collate, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def is_cookbook(cfg: Any) -> bool:
    """True when the data is a llama-cookbook dataset file (named either way)."""
    if cfg.dataset == "custom_dataset" or cfg.custom_dataset.file or cfg.data.format == "cookbook":
        return True
    return cfg.data.format == "auto" and str(cfg.dataset).endswith(".py")


def load_data_file(
    cfg: Any, path: str, log: Callable[[str], None] | None = print
) -> tuple[list[Sample], list[Problem]]:
    """Reads and validates one data file with the ``data`` section's settings (format, columns,
    image root, system prompt): what training and ``cotune data check`` both use."""
    d = cfg.data
    return load_samples(
        path,
        d.image_root,
        d.system_prompt,
        fmt=d.format,
        columns=d.columns,
        log=log,
        workers=d.image_workers,
        image_check=d.image_check,
    )


def build_data(
    cfg: Any,
    processor: Any,
    family: ModelFamily,
    rank: int = 0,
    world_size: int = 1,
    augment: Callable | None = None,
    log: Callable[[str], None] = print,
) -> DataBundle:
    """Reads, validates, splits, tokenizes and batches the data named by ``cfg``.

    Bad records are reported with file:line and skipped, or, with ``data.on_error: raise``, all of
    them are listed in one error before any training starts. Training images are augmented when
    ``data.augment.enabled`` (or by ``augment``); validation images never are.
    """
    tokenizer = processor.tokenizer
    if is_cookbook(cfg):
        return _build_cookbook(cfg, processor, family, rank, world_size, log)
    d = cfg.data
    samples, problems = load_data_file(cfg, cfg.dataset, log)
    total = len(samples) + len(problems)
    if d.test_file:
        val_samples, val_problems = load_data_file(cfg, d.test_file, log)
        problems += val_problems
        total += len(val_samples) + len(val_problems)
        train_samples = samples
    else:
        train_samples, val_samples = split_for_training(
            samples, d.test_split_ratio, d.split_seed, d.split_by, log=log if rank == 0 else None
        )
    train_enc, p1, s1 = encode_samples(train_samples, processor, family, d.max_seq_len, d.overlength)
    val_enc, p2, s2 = encode_samples(val_samples, processor, family, d.max_seq_len, d.overlength)
    problems += p1 + p2
    report_problems(problems, d.on_error, total, log=log if rank == 0 else (lambda s: None))
    if not train_enc:
        raise DataError(f"no usable training samples in {cfg.dataset}")
    report = [
        f"train: {s1.describe(d.max_seq_len)}",
        f"validation: {s2.describe(d.max_seq_len)}"
        + ("" if d.test_file else f" (seeded split of {cfg.dataset})"),
    ]
    if problems:
        report.append(f"skipped {len(problems)} records (see the list above)")

    image_id = family.image_token_id(tokenizer)
    collate = PaddingCollator(tokenizer.pad_token_id, family, image_id)
    augment = augment or build_augmenter(cfg)
    if augment is not None:
        report.append(f"augmentation of training images: {_describe_augment(d.augment)}")
        report += [f"warning: {c}" for c in augment_conflicts(d.augment, train_samples)]
    train_ds = SFTDataset(train_enc, processor, family, augment=augment)
    lengths = train_ds.lengths
    grouped_sampler = LengthGroupedBatchSampler(
        lengths, cfg.batch_size_training, seed=cfg.seed, rank=rank, world_size=world_size, keys=True
    )
    plain = LengthGroupedBatchSampler(lengths, cfg.batch_size_training, seed=cfg.seed, group_by_length=False)
    grouped = pad_fraction(lengths, grouped_sampler.global_batches())
    ungrouped = pad_fraction(lengths, plain.global_batches())
    if cfg.batching_strategy == "packing":
        train_collate = PackingCollator(tokenizer.pad_token_id, family, image_id)
        train_sampler = PackedBatchSampler(
            lengths,
            cfg.batch_size_training,
            cfg.context_length,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            has_images=[bool(e.images) for e in train_enc],
        )
        batches = train_sampler.global_batches()
        n_rows = sum(len(b) for b in batches)
        report.append(
            f"packing: {len(lengths)} samples in {n_rows} rows of up to {cfg.context_length} tokens "
            f"({len(lengths) / max(n_rows, 1):.1f} per row); padding {packed_pad_fraction(lengths, batches):.1%} "
            f"of tokens (padding one sample per row: {grouped:.1%} with length grouping, {ungrouped:.1%} without)"
        )
        too_long = sum(n > cfg.context_length for n in lengths)
        if too_long:
            report.append(
                f"warning: {too_long} samples are longer than context_length={cfg.context_length}: "
                "each gets a row of its own (raise context_length to at least data.max_seq_len)"
            )
    else:
        train_collate, train_sampler = collate, grouped_sampler
        report.append(f"padding: {grouped:.1%} of tokens with length grouping ({ungrouped:.1%} without)")
    val = None
    if cfg.run_validation and val_enc:
        val_ds = SFTDataset(val_enc, processor, family)
        val_sampler = LengthGroupedBatchSampler(
            val_ds.lengths,
            cfg.val_batch_size or cfg.batch_size_training,
            shuffle=False,
            rank=rank,
            world_size=world_size,
        )
        val = _loader(val_ds, val_sampler, collate, cfg.num_workers_dataloader)
    train = _loader(train_ds, train_sampler, train_collate, cfg.num_workers_dataloader)
    return DataBundle(
        train=train, val=val, train_sampler=train_sampler, report=report, val_samples=val_samples
    )


def _describe_augment(a: Any) -> str:
    parts = []
    if a.crop_scale_min < 1.0:
        parts.append(f"crop {a.crop_scale_min:g}-{a.crop_scale_max:g} of the area")
    if a.rotate:
        parts.append(f"rotate +-{a.rotate:g} deg")
    if any((a.brightness, a.contrast, a.saturation, a.hue)):
        parts.append(f"jitter b{a.brightness:g} c{a.contrast:g} s{a.saturation:g} h{a.hue:g}")
    parts += [f"{name} p={getattr(a, name):g}" for name in ("blur", "noise", "hflip") if getattr(a, name)]
    return ", ".join(parts) or "enabled, but every transform is set to 0"


def _build_cookbook(cfg, processor, family, rank, world_size, log) -> DataBundle:
    """llama-cookbook dataset file: its own records and (optionally) its own collator."""
    if not cfg.custom_dataset.file and str(cfg.dataset).endswith(".py"):
        cfg = dataclasses.replace(
            cfg, custom_dataset=dataclasses.replace(cfg.custom_dataset, file=cfg.dataset)
        )
        log(f"{cfg.dataset}: format 'cookbook' (a llama-cookbook dataset file)")
    if not cfg.custom_dataset.file:
        raise DataError(
            "dataset is 'custom_dataset' but custom_dataset.file is not set (or pass --dataset FILE)"
        )
    train_ds, collate = cookbook_dataset(cfg.custom_dataset, processor, "train")
    if collate is None:
        tokenizer = processor.tokenizer
        collate = PaddingCollator(tokenizer.pad_token_id, family, family.image_token_id(tokenizer))
    sampler = LengthGroupedBatchSampler(
        [1] * len(train_ds),
        cfg.batch_size_training,
        seed=cfg.seed,
        group_by_length=False,
        rank=rank,
        world_size=world_size,
    )
    val = None
    report = [
        f"train: {len(train_ds)} records from {cfg.custom_dataset.file} (split '{cfg.custom_dataset.train_split}')"
    ]
    if cfg.run_validation:
        val_ds, _ = cookbook_dataset(cfg.custom_dataset, processor, "test")
        val_sampler = LengthGroupedBatchSampler(
            [1] * len(val_ds),
            cfg.val_batch_size or cfg.batch_size_training,
            shuffle=False,
            group_by_length=False,
            rank=rank,
            world_size=world_size,
        )
        val = _loader(val_ds, val_sampler, collate, cfg.num_workers_dataloader)
        report.append(f"validation: {len(val_ds)} records (split '{cfg.custom_dataset.test_split}')")
    train = _loader(train_ds, sampler, collate, cfg.num_workers_dataloader)
    return DataBundle(train=train, val=val, train_sampler=sampler, report=report, cookbook=True)
