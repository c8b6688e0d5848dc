"""llama-cookbook's command line in cotune: its section names, renamed fields, and the fields cotune
accepts without effect or refuses, each with the reason and what to use instead.

``Catalog.resolve_flag`` asks ``translate`` first (``--train_config.lr`` is ``--lr``,
``--fsdp_config.pure_bf16`` is ``--pure_bf16``) and ``cookbook_only`` for a name cotune has no option
of: ``None`` (not a cookbook field), ``[]`` (accepted, nothing to set) or a ``ConfigError`` saying why.
docs/cookbook.md maps every cookbook field to what cotune does with it.
"""

from __future__ import annotations

from typing import Any

from cotune.options.fields import ConfigError

# cookbook spelling -> cotune option path
RENAMED = {
    "fsdp_config.pure_bf16": "pure_bf16",
    "fsdp_config.use_fp16": "use_fp16",
    "fsdp_config.fsdp_cpu_offload": "fsdp_config.cpu_offload",
    "fsdp_cpu_offload": "fsdp_config.cpu_offload",
    "fsdp_config.replica_group_size": "fsdp_config.replicate_degree",
    "replica_group_size": "fsdp_config.replicate_degree",
}
COOKBOOK_SECTIONS = ("train_config", "fsdp_config", "lora_config", "wandb_config", "custom_dataset")


def _always(value: Any) -> bool:
    return True


def _false(value: Any) -> bool:
    return str(value).strip().lower() in ("false", "0", "no", "off", "none", "")


# field -> (the values accepted without effect, why; what to use instead)
IGNORED = {
    "save_optimizer": (_always, "cotune's resumable checkpoints always hold the optimizer state"),
    "checkpoint_type": (_always, "cotune writes its own resumable checkpoints (see --keep_last_checkpoints)"),
    "inference_mode": (
        _false,
        "a training run's adapter is trainable; to use one: cotune generate --adapter DIR",
    ),
    "hsdp": (_false, "use --sharding_strategy hybrid_shard (and --fsdp_config.replicate_degree N)"),
    "sharding_group_size": (
        lambda v: str(v) == "0",
        "the shard group is world size / replicas: set --fsdp_config.replicate_degree",
    ),
}

_TEXT_DATASETS = "samsum_dataset, alpaca_dataset, grammar_dataset, llamaguard_toxicchat_dataset"
REFUSED_SECTIONS = {
    "llama_adapter_config": "cotune trains LoRA adapters only (peft_method lora): use --lora_config.*",
    "prefix_config": "cotune trains LoRA adapters only (peft_method lora): use --lora_config.*",
    **{
        name: "the cookbook's text datasets are not offered (cotune tunes vision-language models): "
        "use --dataset FILE.jsonl or --custom_dataset.file FILE.py"
        for name in _TEXT_DATASETS.split(", ")
    },
}
TEXT_DATASETS = tuple(_TEXT_DATASETS.split(", "))
REFUSED_FIELDS = {  # fields of the refused sections, given without their section
    "adapter_len": "llama_adapter_config",
    "adapter_layers": "llama_adapter_config",
    "num_virtual_tokens": "prefix_config",
}


def cookbook_value(path: str, value: Any) -> Any:
    """A cookbook value in cotune's spelling (``FULL_SHARD`` -> ``full_shard``)."""
    if path == "fsdp_config.sharding_strategy" and isinstance(value, str):
        return value.lower().removeprefix("shardingstrategy.")
    if path == "fsdp_config.optimizer" and isinstance(value, str) and value.lower() == "adamw":
        return "AdamW"
    return value


def translate(key: str) -> str:
    """The cotune name of a cookbook flag name (``train_config.lr`` -> ``lr``)."""
    if key in RENAMED:
        return RENAMED[key]
    if key.startswith("train_config."):
        return RENAMED.get(key[len("train_config.") :], key[len("train_config.") :])
    return key


def cookbook_only(key: str, value: Any) -> list | None:
    """For a name cotune has no option of: [] when it is a cookbook field accepted without effect,
    None when it is no cookbook field.

    Raises:
        ConfigError: a cookbook field (or section) cotune refuses, or a value of an ignored field
            that would change the run, with why and what to use instead.
    """
    section, _, field = key.rpartition(".")
    section = section or REFUSED_FIELDS.get(field, "")
    if section in REFUSED_SECTIONS:
        raise ConfigError(f"--{key}: {REFUSED_SECTIONS[section]}")
    if section not in ("", *COOKBOOK_SECTIONS) or field not in IGNORED:
        return None
    accepts, why = IGNORED[field]
    if accepts(value):
        return []
    raise ConfigError(f"--{key} {value}: {why}")


# Options cotune has only so that a cookbook command line runs: a line that sets one was written for the
# cookbook, where a missing --use_peft means a full fine-tune.
COOKBOOK_ONLY = (
    "one_gpu", "peft_method", "use_fast_kernels", "use_wandb", "dist_checkpoint_root_folder",
    "dist_checkpoint_folder", "lora_config.task_type",
)  # fmt: skip


def cookbook_spelled(flag: str) -> bool:
    """Whether ``--flag`` (its name, without dashes or value) is the cookbook's spelling of a cotune option
    (``train_config.lr``, ``fsdp_config.pure_bf16``) or a cookbook field cotune accepts without effect."""
    key = flag.split("=", 1)[0].replace("-", "_")
    section, _, field = key.rpartition(".")
    return translate(key) != key or (section in ("", *COOKBOOK_SECTIONS) and field in IGNORED)


def cookbook_notes(given: list[tuple[str, Any]], argv: list[str] = ()) -> list[str]:
    """One line for each way a command line means something else in cotune than in the cookbook, said
    before any work; only for a line written for the cookbook (it sets a ``COOKBOOK_ONLY`` option or
    spells a flag the cookbook's way).

    Args:
        given: the options the line set (``Parsed.given``).
        argv: the line's words (the flags as typed).
    """
    paths = {p for p, _ in given}
    typed = [a[2:] for a in argv if a.startswith("--")]
    if not (paths & set(COOKBOOK_ONLY) or any(map(cookbook_spelled, typed))):
        return []
    notes = []
    if "use_peft" not in paths:
        notes.append(
            "note: without --use_peft the cookbook runs a full fine-tune; cotune trains a LoRA adapter "
            "(its default): add --use_peft False for the cookbook's meaning"
        )
    return notes
