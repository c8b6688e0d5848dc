"""Every llama-cookbook fine-tuning option (the field tables of its train_config, fsdp_config, PEFT,
W&B and dataset configs) is accepted by ``cotune train`` with its meaning, or refused with a message
that says why and what to use instead; and the cookbook's flag forms parse as they do there.

``COOKBOOK_FIELDS`` is the whole field list; docs/cookbook.md must name each of them, so a field
can drop out of neither the parser nor the table silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from cotune.config import ConfigError, parse_args
from cotune.options.parse import section_object

NOOP = "accepted without effect"


def refused(pattern: str) -> tuple[str, str]:
    return ("refused", pattern)


# section -> field -> (a value, where it lands: a cotune option path, a tuple of paths, NOOP,
# refused(message pattern))
COOKBOOK_FIELDS = {
    "train_config": {
        "model_name": ("/m", "model_name"),
        "tokenizer_name": ("/t", "tokenizer_name"),
        "enable_fsdp": ("True", "enable_fsdp"),
        "low_cpu_fsdp": ("True", "low_cpu_fsdp"),
        "run_validation": ("False", "run_validation"),
        "batch_size_training": ("2", "batch_size_training"),
        "batching_strategy": ("padding", "batching_strategy"),
        "context_length": ("1024", "context_length"),
        "gradient_accumulation_steps": ("2", "gradient_accumulation_steps"),
        "gradient_clipping": ("True", "gradient_clipping"),
        "gradient_clipping_threshold": ("0.5", "gradient_clipping_threshold"),
        "num_epochs": ("2", "num_epochs"),
        "max_train_step": ("5", "max_train_step"),
        "max_eval_step": ("3", "max_eval_step"),
        "num_workers_dataloader": ("1", "num_workers_dataloader"),
        "lr": ("1e-5", "lr"),
        "weight_decay": ("0.1", "weight_decay"),
        "gamma": ("0.5", "gamma"),
        "seed": ("7", "seed"),
        "use_fp16": ("True", "use_fp16"),
        "mixed_precision": ("False", "mixed_precision"),
        "val_batch_size": ("2", "val_batch_size"),
        "dataset": ("custom_dataset", "dataset"),
        "peft_method": ("lora", "peft_method"),
        "use_peft": ("True", "use_peft"),
        "from_peft_checkpoint": ("/a", "from_peft_checkpoint"),
        "output_dir": ("/o", "output_dir"),
        "freeze_layers": ("True", refused("--use_peft False")),
        "num_freeze_layers": ("2", "num_freeze_layers"),
        "freeze_LLM_only": ("True", "freeze_LLM_only"),
        "quantization": ("4bit", "quantization"),
        "one_gpu": ("True", "one_gpu"),
        "save_model": ("False", "save_model"),
        "dist_checkpoint_root_folder": ("r", "dist_checkpoint_root_folder"),
        "dist_checkpoint_folder": ("f", "dist_checkpoint_folder"),
        "save_optimizer": ("True", NOOP),
        "use_fast_kernels": ("True", "use_fast_kernels"),
        "use_wandb": ("True", "use_wandb"),
        "save_metrics": ("True", "save_metrics"),
        "flop_counter": ("True", "flop_counter"),
        "flop_counter_start": ("4", "flop_counter_start"),
        "use_profiler": ("True", "use_profiler"),
        "profiler_dir": ("p", "profiler_dir"),
    },
    "fsdp_config": {
        "mixed_precision": ("False", "fsdp_config.mixed_precision"),
        "use_fp16": ("True", "use_fp16"),
        "sharding_strategy": ("HYBRID_SHARD", "fsdp_config.sharding_strategy"),
        "hsdp": ("True", refused("--sharding_strategy hybrid_shard")),
        "sharding_group_size": ("2", refused("replicate_degree")),
        "replica_group_size": ("2", "fsdp_config.replicate_degree"),
        "checkpoint_type": ("StateDictType.FULL_STATE_DICT", NOOP),
        "fsdp_activation_checkpointing": ("False", "fsdp_config.fsdp_activation_checkpointing"),
        "fsdp_cpu_offload": ("True", "fsdp_config.cpu_offload"),
        "pure_bf16": ("True", "pure_bf16"),
        "optimizer": ("anyprecision", refused("add --pure_bf16")),  # accepted with it: below
    },
    "lora_config": {
        "r": ("16", "lora_config.r"),
        "lora_alpha": ("16", "lora_config.lora_alpha"),
        "target_modules": ("q_proj,v_proj", "lora_config.target_modules"),
        "bias": ("all", "lora_config.bias"),
        "task_type": ("CAUSAL_LM", "lora_config.task_type"),
        "lora_dropout": ("0.1", "lora_config.lora_dropout"),
        "inference_mode": ("True", refused("trainable")),
    },
    "llama_adapter_config": {
        "adapter_len": ("10", refused("LoRA adapters only")),
        "adapter_layers": ("30", refused("LoRA adapters only")),
        "task_type": ("CAUSAL_LM", refused("LoRA adapters only")),
    },
    "prefix_config": {
        "num_virtual_tokens": ("30", refused("LoRA adapters only")),
        "task_type": ("CAUSAL_LM", refused("LoRA adapters only")),
    },
    "quantization_config": {
        "quant_type": ("fp4", "quantization_config.quant_type"),
        "compute_dtype": ("bf16", "quantization_config.compute_dtype"),
        "use_double_quant": ("False", "quantization_config.use_double_quant"),
        "quant_storage": ("bf16", "quantization_config.quant_storage"),
    },
    "wandb_config": {
        "project": ("cot", "wandb_config.project"),
        "entity": ("me", "wandb_config.entity"),
        "job_type": ("train", "wandb_config.job_type"),
        "tags": ("a", "wandb_config.tags"),
        "group": ("g", "wandb_config.group"),
        "notes": ("n", "wandb_config.notes"),
        "mode": ("offline", "wandb_config.mode"),
    },
    "custom_dataset": {
        "dataset": ("custom_dataset", "custom_dataset.dataset"),
        "file": ("ds.py", "custom_dataset.file"),
        "train_split": ("tr", "custom_dataset.train_split"),
        "test_split": ("te", "custom_dataset.test_split"),
        "data_path": ("d.json", "custom_dataset.data_path"),
    },
    **{
        name: {f: ("x", refused("text datasets are not offered")) for f in fields}
        for name, fields in {
            "samsum_dataset": ("dataset", "train_split", "test_split"),
            "grammar_dataset": ("dataset", "train_split", "test_split"),
            "alpaca_dataset": ("dataset", "train_split", "test_split", "data_path"),
            "llamaguard_toxicchat_dataset": ("dataset", "train_split", "test_split"),
        }.items()
    },
}
# fields of refused sections whose undotted name reaches a cotune section that has the field too
SHARED_NAMES = {
    "llama_adapter_config": ("task_type",),
    "prefix_config": ("task_type",),
    **{
        name: ("dataset", "train_split", "test_split", "data_path")
        for name in ("samsum_dataset", "grammar_dataset", "alpaca_dataset", "llamaguard_toxicchat_dataset")
    },
}
CASES = [(s, f, v, where) for s, fields in COOKBOOK_FIELDS.items() for f, (v, where) in fields.items()]


def value_at(cfg, path: str):
    section, _, name = path.rpartition(".")
    return getattr(section_object(cfg, section), name)


@pytest.mark.parametrize("section,field,value,where", CASES, ids=[f"{c[0]}.{c[1]}" for c in CASES])
def test_every_cookbook_field_is_accepted_with_its_meaning_or_refused_with_why(section, field, value, where):
    for flag in (f"--{section}.{field}", f"--{field}"):
        if isinstance(where, tuple):
            if flag == f"--{field}" and section in SHARED_NAMES and field in SHARED_NAMES[section]:
                parse_args("train", [flag, value])  # undotted, it reaches the section cotune has
                continue
            with pytest.raises(ConfigError, match=where[1]):
                parse_args("train", [flag, value])
            continue
        try:
            parsed = parse_args("train", [flag, value])
        except ConfigError as e:  # an undotted name may be another section's field: never "unknown"
            assert flag == f"--{field}" and "unknown option" not in str(e), (flag, e)
            continue
        if where == NOOP:
            assert parsed.given == [], (flag, parsed.given)
        elif flag == f"--{section}.{field}" or section == "train_config":
            got = value_at(parsed.options, where)
            assert (
                str(got).lower().replace("'", "") in (value.lower(), str([value]).lower().replace("'", ""))
                or (got == pytest.approx(float(value)) if value[0].isdigit() else False)
                or (where.endswith("sharding_strategy") and got == "hybrid_shard")
            ), (flag, got)


def test_refusals_accept_the_value_that_changes_nothing():
    for flag in (
        "hsdp",
        "inference_mode",
    ):
        assert parse_args("train", [f"--{flag}", "False"]).given == []
    assert parse_args("train", ["--fsdp_config.optimizer", "adamw"]).options.fsdp_config.optimizer == "AdamW"
    cfg = parse_args("train", ["--optimizer", "anyprecision", "--fsdp_config.pure_bf16"]).options
    assert cfg.fsdp_config.optimizer == "anyprecision" and cfg.pure_bf16


def test_cookbook_flag_forms():
    parsed = parse_args(
        "train", ["--use-wandb", "--project", "p", "--norun_validation", "--mixed_precision", "False"]
    )
    cfg = parsed.options
    assert cfg.use_wandb and cfg.report_to == ["wandb"] and cfg.wandb_config.project == "p"
    assert cfg.run_validation is False
    assert (
        cfg.mixed_precision is False and cfg.fsdp_config.mixed_precision is False
    )  # undotted: both sections
    cfg = parse_args("train", ["--fsdp_config.mixed_precision", "False", "--train_config.lr=2e-5"]).options
    assert cfg.mixed_precision is True and cfg.fsdp_config.mixed_precision is False and cfg.lr == 2e-5
    assert parse_args(
        "train", ["--fsdp_config.pure_bf16", "--use_peft", "--peft_method", "lora"]
    ).options.pure_bf16
    with pytest.raises(ConfigError, match="text datasets"):
        parse_args("train", ["--dataset", "samsum_dataset"])
    with pytest.raises(ConfigError, match="LoRA adapters only"):
        parse_args("train", ["--peft_method", "prefix"])


def test_the_cookbook_table_names_every_field():
    table = (Path(__file__).parents[1] / "docs/cookbook.md").read_text()
    missing = [f"{s}.{f}" for s, f, _, _ in CASES if f"`{s}.{f}`" not in table]
    assert not missing, missing


def test_a_line_without_use_peft_says_what_cotune_does_instead():
    from cotune.options.cookbook import cookbook_notes

    def notes(*argv):
        return cookbook_notes(parse_args("train", list(argv)).given, list(argv))

    cookbook_line = (
        "--enable_fsdp",
        "--lr",
        "1e-5",
        "--dist_checkpoint_root_folder",
        "out",
        "--dist_checkpoint_folder",
        "ft",
    )
    (note,) = notes(*cookbook_line)
    assert "full fine-tune" in note and "LoRA" in note and "--use_peft" in note
    assert len(notes("--train_config.lr", "1e-5")) == 1 and len(notes("--save_optimizer")) == 1
    assert notes("--use_peft", "--peft_method", "lora") == []
    # a cotune line (the README's own commands) sets no cookbook-only option: nothing to say
    assert (
        notes(
            "--enable_fsdp",
            "--lr",
            "1e-5",
            "--dataset",
            "train.jsonl",
            "--fsdp_config.sharding_strategy",
            "hybrid_shard",
        )
        == []
    )
