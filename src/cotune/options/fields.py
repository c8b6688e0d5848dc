"""Options are dataclass fields with their help and checks in the metadata; a ``Section`` groups them.

A section is a small dataclass of options that verbs take together, and the key it lives under in a
verb's configuration: ``""`` puts its options at the top level (llama-cookbook's flat
``train_config`` spelling: ``lr``, ``model_name``), ``"lora_config"`` nests them (``lora_config.r``).
Several sections may share a key; a verb that takes them all sees one ``data`` mapping, a verb that
takes fewer (eval takes no train/validation split) sees only their options. Which verb takes which
section is decided in ``cotune.config.VERBS``.

Field metadata says what every verb checks the same way: ``choices`` (allowed values), ``positive``
and ``repeat`` (a list that each ``--flag`` occurrence appends to).

This module also holds the sections nearly every verb takes: the model, its dtype, the seed, the
device and the adapters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration problem the user must fix (unknown option, bad value)."""


def opt(default: Any, help: str, *, choices: tuple = (), positive: bool = False, repeat: bool = False) -> Any:
    """A dataclass field with its help text and checks in the metadata."""
    meta = {"help": help, "choices": choices, "positive": positive, "repeat": repeat}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


DTYPE_NAMES = ("bf16", "bfloat16", "fp32", "float32", "fp16", "float16")


@dataclass(frozen=True)
class Section:
    """A group of options that verbs take together.

    Attributes:
        name: its heading in ``cotune VERB --help``.
        key: where its options live in a configuration: ``""`` (top level), ``"data"``, ``"data.augment"``.
        cls: the dataclass of its options.
        check: optional ``check(obj, prefix)`` for rules beyond the field metadata; ``obj`` holds the
            section's options, ``prefix`` is ``key + "."`` (or ``""``) for error messages.
    """

    name: str
    key: str
    cls: type
    check: Callable[[Any, str], None] | None = None


@dataclass
class ModelOptions:
    """The base checkpoint and its processor."""

    model_name: str = opt("models/tiny", "Local Hugging Face checkpoint directory of the base model.")
    tokenizer_name: str = opt("", "Processor directory if different from model_name.")


@dataclass
class DtypeOptions:
    """The dtype the base weights are loaded in."""

    torch_dtype: str = opt(
        "auto",
        "Base weights dtype: auto, bf16, fp32 or fp16. auto: bf16 on a GPU that supports it, fp32 "
        "elsewhere (merge: the checkpoint's own dtype).",
        choices=("auto", *DTYPE_NAMES),
    )


@dataclass
class SeedOptions:
    """The one random seed."""

    seed: int = opt(
        42,
        "Random seed: LoRA initialisation, data order, dropout and augmentation in training; sampling "
        "in generate and chat (-1: not seeded); the weights of tiny-model; the data of synth-data.",
    )


@dataclass
class DeviceOptions:
    """Where a use command runs the model."""

    device: str = opt("auto", "cuda, cpu or auto (cuda when there is one).")


@dataclass
class AdapterOptions:
    """The adapters a use command loads onto the base."""

    adapter: list = opt(
        [],
        "Adapter: DIR, NAME=DIR, or none (the base model). Repeat for several (merge: exactly one DIR).",
        repeat=True,
    )
