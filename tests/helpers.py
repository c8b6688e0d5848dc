"""Helpers several test modules share (fixtures shared the same way live in conftest.py)."""

from __future__ import annotations

import torch

from cotune.config import LoraConfig
from cotune.models.load import add_lora, load_base_model


def random_lora(model_dir, seed: int = 0, std: float = 0.05, targets: str = "language"):
    """The model at ``model_dir`` with a LoRA (r=4, no dropout) whose B matrices are drawn from
    N(0, ``std``): a fresh LoRA is the identity, this one changes the model and passes gradients
    through both factors."""
    base, family = load_base_model(model_dir)
    torch.manual_seed(seed)
    model = add_lora(base, family, LoraConfig(r=4, lora_dropout=0.0, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)
    return model


def make_adapter(model_dir, out_dir, seed: int, targets: str = "language", std: float = 0.3) -> str:
    """A ``random_lora`` adapter saved in PEFT format under ``out_dir``; returns the path."""
    random_lora(model_dir, seed=seed, std=std, targets=targets).save_pretrained(str(out_dir))
    return str(out_dir)
