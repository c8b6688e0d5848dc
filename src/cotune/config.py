"""Every option of a cotune run, its default and its help, in one place.

Options are plain dataclasses. A run's configuration is built from, in order of precedence:
command-line flags > a YAML file > the defaults below. Flag names follow llama-cookbook's
``finetuning.py`` so a LLaVA-CoT command line carries over unchanged::

    cotune train --model_name /ckpt/Llama-3.2V-11B-cot --custom_dataset.file my_ds.py \\
        --lr 1e-5 --num_epochs 3 --batch_size_training 2 --run_validation True --use_peft

Nested sections are addressed with a dot (``--lora_config.r 16``) in flags and as mappings in YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem the user must fix (unknown option, bad value)."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class LoraConfig:
    """LoRA adapter settings, passed to ``peft.LoraConfig``."""

    r: int = _opt(8, "LoRA rank.")
    lora_alpha: int = _opt(32, "LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = _opt(0.05, "Dropout on the LoRA input.")
    target_modules: Any = _opt(
        "language",
        "A preset of the model family ('language', 'language+cross_attention', 'all') "
        "or a list of module names such as [q_proj, v_proj].",
    )
    bias: str = _opt("none", "Which biases to train: none, all, lora_only.")
    task_type: str = _opt("CAUSAL_LM", "PEFT task type (kept for cookbook compatibility).")


@dataclass
class CustomDatasetConfig:
    """llama-cookbook's ``custom_dataset`` section: a Python file defining ``get_custom_dataset``."""

    dataset: str = _opt("custom_dataset", "Kept for cookbook compatibility.")
    file: str = _opt("", "path/to/file.py or path/to/file.py:function_name.")
    train_split: str = _opt("train", "Split name passed to get_custom_dataset for training.")
    test_split: str = _opt("test", "Split name passed to get_custom_dataset for validation.")
    data_path: str = _opt("", "Passed through to the dataset file as dataset_config.data_path.")


@dataclass
class AugmentConfig:
    """Visual augmentation of training images (albumentations); validation images are never augmented.

    Each image's transform is drawn from (seed, epoch, sample index, image index), so a resumed run
    sees the same augmentations as an uninterrupted one.
    """

    enabled: bool = _opt(False, "Augment training images.")
    crop_scale_min: float = _opt(0.8, "Random resized crop: smallest kept area fraction (1.0: no crop).")
    crop_scale_max: float = _opt(1.0, "Random resized crop: largest kept area fraction.")
    rotate: float = _opt(5.0, "Random rotation within +-this many degrees (0: none).")
    brightness: float = _opt(0.2, "Colour jitter: brightness range (0: none).")
    contrast: float = _opt(0.2, "Colour jitter: contrast range (0: none).")
    saturation: float = _opt(0.2, "Colour jitter: saturation range (0: none).")
    hue: float = _opt(
        0.02, "Colour jitter: hue range, a fraction of the colour circle, at most 0.5 (0: none)."
    )
    blur: float = _opt(0.1, "Probability of a Gaussian blur.")
    noise: float = _opt(0.1, "Probability of Gaussian noise.")
    hflip: float = _opt(
        0.0, "Probability of a horizontal flip (off: flips break text and left/right questions)."
    )


@dataclass
class DataConfig:
    """How records are read, rendered and filtered."""

    format: str = _opt(
        "auto",
        "Record format: auto (detect and say), llava_cot_jsonl, llava_json, sharegpt, hf, cookbook.",
    )
    image_root: str = _opt("", "Folder image paths are relative to (default: the data file's folder).")
    test_file: str = _opt("", "Held-out file for validation; if empty, a seeded split of the training file.")
    test_split_ratio: float = _opt(0.1, "Fraction held out for validation when no test file is given.")
    split_seed: int = _opt(42, "Seed of the train/test split.")
    on_error: str = _opt(
        "skip", "Bad records: 'skip' (report and train on the rest) or 'raise' (stop first)."
    )
    system_prompt: str = _opt("", "Optional system prompt prepended to every conversation.")
    max_seq_len: int = _opt(2048, "Longest rendered sample in tokens.")
    overlength: str = _opt("drop", "Samples longer than max_seq_len: 'drop' or 'truncate'.")
    columns: dict = _opt({}, "Column mapping for Hugging Face datasets (e.g. {image: img, messages: chat}).")
    image_workers: int = _opt(
        4, "Threads checking every image once before training (and in 'cotune data check')."
    )
    image_check: str = _opt(
        "decode",
        "Before training: 'decode' every image, or read only each 'header' (fast on large sets; "
        "an image whose data is cut short is then skipped when training reaches it).",
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class FsdpConfig:
    """Sharding settings used when ``enable_fsdp`` is on."""

    sharding_strategy: str = _opt("full_shard", "full_shard, shard_grad_op or hybrid_shard.")
    mixed_precision: bool = _opt(True, "bf16 parameters and compute, fp32 gradient reduction (GPU).")
    cpu_offload: bool = _opt(False, "Offload sharded parameters to CPU.")
    fsdp_activation_checkpointing: bool = _opt(True, "Checkpoint activations per wrapped layer.")
    replicate_degree: int = _opt(0, "hybrid_shard: number of replicas (default: number of nodes).")


@dataclass
class TrainConfig:
    """A fine-tuning run. Field names follow llama-cookbook's ``train_config``."""

    model_name: str = _opt("models/tiny", "Local Hugging Face checkpoint directory of the base model.")
    tokenizer_name: str = _opt("", "Processor directory if different from model_name.")
    output_dir: str = _opt("runs/default", "Where the adapter, metrics, plots and checkpoints go.")
    dataset: str = _opt("custom_dataset", "A data file (JSONL/JSON/dataset dir) or 'custom_dataset'.")
    run_validation: bool = _opt(True, "Validate every epoch (and every eval_every_steps).")
    batch_size_training: int = _opt(4, "Samples per step per process.")
    val_batch_size: int = _opt(0, "Validation batch size (0: same as batch_size_training).")
    batching_strategy: str = _opt("padding", "padding (length-grouped) or packing.")
    context_length: int = _opt(4096, "Row length when batching_strategy is packing.")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    gradient_clipping: bool = _opt(False, "Clip the gradient norm.")
    gradient_clipping_threshold: float = _opt(1.0, "Maximum gradient norm when clipping.")
    num_epochs: int = _opt(3, "Passes over the training data.")
    max_train_step: int = _opt(0, "Stop after this many optimizer steps (0: no limit).")
    max_eval_step: int = _opt(0, "Validate on at most this many batches (0: all).")
    eval_every_steps: int = _opt(0, "Also validate every N optimizer steps (0: only at epoch end).")
    num_workers_dataloader: int = _opt(0, "DataLoader worker processes.")
    lr: float = _opt(1e-4, "Peak learning rate.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    scheduler: str = _opt("step", "Learning-rate schedule: step (cookbook StepLR), constant, linear, cosine.")
    gamma: float = _opt(0.85, "StepLR decay per epoch (scheduler: step).")
    warmup_steps: int = _opt(0, "Linear warm-up steps (constant, linear, cosine).")
    seed: int = _opt(42, "Random seed for model init of LoRA, data order and dropout.")
    mixed_precision: bool = _opt(True, "Use bf16 autocast where the device supports it (LoRA weights fp32).")
    use_fp16: bool = _opt(False, "Use fp16 autocast instead of bf16 (GPU).")
    pure_bf16: bool = _opt(False, "Load the frozen base in bf16 (LoRA weights stay fp32).")
    torch_dtype: str = _opt("auto", "Base weights dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp32.")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward to save memory.")
    use_fast_kernels: bool = _opt(True, "Use PyTorch SDPA attention.")
    use_peft: bool = _opt(True, "Train a PEFT adapter (cotune always does; False is an error).")
    peft_method: str = _opt("lora", "PEFT method: lora.")
    from_peft_checkpoint: str = _opt("", "Start from an existing adapter directory.")
    enable_fsdp: bool = _opt(False, "Shard with FSDP2 across the processes of torchrun.")
    nproc_per_node: int = _opt(0, "With enable_fsdp and not under torchrun: launch this many processes.")
    low_cpu_fsdp: bool = _opt(
        False,
        "Several processes: only the first reads the checkpoint; the others build the model on the "
        "meta device and receive their shards (host memory: one copy of the base, not one per process).",
    )
    save_model: bool = _opt(True, "Save the adapter at the end (and the best one when validating).")
    save_metrics: bool = _opt(True, "Write metrics.jsonl and the loss plot.")
    save_every_steps: int = _opt(
        0, "Write a resumable checkpoint every N optimizer steps (0: epoch end only)."
    )
    keep_last_checkpoints: int = _opt(2, "Resumable checkpoints to keep (0: write none).")
    resume: str = _opt("", "Resume from 'auto' (last checkpoint in output_dir) or a checkpoint path.")
    dist_checkpoint_root_folder: str = _opt("", "Cookbook: with dist_checkpoint_folder, sets output_dir.")
    dist_checkpoint_folder: str = _opt("", "Cookbook: with dist_checkpoint_root_folder, sets output_dir.")
    log_every_steps: int = _opt(1, "Write a metrics line every N optimizer steps.")
    progress: bool = _opt(True, "Show a progress bar.")
    lora_config: LoraConfig = field(default_factory=LoraConfig)
    custom_dataset: CustomDatasetConfig = field(default_factory=CustomDatasetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fsdp_config: FsdpConfig = field(default_factory=FsdpConfig)


# Flags that name an option in a section, for users of the flat cookbook/LLaVA-CoT spelling.
ALIASES = {
    "test_file": "data.test_file",
    "image_root": "data.image_root",
    "max_seq_len": "data.max_seq_len",
    "on_error": "data.on_error",
    "system_prompt": "data.system_prompt",
    "r": "lora_config.r",
    "lora_alpha": "lora_config.lora_alpha",
    "lora_dropout": "lora_config.lora_dropout",
    "target_modules": "lora_config.target_modules",
    "sharding_strategy": "fsdp_config.sharding_strategy",
}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for name in _fields(cls):
        if dataclasses.is_dataclass(hints[name]):
            keys += _all_keys(hints[name], f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown(key: str) -> ConfigError:
    keys = _all_keys() + list(ALIASES)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else ""
    return ConfigError(f"unknown option '{key}'.{hint} ('cotune train --help' lists every option.)")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Turns a flag string (or YAML scalar) into the field's type."""
    if typ is Any:
        if isinstance(value, str) and value.startswith("["):
            value = yaml.safe_load(value)
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("true", "1", "yes", "on"):
            return True
        if s in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"option '{key}' expects True or False, got '{value}'")
    if typ is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"option '{key}' expects a mapping, got '{value}'")
        return value
    try:
        if typ is int and isinstance(value, str | float):
            number = float(value)  # accepts "1e3"; rejects 2.5 below
            if number != int(number):
                raise ValueError
            return int(number)
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option '{key}' expects {typ.__name__}, got '{value}'") from None


def set_option(cfg: Any, key: str, value: Any) -> None:
    """Sets ``key`` (dotted for sections, cookbook alias allowed) on ``cfg`` with type coercion.

    Raises:
        ConfigError: unknown key (with close matches) or a value of the wrong type.
    """
    key = key.replace("-", "_") if key.replace("-", "_") in _all_keys() + list(ALIASES) else key
    key = ALIASES.get(key, key)
    obj, parts = cfg, key.split(".")
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or part not in _fields(type(obj)):
            raise _unknown(key)
        obj = getattr(obj, part)
    name = parts[-1]
    if not dataclasses.is_dataclass(obj) or name not in _fields(type(obj)):
        raise _unknown(key)
    typ = typing.get_type_hints(type(obj))[name]
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"option '{key}' is a section; set its fields as {key}.FIELD")
        for k, v in value.items():
            set_option(cfg, f"{key}.{k}", v)
        return
    setattr(obj, name, _coerce(value, typ, key))


def parse_flags(argv: list[str]) -> tuple[list[str], list[tuple[str, Any]]]:
    """Splits ``argv`` into positional arguments and (key, value) pairs.

    Accepts ``--key value``, ``--key=value`` and bare ``--flag`` (meaning True), as llama-cookbook's
    fire-based command line does.
    """
    positional, pairs, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, value = body, argv[i + 1]
                i += 1
            else:
                key, value = body, True
            pairs.append((key, value))
        else:
            positional.append(arg)
        i += 1
    return positional, pairs


def load_config(path: str | Path | None = None, overrides: list[tuple[str, Any]] = ()) -> TrainConfig:
    """Builds a TrainConfig from an optional YAML file and flag overrides, then validates it.

    Raises:
        ConfigError: with the file name for YAML problems, the option name for flag problems.
    """
    cfg = TrainConfig()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of options at the top level")
        for key, value in data.items():
            try:
                set_option(cfg, key, value)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    for key, value in overrides:
        set_option(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks values that are wrong whatever the data; raises ConfigError naming the option."""
    choices = {
        "batching_strategy": (cfg.batching_strategy, ("padding", "packing")),
        "scheduler": (cfg.scheduler, ("step", "constant", "linear", "cosine")),
        "peft_method": (cfg.peft_method, ("lora",)),
        "data.on_error": (cfg.data.on_error, ("skip", "raise")),
        "data.overlength": (cfg.data.overlength, ("drop", "truncate")),
        "data.image_check": (cfg.data.image_check, ("decode", "header")),
        "data.format": (
            cfg.data.format,
            ("auto", "llava_cot_jsonl", "llava_json", "sharegpt", "hf", "cookbook"),
        ),
        "torch_dtype": (cfg.torch_dtype, ("auto", "bf16", "bfloat16", "fp32", "float32", "fp16", "float16")),
        "fsdp_config.sharding_strategy": (
            cfg.fsdp_config.sharding_strategy,
            ("full_shard", "shard_grad_op", "hybrid_shard"),
        ),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"option '{key}' must be one of {', '.join(allowed)}; got '{value}'")
    positive = {
        "batch_size_training": cfg.batch_size_training,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "num_epochs": cfg.num_epochs,
        "lora_config.r": cfg.lora_config.r,
        "data.max_seq_len": cfg.data.max_seq_len,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"option '{key}' must be positive; got {value}")
    aug = cfg.data.augment
    if not 0.0 < aug.crop_scale_min <= aug.crop_scale_max <= 1.0:
        raise ConfigError(
            "options 'data.augment.crop_scale_min' and 'data.augment.crop_scale_max' must satisfy "
            f"0 < min <= max <= 1; got {aug.crop_scale_min} and {aug.crop_scale_max}"
        )
    for name in ("blur", "noise", "hflip"):
        if not 0.0 <= getattr(aug, name) <= 1.0:
            raise ConfigError(
                f"option 'data.augment.{name}' is a probability in [0, 1]; got {getattr(aug, name)}"
            )
    if not 0.0 <= aug.hue <= 0.5:
        raise ConfigError(f"option 'data.augment.hue' must be in [0, 0.5]; got {aug.hue}")
    if not 0.0 < cfg.data.test_split_ratio < 1.0:
        raise ConfigError(
            f"option 'data.test_split_ratio' must be in (0, 1); got {cfg.data.test_split_ratio}"
        )
    if not cfg.use_peft:
        raise ConfigError(
            "cotune trains LoRA adapters only: use_peft must be True (full fine-tuning is not offered)"
        )
    if cfg.dist_checkpoint_root_folder and cfg.dist_checkpoint_folder and cfg.output_dir == "runs/default":
        cfg.output_dir = str(Path(cfg.dist_checkpoint_root_folder) / cfg.dist_checkpoint_folder)


def to_dict(cfg: Any) -> dict:
    """The resolved configuration as plain data (written to output_dir/config.yaml)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def options_help() -> str:
    """One line per option: name, default, help; for ``cotune train --help``."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        inst = cls()
        for name, f in _fields(cls).items():
            if dataclasses.is_dataclass(hints[name]):
                walk(hints[name], f"{prefix}{name}.")
            else:
                lines.append(
                    f"  --{prefix}{name} (default: {getattr(inst, name)!r})\n      {f.metadata.get('help', '')}"
                )

    walk(TrainConfig, "")
    return "\n".join(lines)
