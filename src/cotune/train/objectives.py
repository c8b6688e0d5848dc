"""What a training step minimises: SFT (imitate the replies) or DPO (prefer the chosen reply of each pair).

Both run over the same batches and masks: a DPO batch is a padded batch whose first ``pairs`` rows are
the chosen conversations and the next ``pairs`` the rejected ones (``data.pairs.PairCollator``), each
row's labels built by the one masking rule (``data.chat``). The loop asks its objective three things:

* ``units(batch)``: what the step's mean is over (SFT: label tokens; DPO: pairs), summed over the
  step's micro-batches and ranks, so accumulation and data parallelism give one large batch's update;
* ``loss_sum(loss_model, inputs, batch)``: the micro-batch's summed loss and summed statistics;
* ``validate(held, stages_of)``: the held-out loss and statistics over ``step.HeldOut``'s batches.

DPO (Rafailov et al. 2023), sigmoid loss, the reference being the base with the adapter disabled or a
frozen adapter loaded beside the trained one (``reference_adapter``), never a second model copy::

    loss = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))  [+ w * NLL(chosen) / tokens(chosen)]

where ``pi``/``ref`` are a reply's summed token log-probabilities under the policy and the reference.
The optional second term is RPO's (and MPO's) SFT term on the chosen reply, per token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cotune.train import distributed
from cotune.train.step import HeldOut, label_tokens, validation_loss

REFERENCE = "reference"  # the PEFT adapter name of a frozen reference adapter
# the DPO statistics logged, summed per pair then divided by the pairs (TRL's names after "rewards/")
DPO_STATS = (
    "rewards_chosen",
    "rewards_rejected",
    "rewards_accuracy",
    "rewards_margin",
    "logps_chosen",
    "logps_rejected",
)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss per pair and the implicit rewards ``beta * (pi - ref)`` (no gradient).

    Args:
        policy_chosen, policy_rejected: summed reply log-probs under the trained model, (pairs,).
        ref_chosen, ref_rejected: the same under the reference.
        beta: DPO's temperature.

    Returns:
        (losses, chosen rewards, rejected rewards), each (pairs,).
    """
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * logits)
    return (
        losses,
        beta * (policy_chosen - ref_chosen).detach(),
        beta * (policy_rejected - ref_rejected).detach(),
    )


def attach_reference(model: torch.nn.Module, adapter_dir: str) -> None:
    """Loads ``adapter_dir`` into the PEFT ``model`` as the frozen adapter ``REFERENCE`` (not active)."""
    if not hasattr(model, "load_adapter"):
        raise ValueError("ref_adapter needs a LoRA run (use_peft)")
    model.load_adapter(adapter_dir, adapter_name=REFERENCE, is_trainable=False)  # the active one stays
    for name, p in model.named_parameters():
        if f".{REFERENCE}." in name:
            p.requires_grad_(False)


def _tuner_layers(model: torch.nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def reference_model(model: torch.nn.Module, adapter: str | None):
    """Runs the block as the reference: the frozen adapter ``adapter`` active, or (None) the base alone.

    The adapter is switched on each LoRA layer directly: PEFT's ``set_adapter`` would also change
    which parameters require a gradient.
    """
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    layers = _tuner_layers(model)
    saved = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = [adapter]
    try:
        yield
    finally:
        for m, a in zip(layers, saved):
            m._active_adapter = a


# ----------------------------------------------------------------------------- the objectives


class SFT:
    """Next-token cross-entropy on the replies, the mean over the step's label tokens."""

    name = "sft"

    def units(self, batch: dict) -> int:
        return label_tokens(batch)

    def loss_sum(self, loss_model: torch.nn.Module, inputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        loss_sum, _ = loss_model(**inputs)
        return loss_sum, {}

    def validate(self, held: HeldOut, stages_of: Callable | None = None) -> tuple[float, dict, dict]:
        """(loss, loss per stage, no extra statistics): ``step.validation_loss``."""
        loss, by_stage = validation_loss(held, stages_of)
        return loss, by_stage, {}


@dataclass
class DPO:
    """DPO's sigmoid loss per pair (plus ``sft_weight`` x the chosen reply's NLL per token), the mean
    over the step's pairs.

    Attributes:
        model: the PEFT model (its adapter is disabled, or switched, for the reference pass).
        beta: DPO's temperature.
        sft_weight: weight of the SFT term on the chosen reply (0: none).
        reference: the name of a frozen reference adapter in ``model``; None: the base model.
    """

    model: torch.nn.Module
    beta: float = 0.1
    sft_weight: float = 0.0
    reference: str | None = None
    name: str = "dpo"

    def units(self, batch: dict) -> int:
        return int(batch.get("pairs", 0))

    def logps(self, loss_model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reply log-probs of every row (2 x pairs) and their label tokens."""
        sums, n = loss_model(**inputs, per_row=True)
        return -sums, n

    def loss_sum(self, loss_model: torch.nn.Module, inputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        """The micro-batch's summed loss and summed statistics (``DPO_STATS``, as float64)."""
        pairs = self.units(batch)
        with torch.no_grad(), reference_model(self.model, self.reference):
            ref, _ = self.logps(loss_model, inputs)  # every rank runs it: FSDP's collectives pair up
        policy, n = self.logps(loss_model, inputs)
        anchor = policy.sum() * 0.0  # a batch without pairs (a stand-in) still reaches every parameter
        if pairs == 0:
            return anchor, {}
        pc, pr, rc, rr = policy[:pairs], policy[pairs : 2 * pairs], ref[:pairs], ref[pairs : 2 * pairs]
        losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, self.beta)
        if self.sft_weight:
            losses = losses + self.sft_weight * (-pc / n[:pairs].clamp(min=1))
        stats = {
            "rewards_chosen": chosen_r.sum(),
            "rewards_rejected": rejected_r.sum(),
            "rewards_accuracy": (chosen_r > rejected_r).float().sum(),
            "rewards_margin": (chosen_r - rejected_r).sum(),
            "logps_chosen": pc.detach().sum(),
            "logps_rejected": pr.detach().sum(),
        }
        return anchor + losses.sum(), {k: v.double() for k, v in stats.items()}

    def validate(self, held: HeldOut, stages_of: Callable | None = None) -> tuple[float, dict, dict]:
        """The DPO loss and statistics over the held-out pairs of every rank.

        Returns:
            (mean loss per pair, {} (no loss per stage), {statistic: mean per pair}).
        """
        totals = torch.zeros(
            2 + len(DPO_STATS), dtype=torch.float64, device=held.device
        )  # loss, pairs, stats
        for usable in held.batches():
            loss_sum, stats = self.loss_sum(held.loss_model, held.model_inputs(usable), usable)
            row = [loss_sum.double(), torch.tensor(float(self.units(usable)), dtype=torch.float64)]
            row += [stats.get(k, torch.zeros((), dtype=torch.float64)) for k in DPO_STATS]
            totals += torch.stack([t.to(held.device) for t in row])
        distributed.all_reduce_sum(totals)
        pairs = float(totals[1])
        if pairs == 0:
            return float("nan"), {}, {}
        return (
            float(totals[0]) / pairs,
            {},
            {k: float(v) / pairs for k, v in zip(DPO_STATS, totals[2:].tolist())},
        )


def build_objective(cfg: Any, model: torch.nn.Module) -> SFT | DPO:
    """The objective ``cfg.method`` names (``attach_reference`` has loaded a reference adapter)."""
    if getattr(cfg, "method", "sft") != "dpo":
        return SFT()
    return DPO(
        model=model,
        beta=cfg.beta,
        sft_weight=cfg.dpo_sft_weight,
        reference=REFERENCE if cfg.ref_adapter else None,
    )
