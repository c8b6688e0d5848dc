"""Loading a base model and its processor from a local Hugging Face directory, and adding LoRA.

The same functions load the tiny test models and a real 11B checkpoint: there is one code path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cotune.models.dtypes import DTYPES
from cotune.models.families import ModelFamily, family_for
from cotune.options.data import DEFAULT_DATE_STRING


def _offline() -> None:
    # cotune never downloads: a model is always a local directory.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def check_model_dir(path: str | Path) -> Path:
    """The local checkpoint directory ``path`` names: a directory with a config.json, or a Hub name
    (``org/model``) already downloaded to the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``).

    Raises:
        FileNotFoundError: neither, with what to do (cotune never downloads).
    """
    if not (Path(path) / "config.json").is_file():
        cached = _hub_snapshot(str(path))
        if cached is not None:
            return cached
        hint = " (cotune loads local checkpoints only; download it first, or run 'cotune tiny-model DIR')"
        raise FileNotFoundError(f"model directory '{path}' has no config.json{hint}")
    return Path(path)


def _hub_snapshot(name: str) -> Path | None:
    """The cached snapshot of Hub repository ``name``, read from the cache the environment names now."""
    if name.count("/") != 1 or Path(name).exists():
        return None
    from huggingface_hub import snapshot_download

    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")
    try:
        snapshot = Path(snapshot_download(name, cache_dir=cache, local_files_only=True))
    except Exception:  # not in the cache (huggingface_hub raises several kinds)
        return None
    return snapshot if (snapshot / "config.json").is_file() else None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU that supports it and fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def load_processor(path: str | Path, date_string: str = DEFAULT_DATE_STRING) -> Any:
    """The checkpoint's processor (tokenizer + image processor + chat template), ready for every verb.

    What a checkpoint's files may leave open is settled here, once, for every verb:
      * the pad token (``settle_pad_token``): many checkpoints name none that transformers reads;
      * the ids that end a reply: every id of ``generation_config.json``'s ``eos_token_id`` (a list on
        Llama 3.2 Vision: ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``), kept on the tokenizer
        as ``generation_eos_ids`` for ``ModelFamily.end_of_turn_ids``;
      * the date the chat template writes into image-less conversations (``processor.date_string``,
        see ``cotune.data.chat``), fixed so that a record renders to the same tokens on any day.

    Args:
        path: local checkpoint (or tokenizer) directory.
        date_string: the template's ``date_string`` (``data.date_string``).
    """
    _offline()
    from transformers import AutoProcessor

    path = check_model_dir(path)
    processor = AutoProcessor.from_pretrained(str(path))
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    # transformers 5 ignores this for BPE tokenizers, warning on every decode when a file sets it
    tokenizer.clean_up_tokenization_spaces = False
    generation = _generation_settings(path)
    settle_pad_token(tokenizer, generation.get("pad_token_id"), str(path))
    tokenizer.generation_eos_ids = _ids(generation.get("eos_token_id"), len(tokenizer))
    processor.date_string = date_string
    return processor


def _generation_settings(path: Path) -> dict:
    """The checkpoint's ``generation_config.json`` (empty when it has none or it does not parse)."""
    try:
        settings = json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _ids(value: Any, vocab_size: int) -> tuple[int, ...]:
    """An id or a list of ids from a config file, the ones inside the vocabulary."""
    values = value if isinstance(value, list) else [value]
    return tuple(v for v in values if isinstance(v, int) and 0 <= v < vocab_size)


PAD_FALLBACK = "<|finetune_right_pad_id|>"  # Llama 3.1+'s reserved padding token
_PAD_NOTES: set[str] = set()


def settle_pad_token(tokenizer: Any, config_pad_id: Any = None, where: str = "") -> str:
    """Gives ``tokenizer`` a pad token when its files name none; returns where the pad came from.

    In order: the tokenizer's own; the checkpoint's ``pad_token_id`` (``generation_config.json``);
    ``<|finetune_right_pad_id|>`` when the vocabulary has it; else the EOS token, said once (padding is
    masked out of attention and labels, so any token serves; the EOS is what llama-cookbook uses).

    Returns:
        'tokenizer', 'generation_config', 'vocabulary' or 'eos'.

    Raises:
        ValueError: the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token_id is not None:
        return "tokenizer"
    ids = _ids(config_pad_id, len(tokenizer))
    if ids:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(ids[0])
        return "generation_config"
    if PAD_FALLBACK in tokenizer.get_vocab():
        tokenizer.pad_token = PAD_FALLBACK
        return "vocabulary"
    if tokenizer.eos_token is None:
        raise ValueError(
            f"the tokenizer in '{where}' has neither a pad token nor an EOS token: set pad_token"
        )
    tokenizer.pad_token = tokenizer.eos_token
    if where not in _PAD_NOTES and os.environ.get("RANK", "0") == "0":
        _PAD_NOTES.add(where)
        print(
            f"note: the tokenizer in '{where}' has no pad token; padding with its EOS {tokenizer.eos_token}"
        )
    return "eos"


def load_base_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    sdpa: bool = True,
    device: torch.device | str = "cpu",
    on_meta: bool = False,
    quantization: str = "",
    quantization_config: Any = None,
) -> tuple[torch.nn.Module, ModelFamily]:
    """Loads the base vision-language model through transformers' own classes.

    Args:
        path: local checkpoint directory.
        dtype: dtype of the (frozen) base weights.
        sdpa: use PyTorch's scaled-dot-product attention (cookbook's ``use_fast_kernels``).
        device: where to put the weights.
        on_meta: build the model from the checkpoint's config on the meta device, reading no
            weights (``low_cpu_fsdp``: the first process loads them and sends each its shards).
        quantization: '4bit' or '8bit' quantizes the language model's linears with bitsandbytes
            (``cotune.models.quant``); '' loads the base as it is.
        quantization_config: the ``QuantizationConfig`` options of a 4-bit base.

    Returns:
        The model (eval mode, requires_grad off everywhere) and its family.
    """
    _offline()
    from transformers import AutoConfig, AutoModelForImageTextToText

    from cotune.models.quant import bitsandbytes_for

    path = check_model_dir(path)
    bitsandbytes_for(quantization)
    config = AutoConfig.from_pretrained(str(path))
    family = family_for(config)
    attention = "sdpa" if sdpa else "eager"
    if on_meta:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(
                config, dtype=dtype, attn_implementation=attention
            )
    elif quantization:
        from cotune.models.quant import bnb_config, keep_training_kernels

        model = AutoModelForImageTextToText.from_pretrained(
            str(path),
            dtype=dtype,
            attn_implementation=attention,
            quantization_config=bnb_config(family, quantization, quantization_config, dtype),
            device_map={"": str(device)},
        )
        keep_training_kernels(model)
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            str(path), dtype=dtype, attn_implementation=attention
        )
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model, family


def add_lora(
    model: torch.nn.Module,
    family: ModelFamily,
    lora: Any,
    adapter_name: str = "default",
    from_checkpoint: str = "",
) -> torch.nn.Module:
    """Wraps ``model`` in a PEFT model with fresh (or loaded) LoRA weights kept in fp32.

    Args:
        model: a base model from ``load_base_model``.
        family: its family (resolves target presets).
        lora: a ``cotune.config.LoraConfig``.
        adapter_name: PEFT adapter name.
        from_checkpoint: an existing adapter directory to continue training from.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if from_checkpoint:
        peft_model = PeftModel.from_pretrained(
            model, from_checkpoint, adapter_name=adapter_name, is_trainable=True
        )
    else:
        targets = family.resolve_lora_targets(model.config, lora.target_modules)
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=targets,
            bias=lora.bias,
            task_type=None,
        )
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
