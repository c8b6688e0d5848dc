"""4-bit and 8-bit bases with bitsandbytes (QLoRA): the quantization config, and what training needs.

The model family says which modules stay unquantized (``ModelFamily.unquantized_modules``); the
language model's linear layers are quantized, LoRA trains on top of them in fp32.

k-bit training preparation, as cotune does it: the base is frozen and its non-quantized parts stay
in the base dtype (peft's ``prepare_model_for_kbit_training`` would upcast the 11B's 0.9 B vision
parameters to fp32, +3.6 GB); transformers' RMSNorm already computes in fp32. Input gradients are
not needed: cotune's activation checkpointing is the non-reentrant (composable) form.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from cotune.models.dtypes import DTYPES
from cotune.models.families import ModelFamily


def bnb_config(family: ModelFamily, quantization: str, options: Any, base_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` ('4bit' or '8bit').

    Args:
        family: keeps its ``unquantized_modules`` in ``base_dtype``.
        quantization: '4bit' or '8bit'.
        options: a ``QuantizationConfig`` (quant_type, use_double_quant, compute_dtype, quant_storage);
            None: its defaults (nf4, double quantization).
        base_dtype: the dtype of the unquantized parts; also the compute dtype when it is 'auto'.

    Raises:
        ImportError: bitsandbytes is not installed (``pip install 'cotune[qlora]'``).
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"--quantization {quantization} needs bitsandbytes: pip install 'cotune[qlora]'"
        ) from e
    from transformers import BitsAndBytesConfig

    from cotune.options.quant import QuantizationConfig

    options = options if options is not None else QuantizationConfig()
    skip = list(family.unquantized_modules)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    compute = base_dtype if options.compute_dtype == "auto" else DTYPES[options.compute_dtype]
    storage = torch.uint8 if options.quant_storage == "uint8" else DTYPES[options.quant_storage]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options.quant_type,
        bnb_4bit_use_double_quant=options.use_double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=skip,
    )


def sharded_quantization(
    quantization: str, options: Any, base_dtype: torch.dtype, fsdp_param_dtype: torch.dtype | None = None
) -> Any:
    """The 4-bit options for an FSDP2-sharded base: the packed weights stored in the compute dtype.

    ``fully_shard`` shards a ``Linear4bit``'s packed weight like any other parameter (flat, along its
    first dimension) and all-gathers it back before the layer runs; bitsandbytes keeps the quantization
    state on the module. Storing the packed bytes in the compute dtype (as LLaMA-Factory does) gives
    every parameter of a unit a floating dtype that the mixed-precision policy casts to itself, a no-op.
    An fp32 storage under a bf16 policy would be cast, which corrupts the packed bytes (measured).

    Args:
        quantization: '4bit' (sharded) or '8bit' (refused).
        options: the user's ``QuantizationConfig``; its ``quant_storage`` is replaced.
        base_dtype: the compute dtype when ``compute_dtype`` is 'auto'.
        fsdp_param_dtype: the mixed-precision policy's parameter dtype (bf16 on a GPU), if any: the
            storage then follows it, whatever the compute dtype.

    Raises:
        ConfigError: for '8bit': an ``Int8Params`` weight keeps its scales (``SCB``) on the tensor,
            which sharding drops, and its int8 matmul needs the whole row.
    """
    import dataclasses

    from cotune.config import ConfigError

    if quantization != "4bit":
        raise ConfigError(
            f"--quantization {quantization} with --enable_fsdp: an 8-bit base cannot be sharded (bitsandbytes "
            "keeps its int8 scales on the weight tensor, which FSDP's shards drop); use --quantization 4bit, "
            "or 8bit in one process"
        )
    compute = base_dtype if options.compute_dtype == "auto" else DTYPES[options.compute_dtype]
    storage = fsdp_param_dtype or compute
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    return dataclasses.replace(options, quant_storage=names[storage])


def keep_training_kernels(model: torch.nn.Module) -> int:
    """Stops bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns how many layers.

    On a CPU with avx512-bf16, a forward in eval mode (validation) repacks each ``Linear4bit``'s weight
    for ``gemv_4bit``, which has no backward: later training steps then get LoRA gradients 10-30x too
    small (and an in-place error on layers with a bias). The training path needs no repacking.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def quantized_layer_counts(model: torch.nn.Module) -> dict[str, int]:
    """Linear layers by class name (``Linear``, ``Linear4bit``, ``Linear8bitLt``): what the loaded model holds."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            name = type(module).__name__
            counts[name] = counts.get(name, 0) + 1
    return counts


def bitsandbytes_for(quantization: str) -> None:
    """Before a base is loaded: bitsandbytes in the process for a quantized one, kept out otherwise."""
    if quantization:
        let_bitsandbytes_in()
    else:
        keep_bitsandbytes_out()


def keep_bitsandbytes_out() -> None:
    """For a process whose base is not quantized: peft loads as if bitsandbytes were not installed.

    peft imports bitsandbytes as it is imported itself (and again for every LoRA layer it makes, when
    installed), and bitsandbytes prints kernel-loading messages on import, for every run. Importing
    peft while ``bitsandbytes`` is marked absent in ``sys.modules`` makes peft remember it as absent
    (its availability checks are cached); the mark is removed at once, so anything else may still
    import bitsandbytes. ``let_bitsandbytes_in`` undoes it for a quantized base loaded later.
    """
    if "bitsandbytes" in sys.modules or "peft" in sys.modules:
        return  # already imported, or peft's checks already made: nothing to keep out
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # import and find_spec: absent
    try:
        from peft import import_utils

        import_utils.is_bnb_available()
        import_utils.is_bnb_4bit_available()
    finally:
        if sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]


def let_bitsandbytes_in() -> None:
    """Before a quantized base: peft sees bitsandbytes again (after ``keep_bitsandbytes_out``)."""
    try:
        import bitsandbytes
    except ImportError:
        return  # bnb_config says how to install it
    import_utils = sys.modules.get("peft.import_utils")
    if import_utils is not None:
        import_utils.is_bnb_available.cache_clear()
        import_utils.is_bnb_4bit_available.cache_clear()
    helpers = sys.modules.get("peft.helpers")
    if helpers is not None and getattr(helpers, "bnb", None) is None:
        helpers.bnb = bitsandbytes
