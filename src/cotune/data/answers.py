"""Answers scored by what they mean: yes/no, multiple choice, numbers and free text.

A CONCLUSION such as "Yes, there is a fracture." answers the gold "Yes"; "No evidence of fracture"
answers "No"; "(B)", "Answer: B" and the text of option B all answer "B"; "three", "3.0" and "3"
are the same number. Each answer is reduced to a *class label* (``normalize_answer``) by the rules
of its kind (``answer_kind``), and two answers match when their labels are equal
(``match_answer``); numbers match numerically. The labels are what per-class metrics count.

The rules follow VLMEvalKit's where it has them (yes/no: a "yes" without a "no" among the words, and
the other way round; multiple choice: exactly one option letter standing alone, else exactly one
option's text inside the answer) and add what screening answers need: a leading yes/no decides,
common negations ("no evidence of", "there is no", "absent", "negative for") read as no, and
hedges ("not sure", "cannot determine") read as no answer at all (the empty label).

Used by ``cotune eval``, by the task metrics during training and by ``cotune data reason`` (which
checks a teacher's CONCLUSION against the gold answer), so it lives in the data layer.
"""

from __future__ import annotations

import math
import re
import string
from typing import Any

from cotune.data.cot import parse_stages
from cotune.data.sample import Sample

KINDS = ("yes_no", "choice", "number", "text")
UNKNOWN = ""  # the label of an answer that gives none (a hedge, or no option)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")

_YES = {"yes", "yeah", "yep", "y", "true", "correct", "affirmative", "positive"}
_NO = {"no", "nope", "n", "false", "incorrect", "negative", "none"}
# Phrases that make a sentence answer nothing (checked before negations: "not sure" is not "no").
_HEDGES = re.compile(
    r"\b(not sure|unsure|uncertain|unclear|unknown|cannot (?:be )?(?:determined?|tell|say|answer)|"
    r"can ?not (?:be )?(?:determined?|tell)|can t (?:tell|say|determine)|don t know|do not know|"
    r"impossible to (?:tell|say|determine)|insufficient|not possible to (?:tell|say|determine)|"
    r"hard to (?:tell|say)|difficult to (?:tell|say|determine))\b"
)
_NEGATIONS = re.compile(
    r"\b(no|not|none|nothing|neither|nor|never|without|absent|absence|negative|free of|"
    r"isn t|aren t|doesn t|don t|didn t|wasn t|weren t|hasn t|haven t|cannot|can t|"
    r"no evidence|ruled out|rules out|unremarkable)\b"
)
_AFFIRMATIONS = re.compile(
    r"\b(there (?:is|are)|present|presence|visible|seen|shows?|showing|demonstrates?|evidence of|"
    r"positive for|detected|identified|appears?|contains?|has|have)\b"
)
_SHORT = 12  # distinct words: negations and affirmations decide only answers this short
_LEADS = re.compile(
    r"^(?:(?:the )?(?:final |correct )?answer(?: is)?|answer|conclusion|so|thus|therefore)\s+"
)


def normalize_text(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed (SQuAD style)."""
    text = _ARTICLES.sub(" ", str(text).lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> bool:
    """Equal after ``normalize_text``."""
    return normalize_text(prediction) == normalize_text(gold)


def _words(text: str) -> str:
    """Lower case, punctuation to spaces (apostrophes too: "isn't" -> "isn t"), articles kept."""
    return " ".join(str(text).lower().translate(_PUNCT).split())


def yes_no(text: str) -> str:
    """'yes', 'no' or '' (no answer) for a reply to a yes/no question.

    In order: a leading yes/no word decides ("Yes, there is a fracture."); a hedge is no answer
    ("Not sure"); VLMEvalKit's rule (the word "yes" without "no", or "no" without "yes"); a negation
    reads as no ("No evidence of fracture", "There is no crack", "The part isn't cracked"); an
    affirmation as yes ("There is a fracture", "A crack is visible"). The last two only in a short
    answer (up to 12 distinct words): in a whole paragraph they are said in passing.
    """
    words = _LEADS.sub("", _words(text))
    if not words:
        return UNKNOWN
    first = words.split()[0]
    if first in _YES:
        return "yes"
    if first in _NO:
        return "no"
    if _HEDGES.search(words):
        return UNKNOWN
    tokens = set(words.split())
    if "yes" in tokens and "no" not in tokens:
        return "yes"
    if "no" in tokens and "yes" not in tokens:
        return "no"
    if len(tokens) > _SHORT:  # a long reply mentions "not" or "there is" in passing: no answer
        return UNKNOWN
    if _NEGATIONS.search(words):
        return "no"
    if _AFFIRMATIONS.search(words):
        return "yes"
    return UNKNOWN


def choice_letter(text: str, letters: str = "ABCDE") -> str | None:
    """The option letter a multiple-choice answer names, or None.

    Understands "B", "(B)", "B.", "B. blue", "Option B", "Answer: B", "The answer is B", and (as
    VLMEvalKit does) exactly one of the letters standing alone among the words. A lone lowercase
    letter counts only when it is the whole answer, and a capital "A" that opens a longer sentence
    is read as the article, so "A red circle" names no option.
    """
    t = str(text).strip()
    whole = re.fullmatch(rf"[\(\[]?([{letters}{letters.lower()}])[\)\]]?[.:]?", t)
    if whole:
        return whole.group(1).upper()
    patterns = (
        (rf"^[\(\[]?([{letters}])[\)\]]?[.:)]\s", 0),  # "B. blue", "(B) blue"
        (rf"\b(?:answer|option|choice)\s*(?:is|:)?\s*[\(\[]?([{letters}])\b", re.I),
        (rf"\(([{letters}])\)", 0),
    )
    for pattern, flags in patterns:
        m = re.search(pattern, t, flags=flags)
        if m:
            return m.group(1).upper()
    splits = re.sub(r"[.()\[\],:;!*#{}]", " ", t).split()
    found = {w for w in splits if len(w) == 1 and w in letters}
    if len(found) == 1:
        letter = found.pop()
        article = letter == "A" and splits[0] == "A" and len(splits) > 1 and splits.count("A") == 1
        return None if article else letter
    return None


def option_by_text(text: str, options: dict[str, str]) -> str | None:
    """The letter of the option whose text the answer gives, or None.

    The answer equal to one option's text (normalised), else exactly one option's text inside an
    answer at most twice as long as all the options together (VLMEvalKit's rule).
    """
    norm = normalize_text(text)
    for letter, value in options.items():
        if norm and norm == normalize_text(value):
            return letter
    lower = str(text).lower()
    if len(lower) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    inside = [
        k
        for k, v in options.items()
        if str(v).strip() and re.search(rf"\b{re.escape(str(v).lower().strip())}\b", lower)
    ]
    return inside[0] if len(inside) == 1 else None


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (digits, with , thousands and . decimals, or a word up to twenty)."""
    found: list[tuple[int, float]] = []
    for m in _NUMBER.finditer(str(text)):
        try:
            found.append((m.start(), float(m.group().replace(",", ""))))
        except ValueError:
            continue
    for m in re.finditer(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", str(text).lower()):
        found.append((m.start(), float(_NUMBER_WORDS[m.group(1)])))
    return max(found)[1] if found else None


def numeric_match(prediction: str, gold: str, rel_tol: float = 1e-4) -> bool:
    """Both contain a number and the numbers agree (relative tolerance ``rel_tol``)."""
    p, g = parse_number(prediction), parse_number(gold)
    return p is not None and g is not None and math.isclose(p, g, rel_tol=rel_tol, abs_tol=1e-9)


def _number_label(value: float | None) -> str:
    if value is None:
        return UNKNOWN
    return str(int(value)) if value.is_integer() else format(value, ".10g")


def _alias_table(aliases: dict[str, list[str]] | None) -> dict[str, str]:
    """Normalised alias (and canonical name) -> the canonical name, normalised."""
    table: dict[str, str] = {}
    for canonical, others in (aliases or {}).items():
        key = normalize_text(canonical)
        table[key] = key
        for other in [others] if isinstance(others, str) else others:
            table[normalize_text(other)] = key
    return table


def answer_kind(gold: str, question: str | None = None, options: dict[str, str] | None = None) -> str:
    """The kind of a gold answer: 'yes_no', 'choice', 'number' or 'text'.

    'choice' when ``options`` are given and the gold is one of their letters or texts, or the gold
    is a lone letter A-E; 'yes_no' when the gold opens with yes or no (or, for a question that
    starts like a yes/no question, reads as one); 'number' for a number and nothing else (digits or
    a word up to twenty); 'text' otherwise. Set the kind per dataset where this guess is wrong.
    """
    g = str(gold).strip()
    if options and (g.strip("()[]. ").upper() in options or option_by_text(g, options) is not None):
        return "choice"
    if re.fullmatch(r"[\(\[]?[A-E][\)\]]?\.?", g):
        return "choice"
    words = _words(g).split()
    if words and words[0] in {"yes", "no"}:
        return "yes_no"
    if re.fullmatch(r"-?[\d,]*\.?\d+%?", g) or normalize_text(g) in _NUMBER_WORDS:
        return "number"
    yes_no_question = question and re.match(
        r"\s*(is|are|was|were|does|do|did|can|could|has|have|had|will|would|should)\b", question, re.I
    )
    if yes_no_question and len(words) <= 6 and yes_no(g):
        return "yes_no"
    return "text"


def normalize_answer(
    text: str,
    kind: str = "text",
    options: dict[str, str] | None = None,
    aliases: dict[str, list[str]] | None = None,
) -> str:
    """The class label of an answer under ``kind`` ('' when it gives none).

    yes_no: 'yes' or 'no'; choice: the option letter (by letter, else by the option's text);
    number: the number as a string ('1,000' -> '1000', '3.0' and 'three' -> '3'); text: the
    normalised text (case, punctuation, articles). ``aliases`` maps a canonical answer to the other
    ways of saying it ({"fracture line": ["crack"]}); an answer equal to one is read as the
    canonical answer first.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind '{kind}' (one of {', '.join(KINDS)})")
    table = _alias_table(aliases)
    canonical = table.get(normalize_text(text))
    if canonical is not None:
        text = canonical
    if kind == "yes_no":
        return yes_no(text)
    if kind == "choice":
        letters = "".join(sorted(options)) if options else "ABCDE"
        letter = choice_letter(text, letters)
        if letter is None and options:
            letter = option_by_text(text, options)
        return letter or UNKNOWN
    if kind == "number":
        return _number_label(parse_number(text))
    return normalize_text(text)


def match_answer(
    prediction: str,
    gold: str,
    kind: str | None = None,
    question: str | None = None,
    options: dict[str, str] | None = None,
    aliases: dict[str, list[str]] | None = None,
) -> bool:
    """True when ``prediction`` gives the answer ``gold`` gives, by the rules of ``kind``.

    ``kind`` defaults to ``answer_kind(gold, question, options)``. An answer that gives none (a
    hedge, no option, no number) never matches. Numbers agree within a relative 1e-4.
    """
    kind = kind or answer_kind(gold, question, options)
    p = normalize_answer(prediction, kind, options, aliases)
    g = normalize_answer(gold, kind, options, aliases)
    if p == UNKNOWN or g == UNKNOWN:
        return False
    if kind == "number":
        return math.isclose(float(p), float(g), rel_tol=1e-4, abs_tol=1e-9)
    return p == g


def score_answer(
    prediction: str,
    gold: str,
    kind: str | None = None,
    question: str | None = None,
    options: dict[str, str] | None = None,
    aliases: dict[str, list[str]] | None = None,
) -> dict:
    """``match_answer`` with what per-class metrics need.

    Returns:
        ``kind``, ``correct``, ``exact`` (normalised exact match, whatever the kind), ``label``
        (the prediction's class label, '' for none) and ``gold_label``.
    """
    kind = kind or answer_kind(gold, question, options)
    return {
        "kind": kind,
        "correct": match_answer(prediction, gold, kind, question, options, aliases),
        "exact": exact_match(prediction, gold),
        "label": normalize_answer(prediction, kind, options, aliases),
        "gold_label": normalize_answer(gold, kind, options, aliases),
    }


# ----------------------------------------------------------------------------- a sample's gold answer


def first_turn(sample: Sample) -> tuple[list[dict], str]:
    """The messages before the first reply, and that reply's text (the reference; '' when none)."""
    k = next((i for i, m in enumerate(sample.messages) if m["role"] == "assistant"), len(sample.messages))
    if k == len(sample.messages):
        return sample.messages, ""
    reply = sample.messages[k]["content"]
    text = reply if isinstance(reply, str) else "".join(c.get("text", "") for c in reply)
    return sample.messages[:k], text


def gold_answer(sample: Sample) -> str | None:
    """The record's ``answer`` field, else the CONCLUSION of the reference reply, else None."""
    answer = sample.meta.get("answer")
    if isinstance(answer, str | int | float) and str(answer).strip():
        return str(answer).strip()
    return parse_stages(first_turn(sample)[1]).get("CONCLUSION") or None


def question_text(sample: Sample) -> str:
    """The text of the last user message before the first reply (what a yes/no guess looks at)."""
    for m in reversed(first_turn(sample)[0]):
        if m["role"] == "user":
            c = m["content"]
            return c if isinstance(c, str) else " ".join(i.get("text", "") for i in c if isinstance(i, dict))
    return ""


def sample_answer_settings(sample: Sample, kind: str = "auto") -> dict[str, Any]:
    """How to score a sample's answer: ``{"kind", "options"}``.

    The record's own ``answer_kind`` field wins, then ``kind`` (a dataset-wide setting, 'auto':
    guess from the gold answer and the question); ``options`` are the record's (``{"A": ...}``).
    """
    options = sample.meta.get("options") if isinstance(sample.meta.get("options"), dict) else None
    own = sample.meta.get("answer_kind")
    if own in KINDS:
        return {"kind": own, "options": options}
    if kind in KINDS:
        return {"kind": kind, "options": options}
    gold = gold_answer(sample)
    guessed = answer_kind(gold, question_text(sample), options) if gold is not None else "text"
    return {"kind": guessed, "options": options}
