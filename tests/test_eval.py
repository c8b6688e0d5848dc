"""Evaluation: answer scoring on hand-made predictions, loss per stage, and the eval command end to end."""

import json

import pytest
import torch

from cotune.cli import main
from cotune.data.answers import (
    answer_kind,
    choice_letter,
    exact_match,
    normalize_answer,
    numeric_match,
    parse_number,
    score_answer,
)
from cotune.data.batching import PaddingCollator
from cotune.data.chat import tokenize_conversation
from cotune.data.cot import (
    STAGES,
    follows_format,
    label_stages,
    parse_stages,
    stage_loss_totals,
    token_offsets,
)
from cotune.data.dataset import SFTDataset, encode_samples
from cotune.data.records import load_samples
from cotune.eval.evaluate import (
    generation_metrics,
    gold_answer,
    label_token_losses,
    loss_by_stage,
)
from cotune.models.load import load_base_model
from cotune.train.loss import ChunkedLossModel
from helpers import make_adapter

REPLY = (
    "<SUMMARY> I will count the shapes. </SUMMARY>\n\n<CAPTION> A red circle and a blue star. </CAPTION>"
    "\n\n<REASONING> There are two shapes. </REASONING>\n\n<CONCLUSION> {answer} </CONCLUSION>"
)


def test_normalisation_and_exact_match():
    assert normalize_answer("  The Blue, star! ") == "blue star"
    assert exact_match("Yes.", "yes") and exact_match("the circle", "Circle")
    assert not exact_match("blue star", "blue")


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("b", "B"),
        ("A. yellow", "A"),
        ("The answer is D.", "D"),
        ("Option (B)", "B"),
    ],
)
def test_choice_letter(text, letter):
    assert choice_letter(text) == letter


def test_choice_letter_is_not_fooled_by_articles():
    assert choice_letter("a red circle") is None
    assert choice_letter("There is a star") is None


def test_numbers():
    assert parse_number("There are 4 shapes.") == 4
    assert parse_number("three") == 3
    assert parse_number("1,250.5 units") == 1250.5
    assert parse_number("no number") is None
    assert numeric_match("The total is 4.", "4") and numeric_match("4.0", "4")
    assert not numeric_match("There are 3 shapes.", "4")


def test_score_answer_by_kind():
    assert answer_kind("B") == "choice" and answer_kind("4") == "number" and answer_kind("blue") == "text"
    assert score_answer("B. green", "B")["correct"] and not score_answer("A", "B")["correct"]
    assert score_answer("There are 4 shapes", "4") == {
        "kind": "number", "correct": True, "exact": False, "label": "4", "gold_label": "4"
    }  # fmt: skip
    assert score_answer("Blue.", "blue") == {
        "kind": "text", "correct": True, "exact": True, "label": "blue", "gold_label": "blue"
    }  # fmt: skip
    assert not score_answer("a blue star", "blue")["correct"]


def test_generation_metrics_on_hand_made_predictions():
    replies = [
        REPLY.format(answer="4"),  # right, formatted
        REPLY.format(answer="B"),  # wrong letter
        REPLY.format(answer="blue").replace("<CAPTION>", "<CAPTON>"),  # right answer, broken format
        "4",  # no CONCLUSION: cannot be scored right
        REPLY.format(answer="yes"),  # gold unknown: not scored
    ]
    golds = ["4", "C", "blue", "4", None]
    m = generation_metrics(replies, golds)
    assert m["format_rate"] == pytest.approx(3 / 5)
    assert m["stage_rate"]["CAPTION"] == pytest.approx(3 / 5) and m["stage_rate"][
        "CONCLUSION"
    ] == pytest.approx(4 / 5)
    assert m["scored"] == 4 and m["accuracy"] == pytest.approx(2 / 4)
    assert m["accuracy_by_kind"] == {
        "choice": {"correct": 0, "n": 1},
        "number": {"correct": 1, "n": 2},
        "text": {"correct": 1, "n": 1},
    }
    assert follows_format(replies[0]) and not follows_format(replies[2])


def test_label_stages_cover_exactly_each_stage_content(processor, shapes):
    sample = next(s for s in load_samples(shapes["train"])[0] if len(s.messages) == 2)
    ids, labels = tokenize_conversation(processor, sample.messages)
    stages = label_stages(processor.tokenizer, ids, labels)
    assert all(s is None for s, lab in zip(stages, labels) if lab == -100)
    reply = sample.messages[1]["content"][0]["text"]
    first = [k for k, lab in enumerate(labels) if lab != -100]
    text, offsets = token_offsets(processor.tokenizer, ids[first[0] : first[-1] + 1])
    for stage in STAGES:
        positions = [k - first[0] for k in first if stages[k] == stage]
        assert positions, stage
        covered = text[offsets[positions[0]][0] : offsets[positions[-1]][1]]
        assert covered.strip() == parse_stages(reply)[stage]


def test_eval_loss_is_the_training_loss_and_stages_add_up(tiny_mllama, processor, shapes):
    model, family = load_base_model(tiny_mllama)
    samples = load_samples(shapes["test"])[0][:4]
    encoded, _, _ = encode_samples(samples, processor, family, 4096)
    dataset = SFTDataset(encoded, processor, family)
    collate = PaddingCollator(
        processor.tokenizer.pad_token_id, family, family.image_token_id(processor.tokenizer)
    )
    batch = collate([dataset[i] for i in range(4)])
    inputs = {k: v for k, v in family.model_inputs(batch).items() if k != "labels"}
    with torch.no_grad():
        ref_sum, ref_n = ChunkedLossModel(model)(labels=batch["labels"], **inputs)
    per_token = label_token_losses(model, inputs, batch["labels"], chunk_size=7)
    assert per_token.sum().item() == pytest.approx(ref_sum.item(), rel=1e-5)
    stages = [label_stages(processor.tokenizer, e.input_ids, e.labels) for e in encoded]
    got = loss_by_stage(model, processor, family, dataset, stages, batch_size=3)
    assert got["label_tokens"] == int(ref_n)
    assert got["loss"] == pytest.approx(ref_sum.item() / int(ref_n), rel=1e-5)
    assert sum(got["stage_tokens"].values()) == int(ref_n)
    weighted = sum(got["stage_loss"][s] * n for s, n in got["stage_tokens"].items() if n)
    assert weighted / int(ref_n) == pytest.approx(got["loss"], rel=1e-5)
    assert all(got["stage_tokens"][s] > 0 for s in STAGES)
    totals = stage_loss_totals([1.0, 2.0, 3.0], ["SUMMARY", None, "SUMMARY"])
    assert totals["SUMMARY"] == [4.0, 2] and totals["other"] == [2.0, 1]


def test_gold_answer_prefers_the_answer_field(shapes):
    sample = load_samples(shapes["test"])[0][0]
    assert gold_answer(sample) == sample.meta["answer"]
    sample.meta.pop("answer")
    reference = sample.messages[1]["content"][0]["text"]
    assert gold_answer(sample) == parse_stages(reference)["CONCLUSION"]


def test_eval_command_compares_base_and_adapter(tiny_mllama, shapes, tmp_path):
    adapter = make_adapter(tiny_mllama, tmp_path / "run" / "adapter", seed=3)
    argv = ["eval", "--model_name", str(tiny_mllama), "--adapter", adapter, "--data", str(shapes["test"])]
    argv += ["--limit", "3", "--max_new_tokens", "4", "--batch_size", "2"]
    assert main(argv) == 0
    out = tmp_path / "run" / "eval"
    result = json.loads((out / "eval.json").read_text())
    assert list(result["models"]) == ["none", "run"] and result["n_samples"] == 3
    none, run = result["models"]["none"], result["models"]["run"]
    assert none["loss"] != pytest.approx(run["loss"])  # the adapter changes the model
    assert none["format_rate"] == 0.0 and none["scored"] == 3
    table = (out / "eval.md").read_text()
    assert "| metric | none | run |" in table and "loss: REASONING" in table
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6


def test_eval_reads_the_data_as_the_run_config_says_and_loads_tokenizer_name(
    tiny_mllama, shapes, tmp_path, monkeypatch
):
    """A run's config.yaml sets eval's data options (what eval encodes has the run's system prompt and
    length policy, not eval's own), and --tokenizer_name is the processor eval loads."""
    import shutil

    import yaml

    import cotune.eval.evaluate as evaluate
    import cotune.models.load as load

    rows = [json.loads(line) for line in shapes["test"].read_text().splitlines()[:3]]
    for row in rows:  # text only: Mllama's template refuses a system message together with an image
        row.pop("image")
        row["conversations"][0]["value"] = row["conversations"][0]["value"].replace("<image>\n", "")
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = tmp_path / "config.yaml"  # as a training run writes it: training options too
    data_options = {"system_prompt": "You count shapes.", "max_seq_len": 100, "overlength": "truncate"}
    run.write_text(
        yaml.safe_dump(
            {"model_name": str(tiny_mllama), "lr": 0.01, "data": data_options, "lora_config": {"r": 4}}
        )
    )
    processor_dir = shutil.copytree(tiny_mllama, tmp_path / "processor")
    loaded, encoded = [], []
    real_load, real_encode = load.load_processor, evaluate.encode_samples
    monkeypatch.setattr(
        load, "load_processor", lambda path, *a, **k: loaded.append(str(path)) or real_load(path, *a, **k)
    )

    def spy(samples, processor, family, max_seq_len, overlength="drop"):
        out = real_encode(samples, processor, family, max_seq_len, overlength)
        encoded.append((max_seq_len, overlength, out[0], processor))
        return out

    monkeypatch.setattr(evaluate, "encode_samples", spy)
    out = tmp_path / "eval"
    argv = [
        "eval",
        str(run),
        "--adapter",
        "none",
        "--data",
        str(data),
        "--tokenizer_name",
        str(processor_dir),
    ]
    assert main([*argv, "--max_new_tokens", "1", "--batch_size", "3", "--output_dir", str(out)]) == 0
    assert loaded == [str(processor_dir)]
    max_seq_len, overlength, items, processor = encoded[0]
    assert (max_seq_len, overlength) == (100, "truncate") and len(items) == 3
    assert all("You count shapes." in processor.tokenizer.decode(e.input_ids) for e in items)
    assert [len(e.input_ids) for e in items] == [100] * 3  # all longer: truncated to the run's limit, kept
    result = json.loads((out / "eval.json").read_text())
    assert result["max_seq_len"] == 100 and result["models"]["none"]["label_tokens"] > 0


@pytest.mark.slow
def test_eval_of_a_run_reproduces_its_last_validation_loss(tiny_mllama, shapes, tmp_path):
    """`cotune eval RUN/config.yaml --adapter RUN/adapter` reads the run's data settings and computes
    the training loss: on the run's validation file it gives the run's last validation loss."""
    run = tmp_path / "run"
    argv = [
        "train", "--model_name", str(tiny_mllama), "--dataset", str(shapes["train"]),
        "--test_file", str(shapes["test"]), "--output_dir", str(run), "--max_train_step", "3",
        "--batch_size_training", "2", "--val_batch_size", "3", "--lr", "1e-2", "--progress", "False",
        "--data.max_seq_len", "1024",
    ]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "eval_loss" in r][-1]
    assert last["step"] == 3  # validated after the last step, with the adapter that was saved
    out = tmp_path / "eval"
    rc = main(
        ["eval", str(run / "config.yaml"), "--adapter", f"run={run / 'adapter'}", "--output_dir", str(out),
         "--max_new_tokens", "2", "--batch_size", "5"]
    )  # fmt: skip
    assert rc == 0
    figures = json.loads((out / "eval.json").read_text())["models"]
    assert figures["run"]["loss"] == pytest.approx(last["eval_loss"], rel=1e-5, abs=0)
    assert figures["none"]["loss"] == pytest.approx(rows[0]["eval_loss"], rel=1e-5, abs=0)
