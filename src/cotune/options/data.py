"""The sections under ``data``: how records are read and rendered, the held-out file, the
train/validation split and image augmentation.

They share the key ``data`` so that a run's ``config.yaml`` has one ``data`` mapping, but are
separate sections because verbs take different parts: eval reads and renders records exactly as
training does (``DataOptions``, ``SystemPromptOptions``, ``TemplateDateOptions``, ``TestFileOptions``) but neither splits
nor augments; generate and chat take only the system prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cotune.options.fields import ConfigError, opt

# The date Llama 3.x templates fall back to without ``strftime_now``; any fixed date makes rendering
# reproducible, and this one is what the model saw in Meta's own examples.
DEFAULT_DATE_STRING = "26 Jul 2024"


@dataclass
class DataOptions:
    """How records are read, rendered and filtered."""

    format: str = opt(
        "auto",
        "Record format: auto (detect and say), llava_cot_jsonl, llava_json, sharegpt, hf, cookbook.",
        choices=("auto", "llava_cot_jsonl", "llava_json", "sharegpt", "hf", "cookbook"),
    )
    image_root: str = opt("", "Folder image paths are relative to (default: the data file's folder).")
    on_error: str = opt(
        "skip",
        "Bad records: 'skip' (report them and use the rest) or 'raise' (stop before any work).",
        choices=("skip", "raise"),
    )
    max_seq_len: int = opt(2048, "Longest rendered sample in tokens.", positive=True)
    overlength: str = opt(
        "drop", "Samples longer than max_seq_len: 'drop' or 'truncate'.", choices=("drop", "truncate")
    )
    columns: dict = opt({}, "Column mapping for Hugging Face datasets (e.g. {image: img, messages: chat}).")
    image_workers: int = opt(4, "Threads checking every image once as a data file is read.")
    image_check: str = opt(
        "decode",
        "When a data file is read: 'decode' every image, or read only each 'header' (fast on large "
        "sets; an image whose data is cut short is then skipped when training reaches it).",
        choices=("decode", "header"),
    )


@dataclass
class SystemPromptOptions:
    """The system message of every conversation."""

    system_prompt: str = opt(
        "", "Optional system prompt prepended to every conversation (Mllama refuses it with images)."
    )


@dataclass
class TemplateDateOptions:
    """The date the chat template writes, the same for every verb that renders a conversation."""

    date_string: str = opt(
        DEFAULT_DATE_STRING,
        "The date a chat template writes into a conversation (Llama 3.2's 'Today Date' of image-less "
        "ones): fixed, so a record renders to the same tokens on any day; give the one the adapter was "
        "trained with (a run's config.yaml carries it) to chat, evaluate, sample pairs or serve.",
    )


@dataclass
class TestFileOptions:
    """The labelled held-out file."""

    test_file: str = opt(
        "",
        "Held-out labelled file: training validates on it (empty: a seeded split of the training "
        "data), eval scores it, merge checks parity on its first record. --data FILE is short for it.",
    )


@dataclass
class SplitOptions:
    """The validation split when there is no test file."""

    test_split_ratio: float = opt(0.1, "Fraction held out for validation when no test file is given.")
    split_seed: int = opt(42, "Seed of the train/test split.")
    split_by: str = opt(
        "",
        "Record field whose groups (a patient, a part serial, a device) must stay on one side of the "
        "seeded split; the split is then stratified by answer and each side's balance printed.",
    )


@dataclass
class ValidationSubsetOptions:
    """How much of the held-out data training validates on."""

    val_max_samples: int = opt(
        64,
        "Training validates (at step 0, every eval_every_steps and each epoch's end) on a seeded "
        "subset of at most this many held-out samples, the same ones each time, so losses compare "
        "sample for sample (0: all of them; cotune eval scores the whole test file).",
    )


@dataclass
class DataCacheOptions:
    """The prepared (read, checked, tokenized) data kept on disk for every process and later run."""

    cache: bool = opt(
        True,
        "Prepare each data file once into a memory-mapped cache entry, reused by every process "
        "and later run while the file, the processor and the data settings are unchanged.",
    )
    cache_dir: str = opt(
        "",
        "Folder of the prepared-data cache (default: $COTUNE_DATA_CACHE, else ~/.cache/cotune/data, "
        "shared by all runs).",
    )
    cache_max_gib: float = opt(
        50.0,
        "Size the cache folder is kept within: after building an entry, the least recently used "
        "others are removed (never one used in the last hour); 0: no limit.",
    )
    prepare_workers: int = opt(
        -1,
        "Worker processes that check and tokenize a process's share of a data file as its cache "
        "entry is built (-1: one per CPU this process has to itself, none for under 4,000 records; "
        "0: in the process). The entry is the same either way.",
    )


def check_validation_subset(s: Any, prefix: str) -> None:
    """Raises ConfigError for a negative subset size."""
    if s.val_max_samples < 0:
        raise ConfigError(f"option '{prefix}val_max_samples' must be >= 0 (0: all); got {s.val_max_samples}")


def check_split(s: Any, prefix: str) -> None:
    """Raises ConfigError unless the held-out fraction is in (0, 1)."""
    if not 0.0 < s.test_split_ratio < 1.0:
        raise ConfigError(f"option '{prefix}test_split_ratio' must be in (0, 1); got {s.test_split_ratio}")


@dataclass
class AugmentConfig:
    """Visual augmentation of training images (albumentations); validation images are never augmented.

    Each image's transform is drawn from (seed, epoch, sample index, image index), so a resumed run
    sees the same augmentations as an uninterrupted one.
    """

    enabled: bool = opt(False, "Augment training images.")
    crop_scale_min: float = opt(0.8, "Random resized crop: smallest kept area fraction (1.0: no crop).")
    crop_scale_max: float = opt(1.0, "Random resized crop: largest kept area fraction.")
    rotate: float = opt(5.0, "Random rotation within +-this many degrees (0: none).")
    brightness: float = opt(0.2, "Colour jitter: brightness range (0: none).")
    contrast: float = opt(0.2, "Colour jitter: contrast range (0: none).")
    saturation: float = opt(0.2, "Colour jitter: saturation range (0: none).")
    hue: float = opt(
        0.02, "Colour jitter: hue range, a fraction of the colour circle, at most 0.5 (0: none)."
    )
    blur: float = opt(0.1, "Probability of a Gaussian blur.")
    noise: float = opt(0.1, "Probability of Gaussian noise.")
    hflip: float = opt(
        0.0, "Probability of a horizontal flip (off: flips break text and left/right questions)."
    )


def check_augment(a: Any, prefix: str) -> None:
    """Raises ConfigError for crop bounds, probabilities or a hue range out of their ranges."""
    if not 0.0 < a.crop_scale_min <= a.crop_scale_max <= 1.0:
        raise ConfigError(
            f"options '{prefix}crop_scale_min' and '{prefix}crop_scale_max' must satisfy "
            f"0 < min <= max <= 1; got {a.crop_scale_min} and {a.crop_scale_max}"
        )
    for name in ("blur", "noise", "hflip"):
        if not 0.0 <= getattr(a, name) <= 1.0:
            raise ConfigError(f"option '{prefix}{name}' is a probability in [0, 1]; got {getattr(a, name)}")
    if not 0.0 <= a.hue <= 0.5:
        raise ConfigError(f"option '{prefix}hue' must be in [0, 0.5]; got {a.hue}")
