"""The model family's contract with the rest of cotune: the inputs its forward takes."""

from __future__ import annotations

import inspect

import pytest
from transformers import AutoConfig, LlavaForConditionalGeneration, MllamaForConditionalGeneration

from cotune.data.batching import PackingCollator, PaddingCollator
from cotune.data.dataset import SFTDataset, encode_samples
from cotune.data.records import load_samples
from cotune.models.families import DUMMY_PIXELS, LLAVA, MLLAMA
from cotune.models.load import load_processor

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
