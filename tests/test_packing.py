"""Packing: per-sample attention, positions, labels and images; loss parity with unpacked batches.

Also multi-image samples (each image attended by the tokens after it, up to the next image) and
text-only samples mixed with image samples, checked token by token.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices

from cotune.data.batching import (
    PackedBatchSampler,
    PackingCollator,
    PaddingCollator,
    pack_rows,
    packed_pad_fraction,
)
from cotune.data.chat import IGNORE_INDEX, tokenize_conversation
from cotune.data.dataset import Encoded, ItemKey, SFTDataset
from cotune.data.images import load_image
from cotune.data.records import conversation_to_messages
from cotune.models.families import MLLAMA
from cotune.train.loss import ChunkedLossModel
from helpers import random_lora

IMAGE = 128256


def encode(processor, turns, images, name):
    messages = conversation_to_messages(turns, len(images))
    ids, labels = tokenize_conversation(processor, messages)
    return Encoded(ids, labels, [str(p) for p in images], name, f"{name}:1")


@pytest.fixture(scope="module")
def dataset(processor, shapes):
    pngs = sorted(shapes["images"].glob("train_*.png"))
    enc = [
        encode(
            processor, [("user", "<image>\nWhat is here?"), ("assistant", "A red circle.")], pngs[:1], "one"
        ),
        encode(
            processor,
            [
                ("user", "<image> left. <image> right. Which has more shapes?"),
                ("assistant", "The second one."),
            ],
            pngs[1:3],
            "two",
        ),
        encode(processor, [("user", "Say hi."), ("assistant", "hi there")], [], "text"),
        encode(
            processor,
            [
                ("user", "<image>\nColour?"),
                ("assistant", "blue"),
                ("user", "Shape?"),
                ("assistant", "a star"),
            ],
            pngs[3:4],
            "multi-turn",
        ),
        encode(processor, [("user", "Count to three."), ("assistant", "one two three")], [], "text2"),
    ]
    return SFTDataset(enc, processor, MLLAMA)


def padding_collate(processor, items):
    tok = processor.tokenizer
    return PaddingCollator(tok.pad_token_id, MLLAMA, IMAGE)(items)


def packed(processor, dataset, rows):
    tok = processor.tokenizer
    items = [dataset[ItemKey(i, 0, r)] for r, row in enumerate(rows) for i in row]
    return PackingCollator(tok.pad_token_id, MLLAMA, IMAGE)(items)


# ----------------------------------------------------------------------------- multi-image masks


def test_multi_image_cross_attention_mask_token_by_token(processor, dataset):
    item = dataset[1]
    ids = item["input_ids"].tolist()
    first, second = [i for i, t in enumerate(ids) if t == IMAGE]
    mask = padding_collate(processor, [item])["cross_attention_mask"][0]  # (seq, images, tiles)
    tiles = item["num_tiles"]
    for pos in range(len(ids)):
        attended = [k for k in range(2) if mask[pos, k].any()]
        expected = [] if pos < first else [0] if pos < second else [1]
        assert attended == expected, f"token {pos}: attends images {attended}, expected {expected}"
        for k in attended:  # real tiles only
            assert mask[pos, k, : tiles[k]].all() and not mask[pos, k, tiles[k] :].any()
    # the same as the HF processor's own mask for this text and these images
    text = processor.tokenizer.decode(ids)
    images = [[load_image(p) for p in dataset.encoded[1].images]]
    ref = processor(text=[text], images=images, add_special_tokens=False, return_tensors="pt")
    assert torch.equal(mask, ref["cross_attention_mask"][0])


def test_text_only_and_multi_image_samples_in_one_padded_batch(processor, dataset):
    batch = padding_collate(processor, [dataset[0], dataset[1], dataset[2]])
    assert batch["pixel_values"].shape[:2] == (3, 2)  # padded to the most images of a sample
    cross = batch["cross_attention_mask"]
    assert cross[2].sum() == 0 and (batch["aspect_ratio_ids"][2] == 0).all()  # text-only: nothing
    assert cross[0, :, 1].sum() == 0 and (batch["aspect_ratio_ids"][0, 1] == 0)  # one image: slot 1 empty
    assert cross[1, :, 0].sum() > 0 and cross[1, :, 1].sum() > 0


# ----------------------------------------------------------------------------- packed batches


def test_packed_batch_positions_labels_and_images(processor, dataset):
    rows = [[0, 2, 1], [3, 4]]
    batch = packed(processor, dataset, rows)
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    cross = batch["cross_attention_mask"]
    assert ids.shape[0] == 2 and batch["samples_per_row"] == [3, 2]
    segments = find_packed_sequence_indices(pos)  # what transformers derives the attention mask from
    assert segments is not None
    for r, row in enumerate(rows):
        start, first_image = 0, 0
        for s, i in enumerate(row):
            e = dataset.encoded[i]
            n = len(e.input_ids)
            span = slice(start, start + n)
            assert ids[r, span].tolist() == e.input_ids
            assert pos[r, span].tolist() == list(range(n))  # positions restart per sample
            assert (segments[r, span] == s).all()  # its own attention block
            assert labels[r, start] == IGNORE_INDEX  # not predicted from the previous sample
            assert labels[r, start + 1 : start + n].tolist() == e.labels[1:]
            # its text attends exactly as it would alone, to its own images in their row slots
            alone = padding_collate(processor, [dataset[i]]).get("cross_attention_mask")
            n_img = len(e.images)
            if n_img:
                own = cross[r, span, first_image : first_image + n_img]
                assert torch.equal(own, alone[0, :n, :n_img])
            others = torch.ones(cross.shape[2], dtype=torch.bool)
            others[first_image : first_image + n_img] = False
            assert cross[r, span][:, others].sum() == 0, f"sample {i} reaches another sample's image"
            start, first_image = start + n, first_image + n_img
        assert (labels[r, start:] == IGNORE_INDEX).all() and cross[r, start:].sum() == 0
        assert batch["token_mask"][r].sum() == start
    assert "attention_mask" not in batch  # a 2D mask would make transformers ignore the packing


def test_pack_rows_and_sampler_cover_every_sample_once():
    lengths = [(i * 37) % 300 + 20 for i in range(300)]
    has_images = [i % 3 != 0 for i in range(300)]
    sampler = PackedBatchSampler(lengths, 4, 512, seed=1, window=100, has_images=has_images)
    batches = sampler.global_batches()
    rows = [row for b in batches for row in b]
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert all(len({has_images[i] for i in row}) == 1 for row in rows)  # text-only rows stay apart
    keys = [k for b in sampler for k in b]
    assert sorted(k.index for k in keys) == list(range(300)) and {k.epoch for k in keys} == {0}
    assert packed_pad_fraction(lengths, batches) < 0.1
    sampler.set_epoch(1)
    assert sampler.global_batches() != batches and {k.epoch for b in sampler for k in b} == {1}
    r0 = PackedBatchSampler(lengths, 2, 512, seed=1, window=100, rank=0, world_size=2)
    r1 = PackedBatchSampler(lengths, 2, 512, seed=1, window=100, rank=1, world_size=2)
    seen = [k.index for a, b in zip(r0, r1) for k in a + b]
    assert sorted(seen) == list(range(300))
    assert pack_rows([600, 10], [0, 1], 512) == [[0], [1]]  # too long: a row of its own, never cut


# ----------------------------------------------------------------------------- loss parity


@pytest.fixture(scope="module")
def lora_model(tiny_mllama):
    peft = random_lora(tiny_mllama, seed=0, std=0.05)
    peft.eval()
    return peft


def cross_layer(model):
    core = model.get_base_model().model.language_model
    return core.layers[core.cross_attention_layers[0]]


@contextlib.contextmanager
def gates(model, attn: float, mlp: float):
    """The tiny model's cross-attention gates start at 0 (images would not matter): open them."""
    layer = cross_layer(model)
    saved = layer.cross_attn_attn_gate.data.clone(), layer.cross_attn_mlp_gate.data.clone()
    layer.cross_attn_attn_gate.data.fill_(attn)
    layer.cross_attn_mlp_gate.data.fill_(mlp)
    try:
        yield
    finally:
        layer.cross_attn_attn_gate.data.copy_(saved[0])
        layer.cross_attn_mlp_gate.data.copy_(saved[1])


@contextlib.contextmanager
def reference_row_masking(model):
    """Meta's reference Mllama zeroes the cross-attention output of text rows that attend to no
    image; transformers zeroes only the MLP's (issue #39379), so those rows get the mean of all
    images in their row. With this, every token's image input is exactly its own images'."""
    layer = cross_layer(model)
    attn, original_layer_forward = layer.cross_attn, layer.forward

    def layer_forward(*args, **kwargs):
        row_mask = kwargs["full_text_row_masked_out_mask"][:, 0]
        original_attn_forward = attn.forward
        attn.forward = lambda *a, **k: (lambda out: (out[0] * row_mask, out[1]))(
            original_attn_forward(*a, **k)
        )
        try:
            return original_layer_forward(*args, **kwargs)
        finally:
            del attn.forward

    layer.forward = layer_forward
    try:
        yield
    finally:
        del layer.forward


def losses(model, processor, dataset, rows):
    loss_model = ChunkedLossModel(model, chunk_size=16)
    with torch.no_grad():
        unpacked = [loss_model(**padding_collate(processor, [dataset[i]])) for row in rows for i in row]
        batch = packed(processor, dataset, rows)
        inputs = {k: v for k, v in batch.items() if k not in ("token_mask", "samples_per_row")}
        packed_sum, packed_n = loss_model(**inputs)
    return sum(s for s, _ in unpacked), sum(int(n) for _, n in unpacked), packed_sum, int(packed_n), batch


def test_packed_loss_equals_unpacked_loss(lora_model, processor, dataset):
    # as transformers computes Mllama: the MLP gate open, so which tokens have an image matters
    rows = [[0, 1, 3], [2, 4]]  # image samples together, text-only together (as the sampler packs)
    with gates(lora_model, attn=0.0, mlp=0.7):
        ref_sum, ref_n, got_sum, got_n, _ = losses(lora_model, processor, dataset, rows)
    assert got_n == ref_n > 0
    torch.testing.assert_close(got_sum, ref_sum, rtol=1e-5, atol=0)


def test_packed_loss_equals_unpacked_with_images_routed_per_sample(lora_model, processor, dataset):
    rows = [[0, 2, 1], [3, 4]]  # mixed rows: image, text-only, two-image sample
    with gates(lora_model, attn=0.9, mlp=0.7), reference_row_masking(lora_model):
        ref_sum, ref_n, got_sum, got_n, batch = losses(lora_model, processor, dataset, rows)
        assert got_n == ref_n
        torch.testing.assert_close(got_sum, ref_sum, rtol=1e-5, atol=0)
        # control: the same row with its images handed to the wrong samples gives another loss
        swapped = {k: v for k, v in batch.items() if k not in ("token_mask", "samples_per_row")}
        swapped["pixel_values"] = batch["pixel_values"][:, [2, 0, 1]]
        swapped["aspect_ratio_ids"] = batch["aspect_ratio_ids"][:, [2, 0, 1]]
        swapped["aspect_ratio_mask"] = batch["aspect_ratio_mask"][:, [2, 0, 1]]
        with torch.no_grad():
            wrong, _ = ChunkedLossModel(lora_model)(**swapped)
    assert not torch.allclose(wrong, got_sum, rtol=1e-5, atol=0)  # moves by more than the parity tolerance


def test_llava_packed_loss_equals_unpacked_loss(tiny_llava, shapes):
    from cotune.models.families import LLAVA
    from cotune.models.load import load_processor

    processor = load_processor(tiny_llava)
    per_image = LLAVA.tokens_per_image(processor)
    pngs = sorted(shapes["images"].glob("train_*.png"))

    def enc(turns, images):
        ids, labels = tokenize_conversation(
            processor, conversation_to_messages(turns, len(images)), LLAVA.image_token, per_image
        )
        return Encoded(ids, labels, [str(p) for p in images], "s", "s:1")

    ds = SFTDataset(
        [
            enc([("user", "<image>\nWhat?"), ("assistant", "A red circle.")], pngs[:1]),
            enc([("user", "<image> and <image>?"), ("assistant", "The second.")], pngs[1:3]),
            enc([("user", "Hi"), ("assistant", "hello")], []),
        ],
        processor,
        LLAVA,
    )
    peft = random_lora(tiny_llava, seed=0, std=0.05)
    tok, loss_model = processor.tokenizer, ChunkedLossModel(peft.eval())
    image_id = LLAVA.image_token_id(tok)
    with torch.no_grad():
        ref = [loss_model(**PaddingCollator(tok.pad_token_id, LLAVA, image_id)([ds[i]])) for i in range(3)]
        items = [ds[ItemKey(i, 0, r)] for r, row in enumerate([[0, 2], [1]]) for i in row]
        batch = PackingCollator(tok.pad_token_id, LLAVA, image_id)(items)
        got, n = loss_model(**{k: v for k, v in batch.items() if k not in ("token_mask", "samples_per_row")})
    assert int(n) == sum(int(k) for _, k in ref)
    torch.testing.assert_close(got, sum(s for s, _ in ref), rtol=1e-5, atol=0)


def test_swapping_two_samples_images_within_a_pack_changes_exactly_their_losses(
    lora_model, processor, shapes
):
    import dataclasses

    from cotune.eval.evaluate import label_token_losses

    pngs = sorted(shapes["images"].glob("train_*.png"))
    turns = [("user", "<image>\nWhat colour is it?"), ("assistant", "It is red, I think.")]
    enc = [encode(processor, turns, pngs[k : k + 1], f"s{k}") for k in range(3)]

    def per_sample_losses(encoded):
        ds = SFTDataset(encoded, processor, MLLAMA)
        batch = packed(processor, ds, [[0, 1, 2]])
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "token_mask", "samples_per_row")}
        with torch.no_grad():
            losses = label_token_losses(lora_model, inputs, batch["labels"])[0]
        bounds = [0, *itertools.accumulate(len(e.input_ids) for e in encoded)]
        return torch.stack([losses[a:b].sum() for a, b in zip(bounds, bounds[1:])])

    before = per_sample_losses(enc)
    swapped = [
        dataclasses.replace(enc[0], images=enc[2].images),
        enc[1],
        dataclasses.replace(enc[2], images=enc[0].images),
    ]
    after = per_sample_losses(swapped)
    change = (after - before).abs() / before
    assert change[0] > 2e-5 and change[2] > 2e-5, change
    torch.testing.assert_close(after[1], before[1], rtol=1e-6, atol=0)
