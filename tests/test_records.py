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
