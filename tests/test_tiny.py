"""Tests for cotune.demo.tiny: Llama 3 id layout, chat template, and loading via the Auto classes."""

import hashlib
import math
from datetime import datetime

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from cotune.demo.tiny import build_tiny_llava, build_tiny_mllama, build_tiny_tokenizer

SPECIAL_IDS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|reserved_special_token_0|>": 128002,
    "<|reserved_special_token_1|>": 128003,
    "<|finetune_right_pad_id|>": 128004,
    "<|reserved_special_token_2|>": 128005,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
    "<|reserved_special_token_3|>": 128011,
    "<|reserved_special_token_247|>": 128255,
    "<|image|>": 128256,
}

IMAGE_CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "There are 3 red circles."}]},
    {"role": "user", "content": [{"type": "text", "text": " And blue ones? "}]},
    {"role": "assistant", "content": "None."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def mllama_dir(tmp_path_factory):
    return build_tiny_mllama(tmp_path_factory.mktemp("tiny_mllama"), seed=0)


@pytest.fixture(scope="module")
def processor(mllama_dir):
    return AutoProcessor.from_pretrained(mllama_dir)


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_special_token_ids_match_llama3(tokenizer):
    for token, token_id in SPECIAL_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id], token
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert ids == (128000, 128009, 128004)
    assert tokenizer.vocab_size == 128000
    assert len(tokenizer) == 128257


def test_header_words_and_assistant_header_ids(tokenizer):
    assert tokenizer("system", add_special_tokens=False).input_ids == [9125]
    assert tokenizer("user", add_special_tokens=False).input_ids == [882]
    assert tokenizer("assistant", add_special_tokens=False).input_ids == [78191]
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tokenizer(header, add_special_tokens=False).input_ids == [128006, 78191, 128007, 271]
    user = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert tokenizer(user, add_special_tokens=False).input_ids[:4] == [128006, 882, 128007, 271]


def test_bos_added_once_only_with_special_tokens(tokenizer):
    with_bos = tokenizer("How many stars are there?").input_ids
    without = tokenizer("How many stars are there?", add_special_tokens=False).input_ids
    assert with_bos == [128000, *without]
    assert 128000 not in without
    assert tokenizer("<|begin_of_text|>Hi", add_special_tokens=False).input_ids.count(128000) == 1


def test_learned_vocabulary_is_a_few_thousand_tokens(tokenizer):
    learned = [t for t in tokenizer.get_vocab() if not t.startswith(("<|tiny_unused_", "<|reserved_special"))]
    assert 2000 < len(learned) < 10000
    for word in ["The", " image", " shows", " circles", " purple", " triangle", "<SUMMARY", " answer"]:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


@pytest.mark.parametrize(
    "text",
    [
        "",
        "The image shows 3 red circles.",
        "  leading and trailing spaces  ",
        "tabs\tand\r\nwindows\nnewlines\n\n\n",
        "Ünïcödé, 日本語, emoji 🙂🚀 and combining é",
        "<SUMMARY>x</SUMMARY>\n<CONCLUSION> 42 </CONCLUSION>",
        "code: def f(x):\n    return x ** 2  # 12345678",
        "unicode\u00a0nbsp and zero\u200bwidth",
    ],
)
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_special_tokens_round_trip_and_offsets(tokenizer):
    text = "<|start_header_id|>user<|end_header_id|>\n\nHow many?<|eot_id|>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    enc = tokenizer("The image shows 3 red stars.", add_special_tokens=False, return_offsets_mapping=True)
    pieces = ["The image shows 3 red stars."[a:b] for a, b in enc.offset_mapping]
    assert "".join(pieces) == "The image shows 3 red stars."


def test_same_seed_gives_identical_weights(tmp_path, mllama_dir):
    again = build_tiny_mllama(tmp_path / "again", seed=0)
    other = build_tiny_mllama(tmp_path / "other", seed=1)
    weights = _sha256(mllama_dir / "model.safetensors")
    assert _sha256(again / "model.safetensors") == weights
    assert _sha256(other / "model.safetensors") != weights
    assert _sha256(again / "tokenizer.json") == _sha256(mllama_dir / "tokenizer.json")


def test_auto_classes_load_and_forward_with_image(mllama_dir, processor):
    assert type(processor).__name__ == "MllamaProcessor"
    assert type(processor.image_processor).__name__.endswith("Pil")  # no torchvision needed
    assert AutoTokenizer.from_pretrained(mllama_dir).convert_tokens_to_ids("<|image|>") == 128256
    model = AutoModelForImageTextToText.from_pretrained(mllama_dir)
    assert type(model).__name__ == "MllamaForConditionalGeneration"
    assert model.generation_config.eos_token_id == [128001, 128008, 128009]
    assert model.generation_config.pad_token_id == 128004
    assert model.get_input_embeddings().num_embeddings == 128256 + 8

    images = [[Image.new("RGB", (48, 32), (255, 0, 0))], [Image.new("RGB", (20, 70), (0, 0, 255))]]
    texts = ["<|image|>How many red circles are there? 3", "<|image|>What colour is the star? blue"]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape[:3] == (2, 1, 4)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == 128256, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    loss = model(**inputs, labels=labels).loss
    assert math.isfinite(loss.item())
    loss.backward()


def test_chat_text_tokenized_without_special_tokens_has_one_bos(processor):
    text = processor.apply_chat_template(IMAGE_CONVERSATION[:2], tokenize=False)
    inputs = processor(images=[[Image.new("RGB", (32, 32))]], text=[text], add_special_tokens=False)
    ids = inputs["input_ids"][0]
    assert ids[:7] == [128000, 128006, 882, 128007, 271, 128256, ids[6]]
    assert ids.count(128000) == 1
    assert ids[-1] == 128009


def test_chat_template_image_conversation(processor):
    expected = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>How many red circles?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThere are 3 red circles.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n And blue ones? <|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nNone.<|eot_id|>"
    )
    assert processor.apply_chat_template(IMAGE_CONVERSATION, tokenize=False) == expected
    prompt = processor.apply_chat_template(IMAGE_CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_template_text_only_with_system_prompt(processor):
    messages = [
        {"role": "system", "content": "  You are a careful counter.\n"},
        {"role": "user", "content": "How many sides has a square?"},
        {"role": "assistant", "content": "Four."},
    ]
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are a careful counter.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow many sides has a square?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nFour.<|eot_id|>"
    )
    assert processor.apply_chat_template(messages, tokenize=False, date_string="26 Jul 2024") == expected
    today = datetime.now().strftime("%d %b %Y")
    no_system = processor.apply_chat_template(messages[1:], tokenize=False)
    assert no_system.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"Cutting Knowledge Date: December 2023\nToday Date: {today}\n\n<|eot_id|>"
    )


def test_chat_template_rejects_system_prompt_with_images(processor):
    messages = [{"role": "system", "content": "Be brief."}, *IMAGE_CONVERSATION]
    with pytest.raises(Exception, match="incompatible with system messages"):
        processor.apply_chat_template(messages, tokenize=False)


def test_tiny_llava_forward(tmp_path):
    path = build_tiny_llava(tmp_path / "llava", seed=0)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    image_token_id = model.config.image_token_index
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_token_id == 128257
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>What")
    inputs = processor(
        text=[text + "Red."], images=[Image.new("RGB", (40, 30), (255, 0, 0))], return_tensors="pt"
    )
    assert (inputs["input_ids"] == image_token_id).sum().item() == 16
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == image_token_id, -100)
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    assert math.isfinite(loss.item())


# ----------------------------------------------------------------------------- the tiny model sees


def _answer_logits(model, processor, image):
    """Next-token logits after a question about ``image``, with the text fixed."""
    text = "<|image|>What colour is the shape?"
    inputs = processor(images=[[image]], text=[text], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0, -1]


def test_gates_are_open_as_in_a_trained_checkpoint(mllama_dir):
    from cotune.demo.tiny import MLLAMA_GATES

    model = AutoModelForImageTextToText.from_pretrained(mllama_dir)
    gates = {n: p for n, p in model.named_parameters() if MLLAMA_GATES.fullmatch(n)}
    kinds = {n.rsplit(".", 1)[-1] for n in gates}
    assert {"cross_attn_attn_gate", "cross_attn_mlp_gate", "gate", "gate_attn", "gate_ffn"} <= kinds
    for name, gate in gates.items():  # a fresh transformers model has every one of them at 0
        assert torch.tanh(gate).abs().min() > 0.5, name


def test_logits_change_with_the_pixels_and_not_with_gates_shut(mllama_dir, processor):
    model = AutoModelForImageTextToText.from_pretrained(mllama_dir).eval()
    red, blue = Image.new("RGB", (64, 64), (220, 40, 40)), Image.new("RGB", (64, 64), (40, 80, 220))
    same = _answer_logits(model, processor, red) - _answer_logits(model, processor, red.copy())
    differ = _answer_logits(model, processor, red) - _answer_logits(model, processor, blue)
    assert same.abs().max() == 0
    assert differ.abs().max() > 0.05 * _answer_logits(model, processor, red).std()
    # the control: with the cross-attention gates at 0 (a random model as transformers builds it), the
    # image cannot reach the text, and this test's main assertion would fail
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cross_attn_attn_gate" in name or "cross_attn_mlp_gate" in name:
                p.zero_()
    shut = _answer_logits(model, processor, red) - _answer_logits(model, processor, blue)
    assert shut.abs().max() < 1e-5
