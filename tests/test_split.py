"""Held-out splits: `data.split_by` never puts one group on both sides and keeps the answers' shares;
`cotune data check` finds pictures of the held-out side that nearly repeat a training picture."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import pytest
from PIL import Image

from cotune.data.records import split_train_test
from cotune.data.sample import DataError, Sample
from cotune.data.split import class_balance, near_duplicates, split_for_training, split_grouped
from test_sources import circle


def patients(n_patients: int = 40, seed: int = 0) -> list[Sample]:
    """1-6 slices per patient, all with the patient's diagnosis; a third of the patients sick."""
    rng, samples = random.Random(seed), []
    for p in range(n_patients):
        answer = "nodule" if p % 3 == 0 else "normal"
        for k in range(rng.randint(1, 6)):
            samples.append(Sample(f"p{p}-{k}", [], where=f"d.jsonl:{len(samples) + 1}",
                                  meta={"answer": answer, "patient_id": f"P{p}"}))  # fmt: skip
    return samples


@pytest.mark.parametrize("seed", range(8))
def test_a_grouped_split_keeps_every_patient_on_one_side_and_the_classes_shares(seed):
    samples = patients(seed=seed)
    train, test = split_grouped(samples, 0.25, seed, "patient_id")
    assert sorted(s.id for s in train + test) == sorted(s.id for s in samples)
    sides = {s.meta["patient_id"] for s in train}, {s.meta["patient_id"] for s in test}
    assert sides[0] and sides[1] and not sides[0] & sides[1]
    for answer, n in Counter(s.meta["answer"] for s in samples).items():
        held = sum(s.meta["answer"] == answer for s in test)
        assert abs(held - 0.25 * n) <= 6, (answer, held, n)  # within one group of its share
    assert split_grouped(samples, 0.25, seed, "patient_id") == (train, test)  # seeded


def test_without_a_key_the_split_is_as_before_and_a_missing_key_is_named(capsys):
    samples = patients()
    assert split_for_training(samples, 0.2, 3) == split_train_test(samples, 0.2, 3)
    split_for_training(samples, 0.2, 3, "patient_id")
    printed = capsys.readouterr().out
    assert printed.startswith("train: ") and "groups of patient_id" in printed and "nodule" in printed
    with pytest.raises(DataError, match=r"d.jsonl:1: no field 'device'"):
        split_grouped(samples, 0.2, 3, "device")
    assert "held out: 1 records" in class_balance(samples[:1], samples[1:2])


def _jpeg(image: Image.Image, size: int, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.resize((size, size), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_near_duplicates_are_recompressed_copies_not_other_pictures(tmp_path):
    rng = random.Random(0)
    photos = [_noise(rng) for _ in range(6)]
    train = [Sample(f"t{k}", [], [p], where=f"train:{k}") for k, p in enumerate(photos)]
    test = [
        Sample("copy", [], [_jpeg(photos[2], 96, 70)], where="test:1"),  # resized and JPEG'd
        Sample("other", [], [_noise(random.Random(99))], where="test:2"),
        Sample("blue", [], [circle("blue")], where="test:3"),
    ]
    train.append(Sample("red", [], [circle("red")], where="train:red"))  # same outline, other colour
    pairs = near_duplicates(train, test)
    assert [(a.id, b.id) for a, b, _ in pairs] == [("t2", "copy")] and pairs[0][2] <= 4


def _noise(rng: random.Random) -> Image.Image:
    """A smooth random picture (blobs), as photos are: dHash is for pictures, not white noise."""
    small = Image.frombytes("RGB", (6, 6), bytes(rng.randrange(256) for _ in range(6 * 6 * 3)))
    return small.resize((64, 64), Image.Resampling.BICUBIC)


def test_data_check_reports_the_split_and_the_copies_across_it(tmp_path):
    from cotune.cli import main

    (tmp_path / "img").mkdir()
    rng, lines = random.Random(1), []
    for k in range(12):
        _noise(rng).save(tmp_path / "img" / f"{k}.png")
        lines.append({"id": f"r{k}", "image": f"img/{k}.png", "answer": "yes" if k % 2 else "no", "serial": f"S{k // 2}",
                      "conversations": [{"from": "human", "value": "<image>\nOK?"}, {"from": "gpt", "value": "yes"}]})  # fmt: skip
    (tmp_path / "img" / "dup.jpg").write_bytes(_jpeg(Image.open(tmp_path / "img" / "0.png"), 64, 80))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    test = dict(lines[0], id="t0", image="img/dup.jpg")
    (tmp_path / "test.jsonl").write_text(json.dumps(test) + "\n")
    out = []
    from cotune.data.check import run_data_command

    assert (
        run_data_command(
            ["check", str(tmp_path / "train.jsonl"), "--test_file", str(tmp_path / "test.jsonl")],
            log=out.append,
        )
        == 0
    )
    text = "\n".join(out)
    assert "near-duplicate pictures across the sides: 1" in text
    assert "test.jsonl:1: image nearly the same as training record train.jsonl:1" in text
    out.clear()
    run_data_command(
        ["check", str(tmp_path / "train.jsonl"), "--split_by", "serial", "--test_split_ratio", "0.3"],
        log=out.append,
    )
    text = "\n".join(out)
    assert "grouped by serial" in text and "groups of serial" in text and "across the sides: 0" in text
    assert main(["data", "check", str(tmp_path / "train.jsonl"), "--split_by", "nope"]) == 2
