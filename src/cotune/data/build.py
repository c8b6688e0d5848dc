"""From a TrainConfig to training and validation DataLoaders (the data half of a recipe's setup)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
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
from cotune.data.cache import prepare_file
from cotune.data.cookbook import cookbook_dataset
from cotune.data.dataset import Encoded, EncodeStats, SFTDataset, encode_samples
from cotune.data.records import DataError, Problem, Sample, load_samples, report_problems
from cotune.data.split import split_for_training
from cotune.models.families import ModelFamily
from cotune.runtime import cpus_per_process


@dataclass
class DataBundle:
    """What the training loop needs from the data step."""

    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader | None
    train_sampler: Any = None
    report: list[str] = field(default_factory=list)
    cookbook: bool = False
    val_samples: list = field(default_factory=list)  # the validation Samples (task metrics answer them)


def batch_loader(dataset, sampler, collate, workers: int, pin: bool = False) -> torch.utils.data.DataLoader:
    workers = max(0, workers)  # -1 (num_workers_dataloader's "choose") from a caller that did not resolve it
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=pin,
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
    device_type: str = "cpu",
) -> DataBundle:
    """Reads, validates, splits, tokenizes and batches the data named by ``cfg``.

    Bad records are reported with file:line and skipped, or, with ``data.on_error: raise``, all of
    them are listed in one error before any training starts. Training images are augmented when
    ``data.augment.enabled`` (or by ``augment``); validation images never are. With ``data.cache``
    each file is prepared once (``cache.prepare_file``: the processes share the work) and
    memory-mapped. ``device_type`` 'cuda' gives the loaders worker processes and pinned memory.
    """
    if is_cookbook(cfg):
        return _build_cookbook(cfg, processor, family, rank, world_size, log)
    d = cfg.data
    splits = encode_splits(cfg, processor, family, rank, world_size, log)
    report_problems(splits.problems, d.on_error, splits.total, log=log if rank == 0 else (lambda s: None))
    if not len(splits.train):
        raise DataError(f"no usable training samples in {cfg.dataset}")
    report = splits.report
    augment = augment or build_augmenter(cfg)
    if augment is not None:
        report.append(f"augmentation of training images: {_describe_augment(d.augment)}")
        report += [
            f"warning: {c}" for c in augment_conflicts(d.augment, splits.train_samples, splits.train_flags)
        ]
    workers, pin = loader_settings(cfg.num_workers_dataloader, device_type)
    train_ds = SFTDataset(splits.train, processor, family, augment=augment)
    train_sampler, train_collate = train_batching(cfg, train_ds, processor, family, rank, world_size, report)
    val = None
    if cfg.run_validation and len(splits.val):
        val_enc, line = validation_subset(splits.val, getattr(d, "val_max_samples", 0), d.split_seed)
        report.append(line)
        val_ds = SFTDataset(val_enc, processor, family)
        val = held_out_loader(
            cfg, val_ds, _padding_collator(processor, family), rank, world_size, workers, pin
        )
    report.append(f"loader: {workers} worker processes" + (", pinned memory" if pin else ""))
    train = batch_loader(train_ds, train_sampler, train_collate, workers, pin)
    val_samples = full_samples(cfg, splits) if getattr(cfg, "eval_generate_samples", 0) else []
    return DataBundle(
        train=train, val=val, train_sampler=train_sampler, report=report, val_samples=val_samples
    )


@dataclass
class Splits:
    """The encoded training and validation samples, and what became of the others."""

    train: Sequence[Encoded]
    val: Sequence[Encoded]
    problems: list[Problem]
    total: int  # records read, usable or not
    report: list[str]
    train_samples: list[Sample]  # for the augmentation check (without text when from the cache)
    train_flags: Any = None  # their ``augment.mention_flags`` when they carry no text
    val_samples: list[Sample] = field(default_factory=list)  # without messages when from the cache
    val_path: str = ""  # the file they come from


class _ReadFile:
    """A data file read into memory (``data.cache`` off, or images that are not files): the same
    questions as a cache entry (``prepared.EncodedFile``) answered from its samples."""

    def __init__(
        self, samples: list[Sample], problems: list[Problem], processor: Any, family: ModelFamily, d: Any
    ):
        self._samples, self.problems = samples, problems
        self.processor, self.family, self.d = processor, family, d

    def samples(self) -> list[Sample]:
        return self._samples

    def select(self, positions: list[int]) -> tuple[list[Encoded], list[Problem], EncodeStats]:
        d = self.d
        return encode_samples(
            [self._samples[k] for k in positions], self.processor, self.family, d.max_seq_len, d.overlength
        )

    def flags(self, positions: list[int]) -> None:
        return None


def prepared_file(
    cfg: Any, path: str, processor: Any, family: ModelFamily, rank: int, world_size: int, log
) -> Any:
    """One data file, read, checked and ready to encode: a cache entry (built once, each process
    its share, when missing) or, without the cache, the file read in this process."""
    d = cfg.data
    if getattr(d, "cache", False):
        entry = prepare_file(path, d, processor, family, d.cache_dir, rank, world_size, log)
        if entry is not None:
            return entry
        log(f"{path}: not cached (its images are not files); read in every process")
    samples, problems = load_data_file(cfg, path, log if rank == 0 else None)
    return _ReadFile(samples, problems, processor, family, d)


def encode_splits(cfg: Any, processor: Any, family: ModelFamily, rank: int, world_size: int, log) -> Splits:
    """The training and validation samples: the test file's, or a seeded split of the data file's."""
    d = cfg.data
    main = prepared_file(cfg, cfg.dataset, processor, family, rank, world_size, log)
    everything = main.samples()
    total, problems = len(everything) + len(main.problems), list(main.problems)
    if d.test_file:
        held = prepared_file(cfg, d.test_file, processor, family, rank, world_size, log)
        total += len(held.samples()) + len(held.problems)
        problems += held.problems
        train_pos = list(range(len(everything)))
        val_pos, val_source = list(range(len(held.samples()))), held
    else:
        train_s, val_s = split_for_training(
            everything, d.test_split_ratio, d.split_seed, d.split_by, log=log if rank == 0 else None
        )
        index = {id(s): k for k, s in enumerate(everything)}
        train_pos, val_pos, val_source = [index[id(s)] for s in train_s], [index[id(s)] for s in val_s], main
    train, p1, s1 = main.select(train_pos)
    val, p2, s2 = val_source.select(val_pos)
    report = [
        f"train: {s1.describe(d.max_seq_len)}",
        f"validation: {s2.describe(d.max_seq_len)}"
        + ("" if d.test_file else f" (seeded split of {cfg.dataset})"),
    ]
    problems += p1 + p2
    if problems:
        report.append(f"skipped {len(problems)} records (see the list above)")
    train_samples = [everything[k] for k in train_pos]
    held_out = val_source.samples()
    return Splits(
        train,
        val,
        problems,
        total,
        report,
        train_samples,
        main.flags(train_pos),
        val_samples=[held_out[k] for k in val_pos],
        val_path=d.test_file or cfg.dataset,
    )


def full_samples(cfg: Any, splits: Splits) -> list[Sample]:
    """The validation samples with their messages (task metrics answer their questions): as they are
    when read in memory, else read again from their file (a cache entry keeps no text)."""
    if all(s.messages for s in splits.val_samples):
        return splits.val_samples
    by_place = {s.where: s for s in load_data_file(cfg, splits.val_path, None)[0]}
    return [by_place[s.where] for s in splits.val_samples if s.where in by_place]


def validation_subset(
    encoded: Sequence, limit: int, seed: int, unit: str = "samples"
) -> tuple[Sequence, str]:
    """A seeded subset of at most ``limit`` validation samples or pairs (0: all), in their order,
    and the report's line about it."""
    n = len(encoded)
    if not limit or n <= limit:
        return encoded, f"validation on all {n} held-out {unit}"
    picked = sorted(random.Random(seed).sample(range(n), limit))
    subset = encoded.subset(picked) if hasattr(encoded, "subset") else [encoded[i] for i in picked]
    return subset, (
        f"validation on a seeded subset of {limit} of the {n} held-out {unit}, the same at every "
        "validation (data.val_max_samples; 0: all)"
    )


def held_out_loader(
    cfg: Any, dataset: Any, collate: Callable, rank: int, world_size: int, workers: int, pin: bool
) -> torch.utils.data.DataLoader:
    """The validation loader of samples or pairs: length-grouped batches of ``val_batch_size``
    (else ``batch_size_training``), in order, this rank's share of them."""
    sampler = LengthGroupedBatchSampler(
        dataset.lengths, cfg.val_batch_size or cfg.batch_size_training, shuffle=False, rank=rank,
        world_size=world_size,
    )  # fmt: skip
    return batch_loader(dataset, sampler, collate, workers, pin)


def loader_settings(requested: int, device_type: str) -> tuple[int, bool]:
    """(worker processes, pinned memory) of the loaders: ``requested`` workers when >= 0; else, on a
    GPU, the CPUs of this process's share of the node less one (at most 8), on CPU none."""
    pin = device_type == "cuda"
    if requested >= 0:
        return requested, pin
    if not pin:
        return 0, False
    return max(0, min(8, cpus_per_process() - 1)), True


def _padding_collator(processor: Any, family: ModelFamily) -> PaddingCollator:
    tokenizer = processor.tokenizer
    return PaddingCollator(tokenizer.pad_token_id, family, family.image_token_id(tokenizer))


def train_batching(
    cfg: Any,
    train_ds: SFTDataset,
    processor: Any,
    family: ModelFamily,
    rank: int,
    world_size: int,
    report: list[str],
) -> tuple[Any, Any]:
    """The training sampler and collator (padded, length-grouped batches, or packed rows), with the
    padding they cost added to ``report``."""
    lengths = train_ds.lengths
    grouped_sampler = LengthGroupedBatchSampler(
        lengths, cfg.batch_size_training, seed=cfg.seed, rank=rank, world_size=world_size, keys=True
    )
    plain = LengthGroupedBatchSampler(lengths, cfg.batch_size_training, seed=cfg.seed, group_by_length=False)
    grouped = pad_fraction(lengths, grouped_sampler.global_batches())
    ungrouped = pad_fraction(lengths, plain.global_batches())
    if cfg.batching_strategy != "packing":
        report.append(f"padding: {grouped:.1%} of tokens with length grouping ({ungrouped:.1%} without)")
        return grouped_sampler, _padding_collator(processor, family)
    tokenizer = processor.tokenizer
    collate = PackingCollator(tokenizer.pad_token_id, family, family.image_token_id(tokenizer))
    sampler = PackedBatchSampler(
        lengths,
        cfg.batch_size_training,
        cfg.context_length,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        has_images=train_ds.has_images,
    )
    batches = sampler.global_batches()
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
    return sampler, collate


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
        val = batch_loader(val_ds, val_sampler, collate, cfg.num_workers_dataloader)
        report.append(f"validation: {len(val_ds)} records (split '{cfg.custom_dataset.test_split}')")
    train = batch_loader(train_ds, sampler, collate, cfg.num_workers_dataloader)
    return DataBundle(train=train, val=val, train_sampler=sampler, report=report, cookbook=True)
