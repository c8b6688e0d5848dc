"""Answers scored by what they mean (data/answers.py): the hard cases of each kind."""

import pytest

from cotune.data.answers import answer_kind, match_answer, normalize_answer, score_answer

OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "dark blue"}


@pytest.mark.parametrize(
    "gold, question, options, kind",
    [
        ("Yes", None, None, "yes_no"),
        ("no.", None, None, "yes_no"),
        ("No, it is intact", None, None, "yes_no"),
        ("B", None, None, "choice"),
        ("(C)", None, None, "choice"),
        ("blue", None, OPTIONS, "choice"),
        ("3", None, None, "number"),
        ("1,000", None, None, "number"),
        ("three", None, None, "number"),
        ("fracture line", None, None, "text"),
        ("No evidence of fracture", "Is there a fracture?", None, "yes_no"),
        ("Absent", "Is a crack present?", None, "yes_no"),
        ("Absent", None, None, "text"),  # without the question it is a word
    ],
)
def test_answer_kind(gold, question, options, kind):
    assert answer_kind(gold, question, options) == kind


@pytest.mark.parametrize(
    "text, label",
    [
        ("Yes, there is a fracture.", "yes"),
        ("yes", "yes"),
        ("The answer is yes.", "yes"),
        ("No evidence of fracture", "no"),
        ("There is no crack", "no"),
        ("No.", "no"),
        ("The weld isn't cracked.", "no"),
        ("Fracture absent.", "no"),
        ("There is a fracture in the distal radius.", "yes"),
        ("Not sure", ""),
        ("It cannot be determined from the image.", ""),
        ("purple", ""),
        (
            "The image shows a red circle on a white background and there is nothing else in the picture at all.",
            "",
        ),
    ],
)
def test_yes_no_labels(text, label):
    assert normalize_answer(text, "yes_no") == label


def test_yes_no_matches():
    assert match_answer("Yes, there is a fracture.", "Yes")
    assert match_answer("No evidence of fracture", "No")
    assert match_answer("There is no crack", "no")
    assert not match_answer("There is no crack", "yes")
    assert not match_answer("Not sure", "No") and not match_answer("Not sure", "Yes")


@pytest.mark.parametrize(
    "text, label",
    [
        ("(B)", "B"),
        ("B.", "B"),
        ("Answer: B", "B"),
        ("The answer is B", "B"),
        ("b", "B"),
        ("blue", "B"),
        ("A red circle", "A"),  # by its text: "red"; the leading "A" is the article
        ("I pick C here", "C"),
        ("purple", ""),
    ],
)
def test_choice_labels(text, label):
    assert normalize_answer(text, "choice", OPTIONS) == label


def test_choice_matches_by_letter_or_text():
    for pred in ("(B)", "B.", "Answer: B", "blue", "B. blue"):
        assert match_answer(pred, "B", options=OPTIONS), pred
    assert match_answer("green", "C", kind="choice", options=OPTIONS)
    assert not match_answer("A", "B", options=OPTIONS)
    assert not match_answer("A red circle", "B")  # without options: the article, no letter
    assert (
        normalize_answer("It is dark blue.", "choice", OPTIONS) == ""
    )  # two options inside: none (VLMEvalKit)
    assert normalize_answer("dark blue", "choice", OPTIONS) == "D"  # equal to one option's text


@pytest.mark.parametrize("pred", ["3", "three", "3.0", "There are 3 cracks.", " 3 "])
def test_number_matches(pred):
    assert match_answer(pred, "3")


def test_numbers_more():
    assert match_answer("1,000", "1000") and match_answer("1000.0", "1,000")
    assert normalize_answer("1,000", "number") == "1000" and normalize_answer("2.50", "number") == "2.5"
    assert not match_answer("4", "3") and not match_answer("none", "3")


def test_free_text_normalised_with_aliases():
    assert match_answer("The Fracture Line.", "fracture line")
    aliases = {"fracture line": ["crack", "hairline crack"]}
    assert not match_answer("crack", "fracture line")
    assert match_answer("A crack.", "fracture line", aliases=aliases)
    assert match_answer("hairline crack", "crack", aliases=aliases)
    assert normalize_answer("Crack!", "text", aliases=aliases) == "fracture line"
    assert not match_answer("a blue star", "blue")


def test_aliases_reach_yes_no():
    aliases = {"yes": ["defective", "reject"]}
    assert match_answer("Reject", "yes", kind="yes_no", aliases=aliases)


def test_score_answer_gives_labels():
    s = score_answer("No evidence of fracture", "Yes")
    assert s == {"kind": "yes_no", "correct": False, "exact": False, "label": "no", "gold_label": "yes"}


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown answer kind 'bool'"):
        normalize_answer("yes", "bool")
