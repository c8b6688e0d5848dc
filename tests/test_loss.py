"""The chunked loss against a float64 reference: frozen-head (fused) and trainable-head paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cotune.train.loss import chunked_cross_entropy


def problem(batch=3, seq=40, hidden=16, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, : seq // 3] = -100  # a prompt
    labels[1, -5:] = -100  # padding
    return h, w, labels


def reference(h, w, labels):
    """HF's convention in float64: logits everywhere, shift, sum over labelled positions."""
    h = h.double().detach().requires_grad_(True)
    logits = F.linear(h, w.double())
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, w.shape[0]), targets.reshape(-1), reduction="sum")
    loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("chunk_size", [7, 512])
def test_frozen_head_matches_float64_reference(chunk_size):
    h, w, labels = problem()
    ref_loss, ref_grad = reference(h, w, labels)
    x = h.clone().requires_grad_(True)
    loss_sum, n = chunked_cross_entropy(x, w, labels, chunk_size)
    assert int(n) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum.double(), ref_loss, rtol=1e-6, atol=0)
    (loss_sum * 0.5).backward()  # the upstream gradient is applied, not assumed to be 1
    torch.testing.assert_close(x.grad.double(), 0.5 * ref_grad, rtol=1e-4, atol=1e-6)


def test_trainable_head_takes_the_recompute_path_and_agrees():
    h, w, labels = problem(seed=1)
    x1, x2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    frozen, _ = chunked_cross_entropy(x1, w, labels, 7)
    w2 = w.clone().requires_grad_(True)
    trainable, _ = chunked_cross_entropy(x2, w2, labels, 7)
    torch.testing.assert_close(frozen, trainable, rtol=1e-6, atol=0)
    frozen.backward()
    trainable.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    assert w2.grad is not None and w2.grad.abs().sum() > 0


def test_no_grad_and_no_labels():
    h, w, labels = problem(seed=2)
    with torch.no_grad():
        loss_sum, _ = chunked_cross_entropy(h.clone().requires_grad_(True), w, labels)
    assert loss_sum.grad_fn is None
    torch.testing.assert_close(loss_sum.double(), reference(h, w, labels)[0], rtol=1e-6, atol=0)
    x = h.clone().requires_grad_(True)
    empty, n = chunked_cross_entropy(x, w, torch.full_like(labels, -100))
    assert int(n) == 0 and float(empty.detach()) == 0.0
    empty.backward()
    assert float(x.grad.abs().sum()) == 0.0


def test_autocast_computes_logits_in_the_autocast_dtype():
    h, w, labels = problem(seed=3)
    x = h.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, _ = chunked_cross_entropy(x, w, labels, 7)
        logits = F.linear(h, w).float()  # what F.linear gives under autocast: bf16 products
    targets = labels[:, 1:][labels[:, 1:] != -100]
    expected = F.cross_entropy(logits[:, :-1][labels[:, 1:] != -100], targets, reduction="sum")
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=0)
    loss_sum.backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("chunk_size", [7, 512])
def test_per_token_losses_are_the_terms_the_training_loss_sums(chunk_size):
    from cotune.train.loss import label_token_losses

    h, w, labels = problem()
    per_token = label_token_losses(h, w, labels, chunk_size)
    loss_sum, _ = chunked_cross_entropy(h, w, labels, chunk_size)
    assert per_token.shape == labels.shape and (per_token[labels == -100] == 0).all()
    torch.testing.assert_close(per_token.sum(), loss_sum, rtol=1e-6, atol=0)
    logits = F.linear(h[:, :-1].double(), w.double())
    ref = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
    torch.testing.assert_close(per_token[:, 1:].double(), ref, rtol=1e-5, atol=1e-5)
