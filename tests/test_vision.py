"""The image path, tested where it matters: an adapter trained on a task only the picture answers
learns it from the picture, and `cotune eval --image_ablation` measures how much it relies on it.

These tests rest on the tiny model's open gates (tests/test_tiny.py checks them): with the gates
shut, no image reaches the text and every accuracy below would sit at chance for true and
shuffled images alike.
"""

from __future__ import annotations

import json

import pytest

from cotune.data.records import load_samples
from cotune.demo.synthetic import COLOURS
from cotune.eval.ablation import derangement, with_blank_images, with_shuffled_images


def test_derangement_never_keeps_a_sample_in_place():
    for n in range(2, 30):
        perm = derangement(n, seed=n)
        assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))
    assert derangement(7, seed=3) == derangement(7, seed=3)


def test_shuffled_and_blank_images_keep_each_prompt_and_its_image_count(shapes):
    samples, _ = load_samples(shapes["test"])
    shuffled = with_shuffled_images(samples, seed=0)
    assert [s.messages for s in shuffled] == [s.messages for s in samples]
    assert all(a.images != b.images and len(a.images) == len(b.images) for a, b in zip(samples, shuffled))
    assert sorted(str(i) for s in shuffled for i in s.images) == sorted(
        str(i) for s in samples for i in s.images
    )
    blank = with_blank_images(samples)
    image = blank[0].images[0]
    assert image.getextrema() == ((128, 128), (128, 128), (128, 128)) and image.size == (64, 64)


# colour_run: tests/conftest.py (a session fixture: `cotune data reason`'s end-to-end test uses it as a teacher)


@pytest.mark.slow
def test_adapter_trained_on_an_image_only_task_reads_the_picture(tiny_mllama, colour_run, tmp_path):
    from cotune.cli import main

    result, data = colour_run
    out = tmp_path / "eval"
    rc = main(
        ["eval", "--model_name", str(tiny_mllama), "--adapter", f"colour={result.adapter_dir}",
         "--data", str(data["test"]), "--image_ablation", "--output_dir", str(out), "--max_new_tokens", "120",
         "--batch_size", "16"]
    )  # fmt: skip
    assert rc == 0
    figures = json.loads((out / "eval.json").read_text())["models"]
    adapter, base = figures["colour"], figures["none"]
    chance = 1 / len(COLOURS)
    assert adapter["accuracy"] >= 0.6, adapter["accuracy"]
    assert adapter["accuracy_shuffled_images"] <= chance + 0.15
    assert adapter["accuracy_blank_images"] <= chance + 0.15
    assert adapter["image_reliance"] >= 0.4
    # the answer's loss says the same: the right colour is much less likely under another picture
    assert adapter["conclusion_loss_shuffled_images"] > adapter["conclusion_loss"] + 1.0
    assert base["accuracy"] == 0 and base["format_rate"] == 0  # the base has learned nothing of the task
    table = (out / "eval.md").read_text()
    assert "image reliance (true - shuffled)" in table and "accuracy, shuffled images" in table
    assert "task: colour" in table
