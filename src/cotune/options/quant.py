"""Quantized bases (QLoRA): llama-cookbook's ``quantization`` flag and its ``quantization_config``.

The names are the cookbook's; the defaults are not all its own. The cookbook's ``quant_type``
default is ``fp4`` and its ``use_double_quant`` is off, which is not QLoRA (Dettmers et al. train on
NF4 with double quantization); cotune defaults to ``nf4`` with double quantization, and a user who
wants the cookbook's behaviour passes ``--quant_type fp4 --use_double_quant False``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cotune.options.fields import DTYPE_NAMES, opt


@dataclass
class QuantizationOptions:
    """Whether the frozen base is quantized (a top-level option, as in the cookbook)."""

    quantization: str = opt(
        "",
        "Quantize the frozen base with bitsandbytes: 4bit (QLoRA) or 8bit; '' keeps it unquantized. The "
        "model family keeps its vision tower, projector, embeddings and lm_head unquantized.",
        choices=("", "4bit", "8bit"),
    )


@dataclass
class QuantizationConfig:
    """4-bit settings (llama-cookbook's ``quantization_config``), used when ``quantization`` is 4bit."""

    quant_type: str = opt(
        "nf4", "4-bit data type: nf4 (QLoRA) or fp4 (the cookbook's default).", choices=("nf4", "fp4")
    )
    use_double_quant: bool = opt(
        True, "Quantize the quantization constants too (about 0.4 bit per weight less)."
    )
    compute_dtype: str = opt(
        "auto",
        "dtype the 4-bit weights are dequantized to for each matmul. auto: the base dtype (bf16 on a GPU "
        "that supports it; fp32 on a CPU, as the rest of a CPU step, which keeps gradients comparable with "
        "an unquantized run; on a CPU with avx512-bf16, bf16 ran a 2048x8192 4-bit layer's forward and "
        "backward 3x faster, at bf16's precision).",
        choices=("auto", *DTYPE_NAMES),
    )
    quant_storage: str = opt(
        "uint8",
        "dtype the packed 4-bit weights are stored in. With --enable_fsdp cotune sets it to the dtype FSDP "
        "computes in (bf16 under a GPU's mixed precision, fp32 on a CPU) so that no cast touches the bytes.",
        choices=("uint8", *DTYPE_NAMES),
    )
