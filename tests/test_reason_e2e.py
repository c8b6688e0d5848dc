"""From labelled pictures to a four-stage adapter, end to end on the tiny model: a class-per-folder
set of pictures is imported, `cotune serve` runs a trained adapter as the teacher, `cotune data
reason` keeps the replies whose CONCLUSION names the folder's colour, a fresh adapter trained on
them answers held-out pictures in four stages and right far above chance (1 in 6)."""

from __future__ import annotations

import json
import random

import pytest

from cotune.config import load_config
from cotune.data.reason import reason_records
from cotune.data.records import load_samples
from cotune.data.sources import import_source
from cotune.demo.synthetic import COLOURS, draw_scene
from cotune.eval.evaluate import evaluate_models
from cotune.infer.adapters import AdapterSpec, load_model_with_adapters
from cotune.options.sources import ImportOptions, ReasonOptions
from cotune.run_demo import DEMO_CONFIG
from cotune.serve.launch import serve_subprocess
from cotune.train.loop import finetune


def picture_folder(root, per_colour: int, seed: int):
    """ROOT/COLOUR/k.png: one circle of that colour, the demo's picture settings (32 px, radius 0.3)."""
    rng = random.Random(seed)
    for colour in sorted(COLOURS):
        (root / colour).mkdir(parents=True)
        for k in range(per_colour):
            scene = {"background": rng.choice(["white", "light grey", "cream", "pale blue"]),
                     "shapes": [{"shape": "circle", "colour": colour, "position": "center"}]}  # fmt: skip
            draw_scene(scene, 32, rng, 0.3).save(root / colour / f"{k}.png")
    return root


@pytest.mark.slow
def test_labelled_folder_to_a_reasoning_adapter(tiny_mllama, colour_run, tmp_path):
    teacher_run, _ = colour_run
    question = ImportOptions(question="What colour is the circle?")
    train = import_source(
        picture_folder(tmp_path / "photos", 8, seed=1), tmp_path / "train", question, log=print
    )
    test = import_source(
        picture_folder(tmp_path / "held_out", 4, seed=2), tmp_path / "test", question, log=print
    )
    out = tmp_path / "train" / "reasoned.jsonl"
    serve = [
        "--model_name",
        str(tiny_mllama),
        "--adapter",
        f"teacher={teacher_run.adapter_dir}",
        "--num_threads",
        "1",
    ]
    # the tiny teacher learnt bare questions, not LLaVA-CoT's instructions: its prompt is the question
    (tmp_path / "prompt.txt").write_text("{question}")
    with serve_subprocess(serve) as (url, _):
        opts = ReasonOptions(teacher_url=[f"{url}/v1"], teacher_model="teacher", teacher_temperature=0.0,
                             max_tokens=120, concurrency=8, prompt_file=str(tmp_path / "prompt.txt"))  # fmt: skip
        report = reason_records(train.records_file, out, opts, log=print)
    accept_rate = report.attempts[""] / sum(report.attempts.values())
    print(
        f"teacher accept rate: {accept_rate:.0%} ({report.attempts['']} of {sum(report.attempts.values())})"
    )
    assert accept_rate >= 0.5 and report.failed == 0
    kept = [json.loads(line) for line in open(out)]
    assert all(r["conversations"][1]["value"].count("<CONCLUSION>") == 1 for r in kept)

    overrides = [
        ("model_name", str(tiny_mllama)), ("dataset", str(out)), ("data.test_file", str(test.records_file)),
        ("output_dir", str(tmp_path / "student")), ("num_epochs", "6"), ("run_validation", "False"),
        ("progress", "False"), ("keep_last_checkpoints", "0"),
    ]  # fmt: skip
    student = finetune(load_config(DEMO_CONFIG, overrides), log=lambda *_: None)
    # the eval's own functions, on the student alone (cotune eval would also run the base model)
    model, processor, family = load_model_with_adapters(
        str(tiny_mllama), [AdapterSpec("student", str(student.adapter_dir))]
    )
    samples, problems = load_samples(test.records_file)
    assert problems == [] and len(samples) == 24
    results = evaluate_models(model, processor, family, samples, ["student"], batch_size=24, max_new_tokens=120,
                              log=print)  # fmt: skip
    figures = results["models"]["student"]
    right = {g: sum(p["score"] is not None and p["score"]["correct"] for p in results["predictions"]["student"] if p["gold"] == g)
             for g in sorted(COLOURS)}  # fmt: skip
    print(f"held-out pictures answered right, per colour (of 4 each): {right}")
    print(
        f"student on 24 held-out pictures: accuracy {figures['accuracy']:.0%}, four-stage {figures['format_rate']:.0%}"
    )
    assert figures["format_rate"] >= 0.8
    assert figures["accuracy"] >= 0.6  # chance is 1 in 6
