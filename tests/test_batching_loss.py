"""Collated batches match the HF processor's; the chunked loss equals HF's own loss."""

from __future__ import annotations

import torch
from PIL import Image

from cotune.data.batching import LengthGroupedBatchSampler, PaddingCollator, pad_fraction
from cotune.data.dataset import SFTDataset, encode_samples
from cotune.data.records import conversation_to_messages, load_samples
from cotune.models.families import MLLAMA
from cotune.train.loss import ChunkedLossModel
from helpers import random_lora


def dataset(processor, shapes, n=4):
    samples, problems = load_samples(shapes["train"])
    assert not problems
    encoded, _, _ = encode_samples(samples[:n], processor, MLLAMA, max_seq_len=1024)
    return SFTDataset(encoded, processor, MLLAMA)


def collate(processor, items):
    tok = processor.tokenizer
    return PaddingCollator(tok.pad_token_id, MLLAMA, MLLAMA.image_token_id(tok))(items)


def test_collator_matches_hf_processor(processor, shapes):

    batch, ref = _ours_and_processors(processor, dataset(processor, shapes, n=3))
    _assert_same_model_inputs(batch, ref)
    # padding is right-side and out of the loss
    assert (batch["labels"][~batch["attention_mask"].bool()] == -100).all()


def _ours_and_processors(processor, ds: SFTDataset) -> tuple[dict, dict]:
    """cotune's padded batch of ``ds`` and the HF processor's batch of the same texts and images."""
    from cotune.data.images import load_image

    batch = collate(processor, [ds[i] for i in range(len(ds))])
    texts = [processor.tokenizer.decode(e.input_ids) for e in ds.encoded]
    images = [[load_image(p) for p in e.images] for e in ds.encoded]
    ref = processor(text=texts, images=images, padding=True, add_special_tokens=False, return_tensors="pt")
    return batch, ref


def _assert_same_model_inputs(batch: dict, ref: dict) -> None:
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    torch.testing.assert_close(batch["pixel_values"], ref["pixel_values"])
    assert torch.equal(batch["aspect_ratio_ids"], ref["aspect_ratio_ids"])
    assert torch.equal(batch["aspect_ratio_mask"], ref["aspect_ratio_mask"])
    real = batch["attention_mask"].bool()
    assert batch["cross_attention_mask"].shape == ref["cross_attention_mask"].shape
    assert torch.equal(batch["cross_attention_mask"][real], ref["cross_attention_mask"][real])


def test_collator_matches_hf_processor_for_several_and_differently_sized_images(processor, tmp_path):
    """One wide image, two images of other shapes, one tall image: tiles, aspect ratios and the
    cross-attention mask token by token are the HF processor's."""
    from cotune.data.chat import tokenize_conversation
    from cotune.data.dataset import Encoded

    sizes = [[(96, 32)], [(20, 70), (48, 48)], [(30, 100)]]
    encoded = []
    for k, group in enumerate(sizes):
        paths = []
        for j, (w, h) in enumerate(group):
            path = tmp_path / f"{k}_{j}.png"
            Image.new("RGB", (w, h), (40 * k + 60 * j, 120, 200)).save(path)
            paths.append(str(path))
        question = " and ".join(["<image>"] * len(group)) + " What differs?"
        messages = conversation_to_messages([("user", question), ("assistant", "The colour.")], len(group))
        ids, labels = tokenize_conversation(processor, messages)
        encoded.append(Encoded(ids, labels, paths, f"s{k}", f"s{k}:1"))
    batch, ref = _ours_and_processors(processor, SFTDataset(encoded, processor, MLLAMA))
    assert len(set(ref["aspect_ratio_ids"][ref["aspect_ratio_ids"] > 0].tolist())) >= 3  # really different
    _assert_same_model_inputs(batch, ref)


def test_mixed_text_only_and_image_batch(processor, shapes):
    ds = dataset(processor, shapes, n=1)
    messages = conversation_to_messages([("user", "Say hi."), ("assistant", "hi")], 0)
    from cotune.data.chat import tokenize_conversation
    from cotune.data.dataset import Encoded

    ids, labels = tokenize_conversation(processor, messages)
    text_only = SFTDataset([Encoded(ids, labels, [], "t", "t:1")], processor, MLLAMA)
    batch = collate(processor, [ds[0], text_only[0]])
    b, seq = batch["input_ids"].shape
    assert batch["pixel_values"].shape[:3] == (2, 1, 4)
    assert batch["cross_attention_mask"].shape == (2, seq, 1, 4)
    assert batch["cross_attention_mask"][1].sum() == 0 and batch["aspect_ratio_ids"][1, 0] == 0
    assert batch["cross_attention_mask"][0].sum() > 0


def test_chunked_loss_equals_hf_loss_and_gradients(tiny_mllama, processor, shapes):
    ds = dataset(processor, shapes, n=3)
    batch = collate(processor, [ds[i] for i in range(3)])
    peft = random_lora(tiny_mllama, seed=0, std=0.02)  # gradients flow through both LoRA factors
    ref = peft(**batch)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    peft.zero_grad()
    loss_sum, n = ChunkedLossModel(peft, chunk_size=7)(**batch)
    n_expected = int((batch["labels"][:, 1:] != -100).sum())
    assert int(n) == n_expected
    ours = loss_sum / n
    torch.testing.assert_close(ours, ref.loss.float(), rtol=1e-5, atol=0)
    ours.backward()
    for name, p in peft.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(
                p.grad, ref_grads[name], rtol=1e-3, atol=1e-3 * float(ref_grads[name].abs().max())
            )


def test_length_grouping_reduces_padding_and_covers_every_sample():
    lengths = [(i * 37) % 300 + 20 for i in range(200)]
    grouped = LengthGroupedBatchSampler(lengths, 4, seed=1, mega_batch_mult=10)
    plain = LengthGroupedBatchSampler(lengths, 4, seed=1, group_by_length=False)
    batches = list(grouped)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert pad_fraction(lengths, batches) < 0.5 * pad_fraction(lengths, list(plain))
    grouped.set_epoch(1)
    assert list(grouped) != batches  # reshuffled per epoch
    # two ranks split every global batch between them, disjointly
    r0 = LengthGroupedBatchSampler(lengths, 2, seed=1, rank=0, world_size=2)
    r1 = LengthGroupedBatchSampler(lengths, 2, seed=1, rank=1, world_size=2)
    seen = [i for a, b in zip(r0, r1) for i in a + b]
    assert sorted(seen) == list(range(200))


# ----------------------------------------------------------------------------- images reach their own rows


def _swap_images(ds: SFTDataset, a: int, b: int) -> SFTDataset:
    """The same samples with the images of samples ``a`` and ``b`` exchanged."""
    import dataclasses

    enc = list(ds.encoded)
    enc[a], enc[b] = (
        dataclasses.replace(enc[a], images=ds.encoded[b].images),
        dataclasses.replace(enc[b], images=ds.encoded[a].images),
    )
    return SFTDataset(enc, ds.processor, ds.family)


def _row_losses(model, batch) -> torch.Tensor:
    from cotune.eval.evaluate import label_token_losses

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "token_mask", "samples_per_row")}
    return label_token_losses(model, inputs, batch["labels"])


def test_swapping_two_rows_images_changes_exactly_those_rows_losses(tiny_mllama, processor, shapes):
    ds = dataset(processor, shapes, n=4)
    model = random_lora(tiny_mllama, seed=0, std=0.05).eval()
    before = _row_losses(model, collate(processor, [ds[i] for i in range(4)])).sum(dim=1)
    swapped = _swap_images(ds, 0, 2)
    after = _row_losses(model, collate(processor, [swapped[i] for i in range(4)])).sum(dim=1)
    change = (after - before).abs() / before
    # each row sees the other's picture (a small share of a random model's loss, far above rounding)
    assert change[0] > 2e-5 and change[2] > 2e-5, change
    torch.testing.assert_close(after[[1, 3]], before[[1, 3]], rtol=1e-6, atol=0)  # the others do not move
