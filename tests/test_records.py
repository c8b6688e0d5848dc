"""Bad input: every problem is reported with file:line and reason; skip trains on the rest."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from cotune.data.records import DataError, load_samples, report_problems, split_train_test

GOOD = {"conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}


def planted(tmp_path):
    """A JSONL file whose lines 2-10 are each broken in one way; lines 1 and 11 are fine."""
    Image.new("RGB", (40, 30), "red").save(tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    lines = [
        json.dumps({"id": "good-1", "image": "ok.png", **GOOD}),
        json.dumps({"id": "missing", "image": "nope.png", **GOOD}),
        json.dumps({"id": "empty", "image": "empty.png", **GOOD}),
        json.dumps({"id": "corrupt", "image": "corrupt.png", **GOOD}),
        '{"id": "broken json", ',
        json.dumps({"id": "noconv", "image": "ok.png"}),
        json.dumps(
            {
                "id": "reply-first",
                "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}],
            }
        ),
        json.dumps(
            {
                "id": "nonstring",
                "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "A"}],
            }
        ),
        json.dumps(
            {
                "id": "emptyvalue",
                "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}],
            }
        ),
        json.dumps(["not", "an", "object"]),
        json.dumps({"id": "good-2", "image": "ok.png", **GOOD}),
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


EXPECTED = {
    "train.jsonl:2": "image '.*nope.png' not found",
    "train.jsonl:3": "empty file",
    "train.jsonl:4": "cannot be decoded",
    "train.jsonl:5": "invalid JSON",
    "train.jsonl:6": "no 'conversations' field",
    "train.jsonl:7": "reply before any question",
    "train.jsonl:8": "'value' is int, not a string",
    "train.jsonl:9": "'value' is empty",
    "train.jsonl:10": "expected a JSON object",
}


def test_every_planted_problem_is_located_and_explained(tmp_path):
    samples, problems = load_samples(planted(tmp_path))
    assert [s.id for s in samples] == ["good-1", "good-2"]
    assert [p.where for p in problems] == list(EXPECTED)
    for p in problems:
        assert re.search(EXPECTED[p.where], p.reason), str(p)


def test_raise_lists_every_problem_before_training(tmp_path):
    samples, problems = load_samples(planted(tmp_path))
    with pytest.raises(DataError) as err:
        report_problems(problems, "raise", total=11)
    text = str(err.value)
    assert "9 of 11 records are unusable" in text
    for where in EXPECTED:
        assert where in text


def test_skip_reports_count_and_reasons(tmp_path):
    _, problems = load_samples(planted(tmp_path))
    lines = []
    report_problems(problems, "skip", total=11, log=lines.append)
    assert lines and lines[0].startswith("skipping 9 of 11 records") and "train.jsonl:4" in lines[0]


def test_split_is_deterministic_and_disjoint(tmp_path):
    samples, _ = load_samples(planted(tmp_path))
    samples = samples * 10
    for i, s in enumerate(samples):
        samples[i] = type(s)(id=f"s{i}", messages=s.messages, images=s.images, where=s.where)
    train, test = split_train_test(samples, 0.2, seed=3)
    train2, test2 = split_train_test(samples, 0.2, seed=3)
    assert [s.id for s in test] == [s.id for s in test2] and len(test) == 4
    assert not {s.id for s in train} & {s.id for s in test}
    assert len(train) + len(test) == len(samples)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_samples(tmp_path / "nothere.jsonl")


def test_header_check_is_fast_path_and_training_still_skips_a_cut_short_image(tmp_path, tiny_mllama):
    """`data.image_check: header` finds what a header shows; a file cut short is left to training, which
    skips it instead of crashing."""
    import io

    from cotune.data.batching import PaddingCollator
    from cotune.data.dataset import SFTDataset, encode_samples
    from cotune.models.load import load_base_model, load_processor

    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header intact
    Image.new("RGB", (40, 30), "red").save(tmp_path / "ok.png")
    Image.new("RGB", (5000, 10), "red").save(tmp_path / "thin.png")
    rows = [("ok", "ok.png"), ("cut", "cut.png"), ("missing", "nope.png"), ("thin", "thin.png")]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"id": i, "image": img, **GOOD}) + "\n" for i, img in rows))

    full, full_problems = load_samples(path)
    assert [s.id for s in full] == ["ok"]
    assert [p.where for p in full_problems] == ["train.jsonl:2", "train.jsonl:3", "train.jsonl:4"]
    fast, fast_problems = load_samples(path, image_check="header")
    assert [s.id for s in fast] == ["ok", "cut"]  # the cut-short file passes its header check
    assert [p.where for p in fast_problems] == ["train.jsonl:3", "train.jsonl:4"]
    with pytest.raises(ValueError, match="image_check"):
        load_samples(path, image_check="quick")

    processor = load_processor(tiny_mllama)
    _, family = load_base_model(tiny_mllama)
    encoded, _, _ = encode_samples(fast, processor, family, 512, "drop")
    dataset = SFTDataset(encoded, processor, family)
    batch = PaddingCollator(
        processor.tokenizer.pad_token_id, family, family.image_token_id(processor.tokenizer)
    )([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 1 and "cannot be decoded" in batch["skipped"][0]
