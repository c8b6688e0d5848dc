"""``--optimizer anyprecision``: AnyPrecisionAdamW against torch's AdamW."""

from __future__ import annotations

import torch

from cotune.train.anyprecision import AnyPrecisionAdamW


def trajectory(make_optimizer, dtype=torch.float32, steps=50, start=None):
    torch.manual_seed(0)
    target = torch.randn(64, 32)
    p = torch.nn.Parameter((torch.randn(64, 32) if start is None else start.clone()).to(dtype))
    opt = make_optimizer([p])
    for _ in range(steps):
        loss = ((p.float() - target) ** 2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return p.detach().float()


def test_with_fp32_states_it_is_torch_adamw():
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref = trajectory(lambda ps: torch.optim.AdamW(ps, **kw))
    got = trajectory(lambda ps: AnyPrecisionAdamW(ps, state_dtype=torch.float32, **kw))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_bf16_states_stay_within_1e_2_of_fp32_adamw():
    kw = dict(lr=1e-2, weight_decay=0.1)
    ref = trajectory(lambda ps: torch.optim.AdamW(ps, **kw))
    opt_holder = []
    got = trajectory(lambda ps: opt_holder.append(AnyPrecisionAdamW(ps, **kw)) or opt_holder[0])
    state = next(iter(opt_holder[0].state.values()))
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert (got - ref).abs().max() < 1e-2


def test_kahan_summation_keeps_bf16_updates_smaller_than_an_ulp():
    """lr 1e-4 on weights near 1 (bf16 spacing there: 2**-7): plain bf16 AdamW loses every step;
    AnyPrecisionAdamW's compensated bf16 weights follow fp32 AdamW to within one bf16 ulp."""
    start = (torch.ones(64, 32) + 0.05 * torch.rand(64, 32)).bfloat16().float()  # bf16 values
    kw = dict(lr=1e-4)
    ref = trajectory(lambda ps: torch.optim.AdamW(ps, **kw), steps=200, start=start)
    plain = trajectory(lambda ps: torch.optim.AdamW(ps, **kw), torch.bfloat16, steps=200, start=start)
    kahan = trajectory(lambda ps: AnyPrecisionAdamW(ps, **kw), torch.bfloat16, steps=200, start=start)
    moved = (ref - start).abs().mean()
    assert moved > 0.015  # 200 steps of ~1e-4: more than a bf16 ulp at 1
    assert (plain - start).abs().max() == 0  # every step rounded away
    # one bf16 ulp at 1: the last rounding, and gradients taken at the rounded weights
    assert (kahan - ref).abs().max() <= 2**-7
    assert (kahan - ref).abs().mean() < 0.25 * (plain - ref).abs().mean()
