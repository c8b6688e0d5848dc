"""The model family's contract with the rest of cotune: the inputs its forward takes."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from transformers import AutoConfig, LlavaForConditionalGeneration, MllamaForConditionalGeneration

from cotune.data.batching import PackingCollator, PaddingCollator
from cotune.data.dataset import SFTDataset, encode_samples
from cotune.data.records import load_samples
from cotune.models.families import DUMMY_PIXELS, LLAVA, MLLAMA
from cotune.models.load import load_base_model, load_processor
from cotune.train.loss import ChunkedLossModel

FAMILIES = [
    pytest.param(MLLAMA, MllamaForConditionalGeneration, "tiny_mllama", id="mllama"),
    pytest.param(LLAVA, LlavaForConditionalGeneration, "tiny_llava", id="llava"),
]


def _items(family, model_dir, shapes):
    processor = load_processor(model_dir)
    samples, _ = load_samples(shapes["train"])
    encoded, _, _ = encode_samples(samples[:2], processor, family, 1024)
    dataset = SFTDataset(encoded, processor, family)
    return processor.tokenizer, [dataset[0], dataset[1]]


@pytest.mark.parametrize("family, model_class, model_dir", FAMILIES)
def test_model_inputs_keep_every_batch_entry_the_forward_takes_and_nothing_else(
    family, model_class, model_dir, shapes, request
):
    tokenizer, items = _items(family, request.getfixturevalue(model_dir), shapes)
    forward_takes = set(inspect.signature(model_class.forward).parameters)
    assert set(family.input_keys) <= forward_takes
    for collator in (PaddingCollator, PackingCollator):
        batch = collator(tokenizer.pad_token_id, family, family.image_token_id(tokenizer))(items)
        inputs = family.model_inputs(batch)
        assert "pixel_values" in inputs and "labels" in inputs
        assert set(inputs) == set(batch) & forward_takes, collator.__name__


@pytest.mark.parametrize("family, model_class, model_dir", FAMILIES)
def test_a_batch_without_images_gets_dummy_images_only_when_asked(
    family, model_class, model_dir, shapes, request
):
    tokenizer, items = _items(family, request.getfixturevalue(model_dir), shapes)
    batch = PaddingCollator(tokenizer.pad_token_id, family, family.image_token_id(tokenizer))(items)
    text_only = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    assert family.model_inputs(text_only) == text_only
    config = AutoConfig.from_pretrained(request.getfixturevalue(model_dir))
    with_dummy = family.model_inputs(text_only, dummy_images_for=config)
    assert (DUMMY_PIXELS if family is LLAVA else "pixel_values") in with_dummy
    # a batch with images of its own keeps them
    assert family.model_inputs(batch, dummy_images_for=config).keys() == family.model_inputs(batch).keys()


def test_mllama_dummy_images_give_the_loss_of_the_same_row_in_a_batch_with_images(
    tiny_mllama, shapes, tmp_path
):
    """Several processes: a rank whose batch is text-only gets dummy images; its loss must be the one
    the same row has in one process's batch beside an image (the collator's empty image slot), which
    the distributed tests compare. The tiny model's cross-attention gates are open, so it can differ."""
    text_only = {
        "id": "text-only",
        "conversations": [
            {"from": "human", "value": "Which stages does an answer have?"},
            {"from": "gpt", "value": "<SUMMARY> I list them. </SUMMARY>\n\n<CONCLUSION> four </CONCLUSION>"},
        ],
    }
    first = shapes["train"].read_text().splitlines()[0]
    (tmp_path / "train.jsonl").write_text(first + "\n" + json.dumps(text_only) + "\n")
    processor = load_processor(tiny_mllama)
    samples, _ = load_samples(tmp_path / "train.jsonl", image_root=str(shapes["images"].parent))
    encoded, _, _ = encode_samples(samples, processor, MLLAMA, 1024)
    dataset = SFTDataset(encoded, processor, MLLAMA)
    tokenizer = processor.tokenizer
    collate = PaddingCollator(tokenizer.pad_token_id, MLLAMA, MLLAMA.image_token_id(tokenizer))
    mixed, alone = collate([dataset[0], dataset[1]]), collate([dataset[1]])
    assert "pixel_values" in mixed and "pixel_values" not in alone
    model, _ = load_base_model(tiny_mllama)
    loss_model = ChunkedLossModel(model, family=MLLAMA)
    with torch.no_grad():
        in_mixed, _ = loss_model(**MLLAMA.model_inputs({k: v[1:] for k, v in mixed.items()}))
        with_dummy, _ = loss_model(**MLLAMA.model_inputs(alone, dummy_images_for=model.config))
        text_alone, _ = loss_model(**MLLAMA.model_inputs(alone))
    torch.testing.assert_close(with_dummy, in_mixed)
    assert not torch.isclose(text_alone, in_mixed), "the gates are closed: this test checks nothing"
