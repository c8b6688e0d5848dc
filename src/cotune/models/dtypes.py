"""Dtype names as options spell them. A module of its own so that ``load`` and ``quant`` both import
it and neither imports the other."""

from __future__ import annotations

import torch

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}
