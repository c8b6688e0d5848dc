"""How the loop does one step: the schedule, autocast, accumulation groups, the optimizer step, and
the validation loss (the same forward without backward). ``loop.train`` says when each happens."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cotune.config import TrainConfig
from cotune.data.chat import IGNORE_INDEX
from cotune.data.cot import STAGES, label_stages
from cotune.train import distributed


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int, total_steps: int):
    """constant / linear / cosine (after linear warm-up), or cookbook's per-epoch StepLR ('step')."""
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if cfg.scheduler == "step":
            return cfg.gamma ** (step // max(steps_per_epoch, 1))
        if warm and step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(total_steps - warm, 1)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def keeps_master_weights(cfg: TrainConfig, base_dtype: torch.dtype) -> bool:
    """A full fine-tune of a bf16 base (``--torch_dtype bf16``, ``auto`` on a GPU), ``pure_bf16`` off: its
    trainable weights are kept in fp32 and only the compute is in bf16.

    An AdamW step of lr 1e-5 is below half a bf16 step (2**-8 relative) for most weights, so bf16
    weights updated in place keep a fraction of the updates (the tiny model: 0.3 relative error
    after one step; fp32 masters: 0.02, the bf16 gradients' noise). ``pure_bf16`` keeps the
    cookbook's meaning (the weights themselves in bf16; ``--fsdp_config.optimizer anyprecision``
    Kahan-compensates their updates); LoRA weights are fp32 in every case. An fp16 base is left as
    it is (fp16 compute would need a gradient scaler the cookbook only pairs with ``use_fp16``).
    """
    return not cfg.use_peft and not cfg.pure_bf16 and base_dtype == torch.bfloat16


def autocast(cfg: TrainConfig, device: torch.device, base_dtype: torch.dtype = torch.float32):
    """bf16 (or fp16) autocast on GPUs; on CPU, plain fp32 (bf16 there is slower, not faster), except
    over fp32 master weights (``keeps_master_weights``), where the compute is in ``base_dtype``."""
    if cfg.mixed_precision and device.type == "cuda":
        dtype = torch.float16 if cfg.use_fp16 else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)
    if keeps_master_weights(cfg, base_dtype):
        return torch.autocast(device.type, dtype=base_dtype)
    return contextlib.nullcontext()


def fused_adamw(params: list[torch.Tensor]) -> bool:
    """AdamW's fused kernel (one launch for every parameter) where all of them are on a GPU; on CPU
    (and with ``fsdp_config.cpu_offload``) the default for-each implementation."""
    return bool(params) and all(p.device.type == "cuda" for p in params)


def accumulation_groups(loader: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Yields lists of ``size`` consecutive batches (the last group may be shorter)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def optimizer_steps_per_epoch(batches: int, accumulation: int) -> int:
    """Optimizer steps in an epoch of ``batches`` loader batches grouped by ``accumulation``.

    The last, shorter group of ``accumulation_groups`` is a step too, so the schedule built on this
    count ends on the epoch's last step rather than one step early (at learning rate 0).
    """
    return max(1, math.ceil(batches / accumulation))


def stand_in_batch(token_id: int) -> dict:
    """A one-token batch with no label, run in place of a batch whose items all failed to load.

    Under several processes every rank must run the same forwards and backwards (FSDP's collectives
    pair up across ranks), so a rank cannot just skip a batch. This one adds nothing to the loss
    and zero to every gradient; the family's dummy image inputs make it run the vision layers too.
    """
    return {
        "input_ids": torch.tensor([[token_id]]),
        "attention_mask": torch.ones(1, 1, dtype=torch.long),
        "labels": torch.tensor([[IGNORE_INDEX]]),
        "stand_in": True,
    }


def usable_batches(
    group: list[dict], stand_in: dict | None, warn: Callable[[str], None] | None, what: str = "skipped"
) -> list[dict]:
    """The group's batches once the items that failed to load are accounted for.

    Each failed item is reported through ``warn`` (as "warning: {what} {reason}"). A batch left empty
    is dropped or, when ``stand_in`` is given (several processes), replaced by it, so that every
    rank runs as many forwards.
    """
    for batch in group:
        for msg in batch.pop("skipped", []):
            if warn is not None:
                warn(f"warning: {what} {msg}")
    if stand_in is None:
        return [b for b in group if not b.get("empty")]
    return [stand_in if b.get("empty") else b for b in group]


def label_tokens(batch: dict) -> int:
    """Tokens of ``batch`` whose next token is predicted (the loss's denominator)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    max_grad_norm: float | None,
) -> tuple[float, float | None]:
    """Applies the accumulated gradients: fp16 unscaling, clipping, the update, the schedule.

    Args:
        model: the PEFT model; its trainable parameters are clipped.
        optimizer, scheduler: the run's.
        scaler: the fp16 GradScaler, or None.
        max_grad_norm: clip the gradients' global norm to this; None: no clipping.

    Returns:
        The learning rate the update used, and the gradient norm before clipping (None unclipped).
    """
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = None
    if max_grad_norm is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = distributed.clip_grad_norm(params, max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return lr, grad_norm


STAGE_KEYS = (*STAGES, "other")  # what ``batch_label_stages`` numbers the label tokens by


def batch_label_stages(tokenizer: Any, cache: dict, batch: dict) -> torch.Tensor:
    """The LLaVA-CoT stage of each label token of ``batch``, as indices into ``STAGE_KEYS`` (batch, seq).

    Rows are looked up in ``cache`` (by their tokens) before they are decoded: validation sees the same
    rows every time, so only the first validation decodes.
    """
    rows = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        key = (tuple(ids), tuple(labels))
        if key not in cache:
            stages = label_stages(tokenizer, ids, labels)
            cache[key] = [STAGE_KEYS.index(s) if s else len(STAGES) for s in stages]
        rows.append(cache[key])
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class HeldOut:
    """One validation pass's reading of the held-out batches, the same for every objective.

    Attributes:
        loss_model: the module the loop calls.
        loader: the validation batches; at most ``cfg.max_eval_step`` of them are used (0: all).
        model_inputs: a batch's inputs for ``loss_model``, on the device.
        cfg: the run's configuration (``max_eval_step``, mixed precision).
        device: this process's device.
        stand_in: run in place of an empty batch (several processes), see ``stand_in_batch``.
        warn: told of each validation record that failed to load (it is left out of the loss).
        base_dtype: the dtype the base was loaded in (the compute dtype over fp32 master weights).
    """

    loss_model: torch.nn.Module
    loader: Iterable[dict]
    model_inputs: Callable[[dict], dict]
    cfg: TrainConfig
    device: torch.device
    stand_in: dict | None = None
    warn: Callable[[str], None] | None = None
    base_dtype: torch.dtype = torch.float32

    def batches(self) -> Iterator[dict]:
        """The usable batches, each consumed in eval mode, without gradients, under the run's
        autocast; the model is back in training mode when the pass ends."""
        self.loss_model.eval()
        try:
            with torch.no_grad():
                for i, batch in enumerate(self.loader):
                    if self.cfg.max_eval_step and i >= self.cfg.max_eval_step:
                        break
                    for usable in usable_batches([batch], self.stand_in, self.warn, "validation skipped"):
                        with autocast(self.cfg, self.device, self.base_dtype):
                            yield usable
        finally:
            self.loss_model.train()


def validation_loss(
    held: HeldOut, stages_of: Callable[[dict], torch.Tensor] | None = None
) -> tuple[float, dict[str, float]]:
    """Token-weighted mean validation loss over the whole validation set (all ranks), and per stage.

    Args:
        held: the pass over the held-out batches.
        stages_of: a batch's label stages (``batch_label_stages``); None: no loss per stage.

    Returns:
        The loss, and the mean loss of each LLaVA-CoT stage that has label tokens (``STAGE_KEYS``;
        empty without ``stages_of`` or when no label token is in a stage).
    """
    device, loss_model = held.device, held.loss_model
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    by_stage = torch.zeros(len(STAGE_KEYS), 2, dtype=torch.float64, device=device)  # loss sum, tokens
    for usable in held.batches():
        if stages_of is None:
            loss_sum, n = loss_model(**held.model_inputs(usable))
        else:  # the same loss, token by token (0 where no label)
            losses, n = loss_model(**held.model_inputs(usable), per_token=True)
            loss_sum = losses.sum()
            has_label = usable["labels"].to(device) != IGNORE_INDEX
            has_label[:, 0] = False  # the first position is never predicted
            stages = stages_of(usable).to(device)[has_label]
            by_stage[:, 0].index_add_(0, stages, losses[has_label].double())
            by_stage[:, 1].index_add_(0, stages, torch.ones_like(stages, dtype=torch.float64))
        totals += torch.stack([loss_sum.double(), n.double()])
    distributed.all_reduce_sum(totals)
    loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    if stages_of is None:
        return loss, {}
    distributed.all_reduce_sum(by_stage)
    if not by_stage[: len(STAGES), 1].any():  # not LLaVA-CoT data
        return loss, {}
    return loss, {s: float(v / k) for s, (v, k) in zip(STAGE_KEYS, by_stage.tolist()) if k > 0}
