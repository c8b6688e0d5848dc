"""Cross-entropy without the full logits tensor.

With Llama 3's 128,256-token vocabulary the fp32 logits of a batch (batch x seq x vocab) are the
largest tensor of a LoRA step. Here the logits are computed only at positions that have a label,
a chunk at a time, and each chunk is recomputed in backward instead of being kept.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cotune.data.chat import IGNORE_INDEX


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    Args:
        hidden: final hidden states (batch, seq, hidden).
        weight: the output projection (vocab, hidden).
        labels: (batch, seq), -100 where there is nothing to predict; shifted here, as HF does.
        chunk_size: positions per chunk of logits.

    Returns:
        (loss_sum as fp32 scalar, number of label tokens as a long scalar). The mean is
        loss_sum / n; callers that accumulate over micro-batches or ranks divide by the total.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]
    y = targets[keep]
    n = keep.sum()
    total = hidden[..., :0].sum().float()  # zero that still belongs to the graph (no labels: grad 0)
    for start in range(0, h.shape[0], chunk_size):
        total = total + checkpoint(
            _chunk_loss_sum,
            h[start : start + chunk_size],
            weight,
            y[start : start + chunk_size],
            use_reentrant=False,
        )
    return total, n


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers ``...ForConditionalGeneration`` inside a PEFT wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


class ChunkedLossModel(torch.nn.Module):
    """Wraps a (PEFT) vision-language model so that forward returns (loss_sum, n_label_tokens).

    The backbone (``.model``) produces hidden states; the loss is computed against ``lm_head``
    without materialising full logits. Being the root module, it is also the FSDP root.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int = 2048) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, labels: torch.Tensor, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        core = inner_model(self.model)
        out = core.model(**inputs, use_cache=False)
        return chunked_cross_entropy(out.last_hidden_state, core.lm_head.weight, labels, self.chunk_size)
