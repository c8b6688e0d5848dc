"""``cotune data check`` lists every planted problem and exits 1; training skips exactly those."""

from __future__ import annotations

import json
import re

import numpy as np
from PIL import Image

from cotune.cli import main
from cotune.config import load_config
from cotune.data.check import run_data_command, stage_problem
from cotune.train.loop import finetune

COT = "<SUMMARY> s </SUMMARY> <CAPTION> c </CAPTION> <REASONING> r </REASONING> <CONCLUSION> {} </CONCLUSION>"


def record(rid, answer=None, image="ok.png", question="<image>\nWhat colour?"):
    answer = answer if answer is not None else COT.format("red")
    obj = {
        "id": rid,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }
    if image:
        obj["image"] = image
    return json.dumps(obj)


def planted(tmp_path):
    """Lines 3, 5, 6, 7, 9 and 10 are unusable; line 8 trains but breaks the four-stage format."""
    Image.new("RGB", (40, 30), "red").save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    lines = [
        record("good-1"),
        record("good-2"),
        record("missing", image="nope.png"),
        record("good-3"),
        record("corrupt", image="corrupt.png"),
        '{"id": "broken json", ',
        record("escape", image="../../etc/passwd"),
        record(
            "no-caption",
            answer="<SUMMARY> s </SUMMARY> <REASONING> r </REASONING> <CONCLUSION> x </CONCLUSION>",
        ),
        record("too-long", answer=COT.format(" ".join(["long"] * 300))),
        record("two-markers", question="<image> <image> which?"),
        record("good-4"),
        record("good-5"),
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


SKIPPED = {
    "train.jsonl:3": "image '.*nope.png' not found",
    "train.jsonl:5": "cannot be decoded",
    "train.jsonl:6": "invalid JSON",
    "train.jsonl:7": "escapes the image root",
    "train.jsonl:9": r"tokens > max_seq_len=200",
    "train.jsonl:10": "2 '<image>' markers but 1 images",
}


def check(path, *extra):
    out = []
    code = run_data_command(["check", str(path), *extra], log=out.append)
    return code, "\n".join(out)


def listed(text, section):
    """The file:line of every entry of a section of the report."""
    if section not in text:
        return []
    body = text.split(section, 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^  (train\.jsonl:\d+): ", body, flags=re.M)


def test_check_lists_each_problem_then_training_skips_exactly_those(tiny_mllama, tmp_path):
    path = planted(tmp_path)
    code, text = check(path, "--model_name", str(tiny_mllama), "--data.max_seq_len", "200")
    assert code == 1 and "result: FAIL" in text
    assert listed(text, "problems (") == list(SKIPPED)
    for where, reason in SKIPPED.items():
        assert re.search(rf"{where}: .*{reason}", text), (where, text)
    # every record shows the same picture: the held-out ones are reported as near-duplicates (data/split.py)
    duplicates = re.findall(r"^  (train\.jsonl:\d+): image nearly the same", text, flags=re.M)
    assert duplicates and "near-duplicate pictures across the sides: " in text
    assert [w for w in listed(text, "warnings (") if w not in duplicates] == ["train.jsonl:8"]
    assert "missing <CAPTION>" in text
    assert re.search(r"records\s+12\b", text) and re.search(r"usable\s+6\b", text)
    assert "records/s" in text and "p95" in text and "label tokens" in text

    logs = []
    cfg = load_config(
        None,
        [
            ("model_name", str(tiny_mllama)),
            ("dataset", str(path)),
            ("output_dir", str(tmp_path / "run")),
            ("data.max_seq_len", "200"),
            ("max_train_step", "1"),
            ("batch_size_training", "2"),
            ("run_validation", "False"),
            ("save_model", "False"),
            ("progress", "False"),
        ],
    )
    assert finetune(cfg, log=logs.append).steps == 1
    report = next(line for line in logs if line.startswith("skipping"))
    assert report.startswith(f"skipping {len(SKIPPED)} of 12 records")
    assert sorted(re.findall(r"(train\.jsonl:\d+):", report)) == sorted(SKIPPED)


def test_without_a_model_tokens_are_not_checked_and_clean_data_passes(tmp_path, shapes):
    code, text = check(planted(tmp_path))
    assert code == 1 and "not checked (give --model_name" in text
    assert listed(text, "problems (") == [w for w in SKIPPED if w != "train.jsonl:9"]
    code = main(["data", "check", str(shapes["train"])])
    assert code == 0


def test_stage_problems():
    assert stage_problem(COT.format("x")) is None
    assert stage_problem("<SUMMARY> a </SUMMARY>") == "missing <CAPTION>, <REASONING>, <CONCLUSION>"
    swapped = "<CAPTION> c </CAPTION> <SUMMARY> s </SUMMARY> <REASONING> r </REASONING> <CONCLUSION> x </CONCLUSION>"
    assert stage_problem(swapped).startswith("stages out of order: <CAPTION> <SUMMARY>")
    assert stage_problem(COT.format(" ")) == "empty <CONCLUSION>"


def test_preview_grid_shows_augmented_images(tmp_path, shapes):
    out = tmp_path / "grid.png"
    code = run_data_command(
        ["preview", str(shapes["train"]), "--augment", "3", "--samples", "2", "--out", str(out)],
        log=lambda s: None,
    )
    assert code == 0
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    thumb, pad = 200, 10
    top = pad + 22
    tiles = [
        grid[top : top + thumb, pad + c * (thumb + pad) : pad + c * (thumb + pad) + thumb] for c in range(4)
    ]
    assert grid.shape[1] == pad + 4 * (thumb + pad)
    assert tiles[0].std() > 0  # the original is drawn
    assert all(np.abs(t - tiles[0]).mean() > 1 for t in tiles[1:])  # and each augmentation differs


def test_augmentation_that_changes_the_answer_is_flagged(tmp_path, shapes, capsys):
    """Hue jitter under colour questions and flips under left/right ones contradict the labels: the
    checker warns (naming the setting, how many samples, the first, and the fix); safe settings pass."""
    data = str(shapes["train"])
    assert main(["data", "check", data, "--data.augment.enabled", "True", "--data.augment.hue", "0.1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"data\.augment\.hue 0\.1 changes colours in the picture, and \d+ of 24 samples", out)
    assert "train.jsonl:" in out and "set it to at most 0.02" in out
    assert main(["data", "check", data, "--data.augment.enabled", "True", "--data.augment.hflip", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "data.augment.hflip 0.5 changes left and right" in out and "set it to 0" in out
    # the defaults (hue 0.02, no flip), and any setting with augmentation off, are not flagged
    assert main(["data", "check", data, "--data.augment.enabled", "True"]) == 0
    assert main(["data", "check", data, "--data.augment.hue", "0.3", "--data.augment.hflip", "1.0"]) == 0
    assert "changes" not in capsys.readouterr().out


def test_training_start_warns_about_such_augmentation(tiny_mllama, shapes, tmp_path):
    logs = []
    overrides = [
        ("model_name", str(tiny_mllama)), ("dataset", str(shapes["train"])), ("data.test_file", str(shapes["test"])),
        ("output_dir", str(tmp_path / "run")), ("max_train_step", "1"), ("run_validation", "False"),
        ("data.augment.enabled", "True"), ("data.augment.hflip", "0.5"), ("progress", "False"),
    ]  # fmt: skip
    finetune(load_config(None, overrides), log=logs.append)
    assert any(
        line.startswith("data: warning: data.augment.hflip 0.5 changes left and right") for line in logs
    )
