"""VLMEvalKit-layout TSV files (data/benchmarks.py): reading, prompts, and scoring by its rules."""

import base64
import csv
import io

import pytest
from PIL import Image

from cotune.data.answers import match_answer
from cotune.data.benchmarks import benchmark_samples, build_vlmeval_prompt, read_vlmeval_tsv
from cotune.data.images import load_image


def png_b64(colour, size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows, columns):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    return path


MCQ_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def mcq_file(tmp_path):
    rows = [
        {"index": 0, "question": "What colour is the square?", "hint": "Look closely.", "A": "red", "B": "blue",
         "C": "green", "D": "", "answer": "A", "category": "colour", "l2-category": "perception",
         "image": png_b64("red")},
        {"index": 1, "question": "Which shape?", "A": "circle", "B": "square", "answer": "B",
         "category": "shape", "l2-category": "perception", "image": "0"},  # shares row 0's picture
    ]  # fmt: skip
    return write_tsv(tmp_path / "mcq.tsv", rows, MCQ_COLUMNS)


def test_reads_rows_options_and_shared_images(tmp_path):
    rows = read_vlmeval_tsv(mcq_file(tmp_path))
    assert [r["index"] for r in rows] == ["0", "1"]
    assert rows[0]["options"] == {"A": "red", "B": "blue", "C": "green"}  # the empty D is no option
    assert rows[1]["options"] == {"A": "circle", "B": "square"} and rows[1]["hint"] is None
    assert rows[0]["category"] == "colour" and rows[0]["l2_category"] == "perception"
    assert rows[1]["images"] == rows[0]["images"]
    assert load_image(rows[1]["images"][0]).getpixel((0, 0)) == (255, 0, 0)


def test_mcq_prompt_is_vlmevalkits():
    row = {"question": "What colour?", "hint": "Look.", "options": {"A": "red", "B": "blue"}, "answer": "A"}
    assert build_vlmeval_prompt(row) == (
        "Hint: Look.\nQuestion: What colour?\nOptions:\nA. red\nB. blue\n"
        "Please select the correct answer from the options above. \n"
    )
    row["hint"] = None
    assert build_vlmeval_prompt(row).startswith("Question: What colour?\nOptions:\n")


def test_yes_no_prompt_and_plain_question():
    assert (
        build_vlmeval_prompt({"question": "Is it red?", "answer": "Yes"})
        == "Is it red? Please answer yes or no."
    )
    assert build_vlmeval_prompt({"question": "Name it.", "answer": "cat"}) == "Name it."


def test_samples_carry_gold_kind_and_category(tmp_path):
    path = mcq_file(tmp_path)
    samples = benchmark_samples(read_vlmeval_tsv(path), path)
    s = samples[0]
    assert s.messages[0]["content"][0] == {"type": "image"} and len(s.images) == 1
    assert s.meta["answer"] == "A" and s.meta["answer_kind"] == "choice" and s.meta["task"] == "colour"
    assert s.where == f"{path}:2"


def test_scored_by_letter_or_option_text():
    options = {"A": "red", "B": "blue", "C": "green"}
    for reply in ("A", "(A)", "The answer is A.", "red", "It is red."):
        assert match_answer(reply, "A", kind="choice", options=options), reply
    assert not match_answer("blue", "A", kind="choice", options=options)


def test_rows_without_image_are_skipped_and_bad_cells_named(tmp_path):
    cols = ["index", "question", "answer", "image"]
    path = write_tsv(tmp_path / "yn.tsv", [{"index": 1, "question": "Is it red?", "answer": "Yes", "image": ""},
                                           {"index": 2, "question": "Is it blue?", "answer": "No",
                                            "image": png_b64("blue")}], cols)  # fmt: skip
    rows = read_vlmeval_tsv(path)
    assert [r["index"] for r in rows] == ["2"]
    bad = write_tsv(
        tmp_path / "bad.tsv", [{"index": 1, "question": "q", "answer": "Yes", "image": "x" * 100 + "!"}], cols
    )
    with pytest.raises(ValueError, match=r"bad.tsv:2: field 'image' is not base64"):
        read_vlmeval_tsv(bad)
    ref = write_tsv(
        tmp_path / "ref.tsv", [{"index": 1, "question": "q", "answer": "Yes", "image": "7"}], cols
    )
    with pytest.raises(ValueError, match=r"ref.tsv:2: field 'image' is '7'"):
        read_vlmeval_tsv(ref)
    nocol = write_tsv(tmp_path / "nocol.tsv", [{"index": 1}], ["index", "answer"])
    with pytest.raises(ValueError, match=r"nocol.tsv:1: missing column\(s\) question, image"):
        read_vlmeval_tsv(nocol)


def test_hallusionbench_rows_are_grouped_by_set_figure_and_question(tmp_path):
    from cotune.data.benchmarks import question_group

    cols = ["index", "question", "answer", "category", "l2-category", "image"]
    row = {"index": "VD_math_x_3_1_2", "question": "Is it?", "answer": "No", "category": "VD",
           "l2-category": "math", "image": png_b64("red")}  # fmt: skip
    hallusion = benchmark_samples(read_vlmeval_tsv(write_tsv(tmp_path / "HallusionBench.tsv", [row], cols)),
                                  tmp_path / "HallusionBench.tsv")  # fmt: skip
    assert hallusion[0].meta["question_group"] == {"l2": "math", "set": "3", "figure": "1", "question": "2"}
    other = tmp_path / "POPE.tsv"
    assert (
        "question_group"
        not in benchmark_samples(read_vlmeval_tsv(write_tsv(other, [row], cols)), other)[0].meta
    )
    explicit = dict(row, index="17", set_id="5", figure_id="0", question_id="1")
    path = write_tsv(tmp_path / "mine.tsv", [explicit], [*cols, "set_id", "figure_id", "question_id"])
    rows = read_vlmeval_tsv(path)
    assert question_group(rows[0], path) == {"l2": "math", "set": "5", "figure": "0", "question": "1"}


def _consistency_by_definition(groups, correct, categories):
    """aAcc / fAcc / qAcc written out from VLMEvalKit's definitions, split by split (the reference)."""

    def split(keep):
        rows = [(g, c) for g, c, cat in zip(groups, correct, categories) if keep(g, cat)]
        figures = {(g["l2"], g["set"], g["figure"]) for g, _ in rows}
        questions = {(g["l2"], g["set"], g["question"]) for g, _ in rows}
        f_ok = [all(c for g, c in rows if (g["l2"], g["set"], g["figure"]) == k) for k in figures]
        q_ok = [all(c for g, c in rows if (g["l2"], g["set"], g["question"]) == k) for k in questions]
        return {"aAcc": sum(c for _, c in rows) / len(rows), "fAcc": sum(f_ok) / len(f_ok),
                "qAcc": sum(q_ok) / len(q_ok), "n": len(rows)}  # fmt: skip

    out = {"Overall": split(lambda g, cat: True)}
    out |= {cat: split(lambda g, c, cat=cat: c == cat) for cat in dict.fromkeys(categories)}
    out |= {
        f"l2: {l2}": split(lambda g, c, l2=l2: g["l2"] == l2) for l2 in dict.fromkeys(g["l2"] for g in groups)
    }
    return out


def test_consistency_accuracy_follows_vlmevalkits_definitions():
    import random

    from cotune.eval.scoring import consistency_accuracy

    # one set, the original figure (0) and an edit (1), two questions: 3 of 4 right
    groups = [{"l2": "chart", "set": "0", "figure": f, "question": q} for f in "01" for q in "01"]
    got = consistency_accuracy(groups, [{"correct": c} for c in (True, True, False, True)], ["VD"] * 4)
    assert got["Overall"] == {"aAcc": 0.75, "fAcc": 0.5, "qAcc": 0.5, "n": 4}  # figure 1 and question 0 fail
    rng = random.Random(0)
    sets = [(str(k), rng.choice("ab")) for k in range(40)]  # 40 sets of 2 figures x 2 questions, l2 a or b
    groups = [{"l2": l2, "set": k, "figure": f, "question": q} for k, l2 in sets for f in "01" for q in "01"]
    correct, categories = [rng.random() < 0.8 for _ in groups], [rng.choice(["VD", "VS"]) for _ in groups]
    got = consistency_accuracy(groups, [{"correct": c} for c in correct], categories)
    want = _consistency_by_definition(groups, correct, categories)
    assert got.keys() == want.keys() and 0 < got["Overall"]["fAcc"] < got["Overall"]["aAcc"] < 1
    assert all(got[k] == pytest.approx(want[k]) for k in want)
    assert consistency_accuracy([None, *groups[1:]], [{"correct": True}] * len(groups), categories) is None
