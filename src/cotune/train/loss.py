"""Cross-entropy without the full logits tensor.

With Llama 3's 128,256-token vocabulary the fp32 logits of a batch (batch x seq x vocab) are the
largest tensor of a LoRA step. Here the logits are computed only at positions that have a label,
a chunk at a time, into one reused (chunk x vocab) buffer.

When ``lm_head`` is frozen (LoRA), the gradient with respect to the hidden states is computed in the
same pass as the loss (``softmax(logits) @ W - W[target]``), so nothing of vocabulary size is kept
for backward and no logits are recomputed: one matmul fewer than recomputing them, and no new
vocabulary-sized tensor per chunk (on CPU each new one costs page faults, and freed blocks can stay
in the process's heap). A trainable output projection takes the recompute-in-backward path instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cotune.data.chat import IGNORE_INDEX
from cotune.models.families import DUMMY_PIXELS


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def _chunk_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="none")


def _chunk_token_losses(
    hc: torch.Tensor, wc: torch.Tensor, yc: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each row of ``hc @ wc.T`` against ``yc``, computed in the buffer ``logits``.

    Returns the fp32 losses and the buffer, left holding ``exp(logits - max)`` and the row sums
    for the gradient (``softmax = exp / sums``).
    """
    if hc.dtype == torch.float32:
        torch.mm(hc, wc.t(), out=logits)
    else:
        logits.copy_(torch.mm(hc, wc.t()))
    picked = logits.gather(1, yc[:, None])
    top = logits.amax(dim=1, keepdim=True)
    logits.sub_(top).exp_()  # in place: no second (chunk x vocab) tensor
    sums = logits.sum(dim=1, keepdim=True)
    return (top + sums.log() - picked).squeeze(1), sums


def _frozen_head_chunks(
    h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk_size: int, dtype: torch.dtype
):
    """Yields (start, per-row losses, exp buffer, row sums, weight in ``dtype``) chunk by chunk."""
    with torch.autocast(h.device.type, enabled=False):
        wc = w if w.dtype == dtype else w.to(dtype)
        buf = torch.empty((min(chunk_size, h.shape[0]), w.shape[0]), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc, yc = h[start : start + chunk_size].to(dtype), y[start : start + chunk_size]
            losses, sums = _chunk_token_losses(hc, wc, yc, buf[: hc.shape[0]])
            yield start, losses, buf[: hc.shape[0]], sums, wc


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ w.T`` against ``y``, with d/dh computed in forward, chunk by chunk."""

    @staticmethod
    def forward(
        ctx, h, w, y, chunk_size: int, compute_dtype: torch.dtype, need_grad: bool, rows=None, n_rows=0
    ):
        # rows: the row of each position; then the result is a sum per row (n_rows,), not one scalar
        shape = () if rows is None else (n_rows,)
        total = torch.zeros(shape, dtype=torch.float32, device=h.device)
        grad = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
        for start, losses, exp, sums, wc in _frozen_head_chunks(h, w, y, chunk_size, compute_dtype):
            if rows is None:
                total += losses.sum()
            else:
                total.index_add_(0, rows[start : start + exp.shape[0]], losses)
            if need_grad:  # d/dh of the summed loss: softmax @ W - W[y] = (exp @ W) / sums - W[y]
                g = grad[start : start + exp.shape[0]]
                if compute_dtype == torch.float32:
                    torch.mm(exp, wc, out=g)
                else:
                    g.copy_(torch.mm(exp.to(compute_dtype), wc))
                g.div_(sums).sub_(wc[y[start : start + exp.shape[0]]].float())
        if need_grad:
            ctx.save_for_backward(grad, rows)
        ctx.h_dtype = h.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad, rows = ctx.saved_tensors
        scale = grad_total if rows is None else grad_total[rows][:, None]
        return (grad * scale).to(ctx.h_dtype), None, None, None, None, None, None, None


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype F.linear would use here: the autocast dtype inside autocast, else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    Args:
        hidden: final hidden states (batch, seq, hidden).
        weight: the output projection (vocab, hidden).
        labels: (batch, seq), -100 where there is nothing to predict; shifted here, as HF does.
        chunk_size: positions per chunk of logits (the buffer is chunk_size x vocab fp32).

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
    if h.shape[0] == 0:
        return total, n
    if not weight.requires_grad and type(weight) in (torch.Tensor, torch.nn.Parameter):
        need_grad = torch.is_grad_enabled() and h.requires_grad
        dtype = _compute_dtype(hidden, weight)
        return total + _FrozenHeadCrossEntropy.apply(h, weight, y, chunk_size, dtype, need_grad), n
    for start in range(0, h.shape[0], chunk_size):  # trainable (or sharded) head: recompute in backward
        total = total + checkpoint(
            _chunk_loss_sum,
            h[start : start + chunk_size],
            weight,
            y[start : start + chunk_size],
            use_reentrant=False,
        )
    return total, n


def row_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunked_cross_entropy`` summed per row, with its gradient: what a preference objective needs
    (a reply's log-probability is minus its row's sum).

    Returns:
        (fp32 sums of shape (batch,), label tokens per row (batch,)).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h, y = hidden[:, :-1][keep], targets[keep]
    n_rows = labels.shape[0]
    rows = torch.arange(n_rows, device=labels.device)[:, None].expand_as(targets)[keep]
    zero = hidden[..., :0].sum().float()  # still part of the graph when there is no label
    total = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device) + zero
    if h.shape[0] == 0:
        return total, keep.sum(dim=1)
    if not weight.requires_grad and type(weight) in (torch.Tensor, torch.nn.Parameter):
        need_grad = torch.is_grad_enabled() and h.requires_grad
        dtype = _compute_dtype(hidden, weight)
        sums = _FrozenHeadCrossEntropy.apply(h, weight, y, chunk_size, dtype, need_grad, rows, n_rows)
        return total + sums, keep.sum(dim=1)
    for start in range(0, h.shape[0], chunk_size):  # trainable (or sharded) head: recompute in backward
        end = start + chunk_size
        losses = checkpoint(_chunk_losses, h[start:end], weight, y[start:end], use_reentrant=False)
        total = total.index_add(0, rows[start:end], losses)
    return total, keep.sum(dim=1)


@torch.no_grad()
def label_token_losses(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 512
) -> torch.Tensor:
    """The per-token terms that ``chunked_cross_entropy`` sums, where they are (no gradient).

    Returns:
        (batch, seq) fp32; ``out[b, j]`` is the loss of predicting ``labels[b, j]`` from the
        positions before it, 0 where there is no label. Its sum is ``chunked_cross_entropy``'s.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h, y = hidden[:, :-1][keep], targets[keep]
    out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    if h.shape[0]:
        chunks = _frozen_head_chunks(h, weight, y, chunk_size, _compute_dtype(hidden, weight))
        out[:, 1:][keep] = torch.cat([losses for _, losses, *_ in chunks])
    return out


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

    def __init__(self, model: torch.nn.Module, chunk_size: int = 512, family: Any = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.family = family

    def forward(
        self, labels: torch.Tensor, per_token: bool = False, per_row: bool = False, **inputs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_sum, n_label_tokens); with ``per_token``, the (batch, seq) losses instead of their sum
        (``label_token_losses``: what eval groups by sample and by stage); with ``per_row``, the sums
        and counts of each row, with gradient (``row_cross_entropy``: what DPO compares)."""
        core = inner_model(self.model)
        dummy = inputs.pop(DUMMY_PIXELS, None)
        anchor = None
        if dummy is not None:  # before the text, in the order a real image's vision layers run
            if self.family is None or self.family.dummy_vision_pass is None:
                raise ValueError(f"'{DUMMY_PIXELS}' given, but no model family to run it was")
            anchor = self.family.dummy_vision_pass(core.model, dummy)
        out = core.model(**inputs, use_cache=False)
        if per_token:
            losses = label_token_losses(out.last_hidden_state, core.lm_head.weight, labels, self.chunk_size)
            return losses, (labels[:, 1:] != IGNORE_INDEX).sum()
        loss_fn = row_cross_entropy if per_row else chunked_cross_entropy
        total, n = loss_fn(out.last_hidden_state, core.lm_head.weight, labels, self.chunk_size)
        if anchor is not None:
            total = total + 0.0 * anchor
        return total, n
