"""cotune eval's per-class view end to end: yes/no clinical table, P(yes) at the CONCLUSION,
paired comparison, and a VLMEvalKit-layout benchmark file."""

import json

import pytest
import torch

from cotune.cli import main
from cotune.data.answers import first_turn, normalize_answer
from cotune.data.chat import prompt_ids
from cotune.data.records import load_samples
from cotune.eval.metrics import binary_metrics
from cotune.eval.probability import NO_FORMS, YES_FORMS, conclusion_prefix, first_token_ids, yes_probabilities
from cotune.infer.generate import encode_prompt, prompt_batch
from helpers import make_adapter
from test_benchmarks import png_b64, write_tsv


def test_conclusion_prefix():
    assert conclusion_prefix("<SUMMARY> s </SUMMARY> <CONCLUSION>\n Yes </CONCLUSION>") == (
        "<SUMMARY> s </SUMMARY> <CONCLUSION>\n "
    )
    assert conclusion_prefix("Yes.") == "Yes.\n\n<CONCLUSION> "


def test_yes_probability_batched_equals_one_at_a_time(base, processor, shapes):
    """Left-padded batches give each prompt the P(yes) a plain forward of that prompt alone gives."""
    model, family = base
    samples = load_samples(shapes["test"])[0][:3]
    prompts = [(first_turn(s)[0], s.images) for s in samples]
    replies = ["<SUMMARY> a </SUMMARY> <CONCLUSION> Yes </CONCLUSION>", "no tags at all", "<CONCLUSION>"]
    batched = yes_probabilities(model, processor, family, prompts, replies, batch_size=3)
    tok = processor.tokenizer
    yes, no = first_token_ids(tok, YES_FORMS), first_token_ids(tok, NO_FORMS)
    for (messages, images), reply, p in zip(prompts, replies, batched):
        ids = prompt_ids(processor, messages, family.image_token, family.tokens_per_image(processor))
        continuation = tok(conclusion_prefix(reply), add_special_tokens=False)["input_ids"]
        one = prompt_batch(
            model, processor, family, [encode_prompt(processor, family, messages, images, continuation)]
        )
        assert one["input_ids"][0].tolist() == ids + continuation  # alone: no padding
        with torch.no_grad():
            logits = model(**one).logits[0, -1]  # every position's logits, the last read
        probs = torch.softmax(logits.float(), -1)
        expected = float(probs[yes].sum() / (probs[yes].sum() + probs[no].sum()))
        assert p == pytest.approx(expected, rel=1e-4, abs=1e-6)


def _yes_no_file(shapes, tmp_path, n=4):
    rows = [json.loads(line) for line in shapes["train"].read_text().splitlines()]
    picked = [r for r in rows if r.get("answer") in ("yes", "no")][:n]
    assert len(picked) >= 3, "the synthetic data should hold presence questions"
    path = shapes["train"].parent / "yes_no.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return path, picked


def test_eval_on_a_yes_no_set_reports_the_clinical_view(tiny_mllama, shapes, tmp_path):
    data, rows = _yes_no_file(shapes, tmp_path)
    adapter = make_adapter(tiny_mllama, tmp_path / "run" / "adapter", seed=5)
    out = tmp_path / "eval"
    argv = ["eval", "--model_name", str(tiny_mllama), "--adapter", adapter, "--data", str(data)]
    argv += [
        "--max_new_tokens",
        "4",
        "--batch_size",
        "4",
        "--output_dir",
        str(out),
        "--report_to",
        "tensorboard",
    ]
    assert main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for name in ("none", "run"):
        mine = [p for p in preds if p["model"] == name]
        # independent recomputation from the written replies
        labels = [normalize_answer(p["reply"].split("<CONCLUSION>")[-1].split("</CONCLUSION>")[0], "yes_no")
                  if "<CONCLUSION>" in p["reply"] else "" for p in mine]  # fmt: skip
        expected = binary_metrics([r["answer"] for r in rows], labels)
        got = result["models"][name]["answers"]["yes_no"]
        assert {k: got["binary"][k] for k in ("tp", "fn", "tn", "fp")} == {
            k: expected[k] for k in ("tp", "fn", "tn", "fp")
        }
        assert got["binary"]["sensitivity"]["n"] == sum(r["answer"] == "yes" for r in rows)
        assert all(0.0 <= p["yes_probability"] <= 1.0 for p in mine)
        assert got["roc_auc"]["n_positive"] + got["roc_auc"]["n_negative"] == len(rows)
    (cmp,) = result["comparisons"]
    assert (cmp["first"], cmp["second"], cmp["n"]) == ("none", "run", len(rows)) and 0 <= cmp["p_value"] <= 1
    md = (out / "eval.md").read_text()
    for text in ("## Answers: yes/no", "sensitivity", "specificity", "PPV", "NPV", "ROC AUC",
                 "Confusion matrix, run", "## Paired comparison", "McNemar p"):  # fmt: skip
        assert text in md, text
    assert (out / "confusion_run_yes_no.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    run = result["models"]["run"]
    assert tb.Scalars("eval/run/accuracy")[0].value == pytest.approx(run["accuracy"])
    sens = run["answers"]["yes_no"]["binary"]["sensitivity"]["value"]
    if sens is not None:
        assert tb.Scalars("eval/run/yes_no/sensitivity")[0].value == pytest.approx(sens)
    assert tb.Scalars("eval/none_vs_run/mcnemar_p")[0].value == pytest.approx(cmp["p_value"])


def test_benchmark_file_evaluates_per_category(tiny_mllama, tmp_path):
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [
        {"index": i, "question": f"What colour is shape {i}?", "A": "red", "B": "blue", "C": "green",
         "answer": "ABC"[i % 3], "category": "colour" if i % 2 else "shape", "image": png_b64("red")}
        for i in range(4)
    ] + [{"index": 9, "question": "Is it red?", "answer": "Yes", "category": "hallucination",
          "image": png_b64("blue")}]  # fmt: skip
    path = write_tsv(tmp_path / "bench.tsv", rows, cols)
    out = tmp_path / "eval"
    argv = ["eval", "--model_name", str(tiny_mllama), "--adapter", "none", "--benchmark", str(path)]
    assert main([*argv, "--max_new_tokens", "3", "--output_dir", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    none = result["models"]["none"]
    assert result["benchmark"] and result["n_samples"] == 5 and none["scored"] == 5
    assert set(none["accuracy_by_task"]) == {"colour", "shape", "hallucination"}
    assert none["accuracy_by_kind"]["choice"]["n"] == 4 and none["accuracy_by_kind"]["yes_no"]["n"] == 1
    md = (out / "eval.md").read_text()
    assert "category: colour" in md and "## Answers: multiple choice" in md


def test_hallusionbench_scores_figures_and_question_groups_as_vlmevalkit(tiny_mllama, tmp_path, monkeypatch):
    """A HallusionBench-layout file (set, figure and question in the index) answered right but for
    one question of one edited figure: eval.json, eval.md and the trackers' figures give aAcc, fAcc
    and qAcc overall, per category and per l2 category."""
    from cotune.eval import evaluate
    from cotune.eval.report import tracker_figures
    from cotune.infer.generate import TokenMeter

    cols = ["index", "question", "answer", "category", "l2-category", "image"]
    rows = [
        {"index": f"VD_x_x_{s}_{f}_{q}", "question": f"Is bar {q} taller in figure {s}.{f}?",
         "answer": "Yes" if (s + f + q) % 2 else "No", "category": "VD" if s else "VS",
         "l2-category": "chart" if s else "table", "image": png_b64("red" if f else "blue")}
        for s in range(2) for f in range(2) for q in range(2)
    ]  # fmt: skip
    wrong = "VD_x_x_1_1_0"  # set 1, the edited figure, question 0

    def scripted(model, processor, family, samples, *args):
        flip = {"Yes": "No", "No": "Yes"}
        replies = [flip[s.meta["answer"]] if s.id == wrong else s.meta["answer"] for s in samples]
        return [f"{r}." for r in replies], TokenMeter()

    monkeypatch.setattr(evaluate, "generate_replies", scripted)
    path = write_tsv(tmp_path / "HallusionBench.tsv", rows, cols)
    out = tmp_path / "eval"
    argv = ["eval", "--model_name", str(tiny_mllama), "--adapter", "none", "--benchmark", str(path)]
    assert main([*argv, "--output_dir", str(out), "--eval.roc", "False"]) == 0
    result = json.loads((out / "eval.json").read_text())
    consistency = result["models"]["none"]["consistency"]
    assert tracker_figures(result)["eval/none/hallusion_fAcc"] == 3 / 4
    assert consistency["Overall"] == {"aAcc": 7 / 8, "fAcc": 3 / 4, "qAcc": 3 / 4, "n": 8}
    assert (
        consistency["VD"] == consistency["l2: chart"] == {"aAcc": 3 / 4, "fAcc": 1 / 2, "qAcc": 1 / 2, "n": 4}
    )
    assert consistency["VS"] == consistency["l2: table"] == {"aAcc": 1.0, "fAcc": 1.0, "qAcc": 1.0, "n": 4}
    md = (out / "eval.md").read_text()
    assert "## HallusionBench consistency" in md and "| Overall | 87.5% / 75.0% / 75.0% (8) |" in md
