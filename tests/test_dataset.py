"""Encoding samples: only a record's own faults become record problems; cotune's bugs stay errors."""

from __future__ import annotations

import pytest
from PIL import Image

import cotune.data.dataset as dataset
from cotune.data.dataset import SFTDataset, encode_samples
from cotune.data.sample import Sample, conversation_to_messages
from cotune.models.families import MLLAMA


def sample(tmp_path, system_prompt: str = "", image: str = "ok.png") -> Sample:
    Image.new("RGB", (40, 30), "red").save(tmp_path / "ok.png")
    messages = conversation_to_messages(
        [("user", "<image>\nHow many shapes?"), ("assistant", "<CONCLUSION> 3 </CONCLUSION>")],
        n_images=1,
        system_prompt=system_prompt,
    )
    return Sample("s", messages, [str(tmp_path / image)], where="train.jsonl:1")


def test_a_record_the_template_refuses_is_a_record_problem(processor, tmp_path):
    # the Mllama template refuses a system message together with an image (raise_exception): the
    # record's own system turn makes the record a problem
    record = sample(tmp_path)
    record.messages.insert(0, {"role": "system", "content": [{"type": "text", "text": "Be brief."}]})
    encoded, problems, _ = encode_samples([record], processor, MLLAMA, 1024)
    assert encoded == [] and len(problems) == 1
    assert str(problems[0]).startswith("train.jsonl:1: cannot render with the chat template")


def test_a_system_prompt_option_the_template_refuses_is_one_error(processor, tmp_path):
    """data.system_prompt on image data: one error naming the option and the way out, before any record
    is skipped (not one line per record, then 'no usable training samples')."""
    from cotune.data.chat import SystemPromptRefused

    records = [sample(tmp_path, "Be brief.") for _ in range(3)]
    with pytest.raises(SystemPromptRefused, match=r"data\.system_prompt.*leave it empty"):
        encode_samples(records, processor, MLLAMA, 1024)


@pytest.mark.parametrize("error", [TypeError("a bug"), RuntimeError("a bug"), KeyError("a bug")])
def test_a_bug_while_encoding_propagates(processor, tmp_path, monkeypatch, error):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(dataset, "tokenize_conversation", broken)
    with pytest.raises(type(error), match="a bug"):
        encode_samples([sample(tmp_path)], processor, MLLAMA, 1024)


def test_a_bad_image_is_a_record_problem_and_a_bug_while_loading_propagates(processor, tmp_path, monkeypatch):
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    encoded, problems, _ = encode_samples(
        [sample(tmp_path), sample(tmp_path, image="cut.png")], processor, MLLAMA, 1024
    )
    assert problems == []  # the images are checked when the file is read, not here
    ds = SFTDataset(encoded, processor, MLLAMA)
    assert "pixel_values" in ds[0]
    assert ds[1]["error"].startswith("train.jsonl:1: image") and "cannot be decoded" in ds[1]["error"]

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(dataset, "load_image", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        ds[0]
