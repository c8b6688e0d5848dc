"""The sections of a fine-tuning run: llama-cookbook's ``train_config`` (flat), LoRA, FSDP and the
cookbook's ``custom_dataset``. Names and defaults follow the cookbook."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.options.cookbook import TEXT_DATASETS
from cotune.options.fields import ConfigError, opt

# the LoRA preset of freeze_LLM_only (cotune.models.families.LLM_FROZEN_PRESET; options import no models)
LLM_FROZEN_PRESET = "vision+cross_attention"


@dataclass
class TrainingOptions:
    """A fine-tuning run. Field names follow llama-cookbook's ``train_config``."""

    output_dir: str = opt("runs/default", "Where the adapter, metrics, plots and checkpoints go.")
    dataset: str = opt("custom_dataset", "A data file (JSONL/JSON/dataset dir) or 'custom_dataset'.")
    one_gpu: bool = opt(False, "Cookbook: accepted; one process is what runs without torchrun.")
    run_validation: bool = opt(True, "Validate every epoch (and every eval_every_steps).")
    batch_size_training: int = opt(4, "Samples per step per process.", positive=True)
    val_batch_size: int = opt(0, "Validation batch size (0: same as batch_size_training).")
    batching_strategy: str = opt(
        "padding", "padding (length-grouped) or packing.", choices=("padding", "packing")
    )
    context_length: int = opt(4096, "Row length when batching_strategy is packing.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", positive=True)
    gradient_clipping: bool = opt(False, "Clip the gradient norm.")
    gradient_clipping_threshold: float = opt(1.0, "Maximum gradient norm when clipping.")
    num_epochs: int = opt(3, "Passes over the training data.", positive=True)
    max_train_step: int = opt(
        0,
        "Stop after this many micro-batches (loader batches), counted over all epochs as the cookbook "
        "does; with gradient accumulation a last, shorter group still makes a step (0: no limit).",
    )
    max_eval_step: int = opt(0, "Validate on at most this many batches (0: all).")
    eval_every_steps: int = opt(0, "Also validate every N optimizer steps (0: only at epoch end).")
    num_workers_dataloader: int = opt(0, "DataLoader worker processes.")
    lr: float = opt(1e-4, "Peak learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    scheduler: str = opt(
        "step",
        "Learning-rate schedule: step (cookbook StepLR), constant, linear, cosine.",
        choices=("step", "constant", "linear", "cosine"),
    )
    gamma: float = opt(0.85, "StepLR decay per epoch (scheduler: step).")
    warmup_steps: int = opt(0, "Linear warm-up steps (constant, linear, cosine).")
    mixed_precision: bool = opt(True, "Use bf16 autocast where the device supports it (LoRA weights fp32).")
    use_fp16: bool = opt(False, "Use fp16 autocast instead of bf16 (GPU).")
    pure_bf16: bool = opt(
        False,
        "Load the base in bf16 (LoRA weights stay fp32). A full fine-tune then updates bf16 weights in place, "
        "as the cookbook does (add --fsdp_config.optimizer anyprecision to keep small updates); without "
        "it, a full fine-tune of a bf16 base keeps fp32 master weights and computes in bf16.",
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    use_fast_kernels: bool = opt(True, "Use PyTorch SDPA attention.")
    use_peft: bool = opt(
        True,
        "Train a LoRA adapter (cotune's default). False: train the model's weights themselves (every "
        "one, or those freeze_LLM_only/freeze_layers leave) and save a Hugging Face checkpoint in "
        "output_dir/model.",
    )
    freeze_LLM_only: bool = opt(
        False,
        "Train the vision tower, the projector and the cross-attention layers; the rest of the language "
        "model stays frozen (the cookbook's meaning). With LoRA: the adapter goes on those modules only "
        f"(lora_config.target_modules {LLM_FROZEN_PRESET}).",
    )
    freeze_layers: bool = opt(
        False, "With use_peft False: freeze the first num_freeze_layers decoder layers."
    )
    num_freeze_layers: int = opt(1, "How many decoder layers freeze_layers freezes.")
    peft_method: str = opt(
        "lora", "PEFT method: lora (the cookbook's llama_adapter and prefix are not offered)."
    )
    from_peft_checkpoint: str = opt("", "Start from an existing adapter directory.")
    enable_fsdp: bool = opt(False, "Shard with FSDP2 across the processes of torchrun.")
    nproc_per_node: int = opt(0, "With enable_fsdp and not under torchrun: launch this many processes.")
    low_cpu_fsdp: bool = opt(
        False,
        "Several processes: only the first reads the checkpoint; the others build the model on the "
        "meta device and receive their shards (host memory: one copy of the base, not one per process).",
    )
    save_model: bool = opt(True, "Save the adapter at the end (and the best one when validating).")
    save_metrics: bool = opt(True, "Write metrics.jsonl and the loss plot.")
    save_every_steps: int = opt(
        0, "Write a resumable checkpoint every N optimizer steps (0: epoch end only)."
    )
    keep_last_checkpoints: int = opt(2, "Resumable checkpoints to keep (0: write none).")
    resume: str = opt("", "Resume from 'auto' (last checkpoint in output_dir) or a checkpoint path.")
    dist_checkpoint_root_folder: str = opt("", "Cookbook: with dist_checkpoint_folder, sets output_dir.")
    dist_checkpoint_folder: str = opt("", "Cookbook: with dist_checkpoint_root_folder, sets output_dir.")
    log_every_steps: int = opt(1, "Write a metrics line every N optimizer steps.")
    progress: bool = opt(True, "Show a progress bar.")
    method: str = opt(
        "sft",
        "Training objective: sft (imitate the replies) or dpo (prefer each pair's chosen reply over its "
        "rejected one; the dataset is a pairs file, see cotune data pairs).",
        choices=("sft", "dpo"),
    )
    beta: float = opt(0.1, "dpo: strength of the pull towards the reference (DPO's beta).", positive=True)
    dpo_sft_weight: float = opt(
        0.0,
        "dpo: weight of an SFT term, the chosen reply's mean token NLL, added per pair (RPO; keeps the "
        "four-stage format). 0: pure DPO.",
    )
    ref_adapter: str = opt(
        "",
        "dpo: the reference, a frozen adapter directory loaded beside the trained one (usually the SFT "
        "adapter you start from with --from_peft_checkpoint). Empty: the base with the adapter disabled.",
    )


def check_training(t: Any, prefix: str) -> None:
    """Rules the cookbook leaves silent; the cookbook's dist_checkpoint_* folders set an unset output_dir."""
    if t.use_peft and t.freeze_layers:
        raise ConfigError(
            f"option '{prefix}freeze_layers' chooses which weights a full fine-tune trains: add --use_peft "
            "False (the cookbook ignores it with --use_peft); for LoRA choose modules with "
            "--lora_config.target_modules"
        )
    if t.use_peft and t.freeze_LLM_only:  # the adapter goes on the vision side only
        lora = t.lora_config
        if lora.target_modules == "language":  # the default
            lora.target_modules = LLM_FROZEN_PRESET
        elif lora.target_modules != LLM_FROZEN_PRESET:
            raise ConfigError(
                f"option '{prefix}freeze_LLM_only' with LoRA puts the adapter on the vision tower, the "
                f"projector and the cross-attention layers (target_modules {LLM_FROZEN_PRESET}); drop "
                f"--lora_config.target_modules {lora.target_modules} or --freeze_LLM_only"
            )
    if getattr(getattr(t, "fsdp_config", None), "optimizer", "") == "anyprecision" and not t.pure_bf16:
        raise ConfigError(
            "option 'fsdp_config.optimizer' anyprecision keeps bf16 optimizer states for bf16 weights: add "
            "--pure_bf16 (the cookbook silently uses AdamW without it) or use --optimizer AdamW"
        )
    if t.peft_method != "lora":
        raise ConfigError(
            f"option '{prefix}peft_method' {t.peft_method!r}: cotune trains LoRA adapters only; use "
            "--peft_method lora (the cookbook's prefix is unsupported there too, llama_adapter fails with FSDP)"
        )
    if t.dataset in TEXT_DATASETS:
        raise ConfigError(
            f"option '{prefix}dataset' {t.dataset!r}: the cookbook's text datasets are not offered (cotune "
            "tunes vision-language models); use --dataset FILE.jsonl or --dataset custom_dataset "
            "--custom_dataset.file FILE.py"
        )
    if not t.use_peft and t.from_peft_checkpoint:
        raise ConfigError(
            f"option '{prefix}from_peft_checkpoint' starts from an adapter: it needs --use_peft True "
            "(a full fine-tune starts from --model_name)"
        )
    check_preference(t, prefix)
    if t.dist_checkpoint_root_folder and t.dist_checkpoint_folder and t.output_dir == "runs/default":
        t.output_dir = str(Path(t.dist_checkpoint_root_folder) / t.dist_checkpoint_folder)


def check_preference(t: Any, prefix: str) -> None:
    """The options of ``method: dpo`` and what it cannot be combined with."""
    if t.method != "dpo":
        if t.ref_adapter:
            raise ConfigError(f"option '{prefix}ref_adapter' is the reference of DPO: add --method dpo")
        return
    if not t.use_peft:
        raise ConfigError(
            f"option '{prefix}method' dpo trains a LoRA adapter (its reference is the base or a frozen "
            "adapter, never a second model copy): drop --use_peft False"
        )
    if getattr(t, "batching_strategy", "padding") == "packing":
        raise ConfigError(
            f"option '{prefix}method' dpo batches pairs by padding: use --batching_strategy padding"
        )
    if t.dpo_sft_weight < 0:
        raise ConfigError(f"option '{prefix}dpo_sft_weight' must be >= 0, got {t.dpo_sft_weight}")


@dataclass
class LoraConfig:
    """LoRA adapter settings, passed to ``peft.LoraConfig``."""

    r: int = opt(8, "LoRA rank.", positive=True)
    lora_alpha: int = opt(32, "LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.")
    target_modules: Any = opt(
        "language",
        "A preset of the model family ('language', 'language+cross_attention', 'all', "
        "'vision+cross_attention') "
        "or a list of module names such as [q_proj, v_proj].",
    )
    bias: str = opt("none", "Which biases to train: none, all, lora_only.")
    task_type: str = opt("CAUSAL_LM", "PEFT task type (kept for cookbook compatibility).")


@dataclass
class CustomDatasetConfig:
    """llama-cookbook's ``custom_dataset`` section: a Python file defining ``get_custom_dataset``."""

    dataset: str = opt("custom_dataset", "Kept for cookbook compatibility.")
    file: str = opt("", "path/to/file.py or path/to/file.py:function_name.")
    train_split: str = opt("train", "Split name passed to get_custom_dataset for training.")
    test_split: str = opt("test", "Split name passed to get_custom_dataset for validation.")
    data_path: str = opt("", "Passed through to the dataset file as dataset_config.data_path.")


@dataclass
class FsdpConfig:
    """Sharding settings used when ``enable_fsdp`` is on."""

    sharding_strategy: str = opt(
        "full_shard",
        "full_shard, shard_grad_op or hybrid_shard.",
        choices=("full_shard", "shard_grad_op", "hybrid_shard"),
    )
    mixed_precision: bool = opt(True, "bf16 parameters and compute, fp32 gradient reduction (GPU).")
    cpu_offload: bool = opt(False, "Offload sharded parameters to CPU.")
    fsdp_activation_checkpointing: bool = opt(True, "Checkpoint activations per wrapped layer.")
    replicate_degree: int = opt(0, "hybrid_shard: number of replicas (default: number of nodes).")
    optimizer: str = opt(
        "AdamW",
        "AdamW, or anyprecision (with pure_bf16): AdamW with bf16 momentum and variance and "
        "Kahan-compensated updates of bf16 weights (cotune.train.anyprecision).",
        choices=("AdamW", "anyprecision"),
    )
