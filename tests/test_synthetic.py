"""Tests for the bundled synthetic LLaVA-CoT shapes dataset."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cotune.demo.synthetic import COLOURS, POSITIONS, SHAPES, TASKS, make_sample, write_synthetic_dataset

TAGS = ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION")
FOUR_STAGE = re.compile(
    r"<SUMMARY> (.+) </SUMMARY>\n\n<CAPTION> (.+) </CAPTION>\n\n"
    r"<REASONING> (.+) </REASONING>\n\n<CONCLUSION> (.+) </CONCLUSION>"
)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _samples(n: int, seed: int = 0, image_size: int = 64):
    rng = random.Random(seed)
    return [make_sample(rng, i, image_size) for i in range(1, n + 1)]


def _chosen_option(question: str, letter: str) -> str:
    match = re.search(rf"^{letter}\. (.+)$", question, flags=re.MULTILINE)
    assert match, f"option {letter} not in {question!r}"
    return match.group(1)


def _subject(question: str, names) -> str:
    """The one shape or colour name that the question itself (before any options) mentions."""
    stem = question.split("\nOptions:")[0]
    found = [name for name in names if re.search(rf"\b{name}\b", stem)]
    assert len(found) == 1, (stem, found)
    return found[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_synthetic_dataset(tmp_path_factory.mktemp("shapes"), n_train=60, n_test=20, seed=0)


def test_write_returns_paths_and_counts(dataset: dict[str, Path]) -> None:
    assert dataset["train"].name == "train.jsonl" and dataset["test"].name == "test.jsonl"
    assert dataset["images"] == dataset["train"].parent / "images"
    assert len(_read_jsonl(dataset["train"])) == 60
    assert len(_read_jsonl(dataset["test"])) == 20
    assert len(list(dataset["images"].glob("*.png"))) == 80


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "a", n_train=30, n_test=10, seed=3)
    write_synthetic_dataset(tmp_path / "b", n_train=30, n_test=10, seed=3)
    write_synthetic_dataset(tmp_path / "c", n_train=30, n_test=10, seed=4)
    a, b, c = (_all_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["train.jsonl"] != c["train.jsonl"]
    assert any(a[k] != c[k] for k in a if k.endswith(".png"))


def test_records_have_llava_cot_structure(dataset: dict[str, Path]) -> None:
    root = dataset["train"].parent
    for split in ("train", "test"):
        for n, record in enumerate(_read_jsonl(dataset[split]), start=1):
            assert record["id"] == f"shapes-{split}-{n:05d}"
            assert record["image"] == f"images/{split}_{n:05d}.png"
            assert (root / record["image"]).is_file()
            turns = record["conversations"]
            assert len(turns) in (2, 4)
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert all("<image>" not in t["value"] for t in turns[1:])
            assert isinstance(record["answer"], str) and record["answer"]
            assert record["meta"]["task"] in TASKS


def test_gpt_answers_have_four_stages_once_in_order() -> None:
    for _, record in _samples(200):
        for turn in record["conversations"][1::2]:
            text = turn["value"]
            for tag in TAGS:
                assert text.count(f"<{tag}>") == 1 and text.count(f"</{tag}>") == 1, text
            assert FOUR_STAGE.fullmatch(text), text
            assert 40 <= len(text.split()) <= 110, text
        conclusion = FOUR_STAGE.fullmatch(record["conversations"][1]["value"]).group(4)
        assert conclusion == record["answer"]


def test_follow_up_turns_and_multiple_choice_occur() -> None:
    records = [r for _, r in _samples(400)]
    follow_ups = sum(len(r["conversations"]) == 4 for r in records)
    assert 15 <= follow_ups <= 70  # about 10%
    multiple_choice = [r for r in records if r["answer"] in ("A", "B", "C", "D")]
    assert multiple_choice
    for record in multiple_choice:
        question = record["conversations"][0]["value"]
        assert all(f"\n{letter}. " in question for letter in "ABCD")


def test_answers_match_the_scene() -> None:
    for _, record in _samples(300):
        meta, question = record["meta"], record["conversations"][0]["value"]
        answer = record["answer"]
        if answer in ("A", "B", "C", "D"):
            answer = _chosen_option(question, answer)
        shapes = meta["shapes"]
        by_shape = {s["shape"]: s for s in shapes}
        by_colour = {s["colour"]: s for s in shapes}
        if meta["task"] == "count":
            assert answer == str(len(shapes))
        elif meta["task"] == "colour":
            assert by_shape[_subject(question, SHAPES)]["colour"] == answer
        elif meta["task"] == "shape":
            assert by_colour[_subject(question, COLOURS)]["shape"] == answer
        elif meta["task"] == "position":
            assert answer in POSITIONS
            assert by_colour[_subject(question, COLOURS)]["position"] == answer
        else:
            asked = _subject(question, SHAPES)
            assert answer == ("yes" if asked in by_shape else "no")


def test_count_answers_match_coloured_pixels() -> None:
    for image, record in _samples(120):
        pixels = np.asarray(image).reshape(-1, 3)
        drawn = {name for name, rgb in COLOURS.items() if (pixels == rgb).all(axis=1).sum() >= 10}
        assert drawn == {s["colour"] for s in record["meta"]["shapes"]}
        if record["meta"]["task"] == "count" and record["answer"].isdigit():
            assert int(record["answer"]) == len(drawn)


def test_images_are_rgb_of_the_given_size(tmp_path: Path) -> None:
    paths = write_synthetic_dataset(tmp_path, n_train=5, n_test=3, image_size=48)
    for split in ("train", "test"):
        for record in _read_jsonl(paths[split]):
            with Image.open(tmp_path / record["image"]) as image:
                assert image.format == "PNG" and image.mode == "RGB" and image.size == (48, 48)


def test_train_and_test_are_disjoint(dataset: dict[str, Path]) -> None:
    train, test = _read_jsonl(dataset["train"]), _read_jsonl(dataset["test"])
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert not {r["image"] for r in train} & {r["image"] for r in test}
    # Different RNG streams: the splits' contents differ, not just their names.
    assert [(r["meta"], r["conversations"]) for r in train[:20]] != [
        (r["meta"], r["conversations"]) for r in test
    ]


def test_make_sample_is_pure() -> None:
    image_a, record_a = make_sample(random.Random(7), 3, 32, split="test")
    image_b, record_b = make_sample(random.Random(7), 3, 32, split="test")
    assert record_a == record_b and image_a.tobytes() == image_b.tobytes()
    assert record_a["id"] == "shapes-test-00003" and image_a.size == (32, 32)
