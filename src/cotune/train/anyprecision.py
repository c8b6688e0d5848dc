"""llama-cookbook's ``--optimizer anyprecision``: AdamW whose momentum and variance are kept in bf16,
and whose updates of bf16 parameters are Kahan-compensated (so that steps smaller than a bf16 ulp
still add up), in a few lines rather than the cookbook's torchdistx dependency."""

from __future__ import annotations

import torch


class AnyPrecisionAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with states in ``state_dtype``.

    The arithmetic is fp32; ``exp_avg`` and ``exp_avg_sq`` are stored in ``state_dtype``. A parameter
    of a dtype other than fp32 gets a ``compensation`` buffer of its dtype that carries what rounding
    the parameter lost. With ``state_dtype=torch.float32`` and fp32 parameters it is torch's AdamW.
    """

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, state_dtype=torch.bfloat16
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                    if p.dtype != torch.float32:
                        state["compensation"] = torch.zeros_like(p)
                state["step"] += 1
                step, grad, value = float(state["step"]), p.grad.float(), p.float()
                exp_avg = state["exp_avg"].float().mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
                delta = (
                    (exp_avg / denom)
                    .mul_(-lr / (1 - beta1**step))
                    .sub_(value, alpha=lr * group["weight_decay"])
                )
                if "compensation" not in state:
                    p.add_(delta)
                    continue
                delta += state["compensation"].float()  # Kahan: what earlier roundings lost
                new = (value + delta).to(p.dtype)
                state["compensation"].copy_(delta - (new.float() - value))
                p.copy_(new)
        return loss
