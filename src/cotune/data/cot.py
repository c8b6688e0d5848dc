"""LLaVA-CoT's four-stage answer format: parsing and checking it, scoring answers, loss per stage.

Answers are scored on the CONCLUSION by the kind of the gold answer: a single letter A-E is a
multiple-choice answer (the predicted letter must match), a number is matched numerically, anything
else by exact match after normalisation (case, punctuation, articles and spacing ignored).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any

STAGES = ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION")


def parse_stages(text: str) -> dict[str, str]:
    """The text inside each stage's tags (first occurrence); absent stages are missing from the dict."""
    found = {}
    for stage in STAGES:
        m = re.search(rf"<{stage}>(.*?)</{stage}>", text, flags=re.S)
        if m:
            found[stage] = m.group(1).strip()
    return found


def follows_format(text: str) -> bool:
    """True when all four stages are present, non-empty and in order."""
    positions = []
    for stage in STAGES:
        m = re.search(rf"<{stage}>(.*?)</{stage}>", text, flags=re.S)
        if not m or not m.group(1).strip():
            return False
        positions.append(m.start())
    return positions == sorted(positions)


def format_rate(texts: list[str]) -> float:
    """Share of texts that follow the four-stage format."""
    return sum(follows_format(t) for t in texts) / len(texts) if texts else 0.0


# ----------------------------------------------------------------------------- answers

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


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed (SQuAD style)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> bool:
    """Equal after ``normalize_answer``."""
    return normalize_answer(prediction) == normalize_answer(gold)


def choice_letter(text: str, letters: str = "ABCDE") -> str | None:
    """The option letter a multiple-choice answer gives, or None.

    Understands "B", "(B)", "B.", "B. blue", "Option B", "The answer is B". A lone lowercase letter
    counts only when it is the whole answer (so the article "a" in a sentence is not read as A).
    """
    t = text.strip()
    whole = re.fullmatch(rf"[\(\[]?([{letters}{letters.lower()}])[\)\]]?[.:]?", t)
    if whole:
        return whole.group(1).upper()
    patterns = (
        rf"^[\(\[]?([{letters}])[\)\]]?[.:)]\s",  # "B. blue", "(B) blue"
        rf"\b(?:answer|option|choice)\s*(?:is|:)?\s*[\(\[]?([{letters}])\b",
        rf"\(([{letters}])\)",
    )
    for pattern in patterns:
        m = re.search(pattern, t, flags=re.I if "answer" in pattern else 0)
        if m:
            return m.group(1).upper()
    return None


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (digits, with , thousands and . decimals, or a word up to twenty)."""
    found: list[tuple[int, float]] = []
    for m in _NUMBER.finditer(text):
        try:
            found.append((m.start(), float(m.group().replace(",", ""))))
        except ValueError:
            continue
    for m in re.finditer(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", text.lower()):
        found.append((m.start(), float(_NUMBER_WORDS[m.group(1)])))
    return max(found)[1] if found else None


def numeric_match(prediction: str, gold: str, rel_tol: float = 1e-4) -> bool:
    """Both contain a number and the numbers agree (relative tolerance ``rel_tol``)."""
    p, g = parse_number(prediction), parse_number(gold)
    return p is not None and g is not None and math.isclose(p, g, rel_tol=rel_tol, abs_tol=1e-9)


def answer_kind(gold: str) -> str:
    """'choice' (a lone letter A-E), 'number' (a number and nothing else) or 'text'."""
    g = gold.strip()
    if re.fullmatch(r"[\(\[]?[A-E][\)\]]?\.?", g):
        return "choice"
    if re.fullmatch(r"-?[\d,]*\.?\d+%?", g) or normalize_answer(g) in _NUMBER_WORDS:
        return "number"
    return "text"


def score_answer(prediction: str, gold: str) -> dict[str, Any]:
    """Scores a CONCLUSION against the gold answer.

    Returns:
        ``kind`` (see ``answer_kind``), ``correct`` (by the rule of that kind) and ``exact``
        (normalised exact match, whatever the kind).
    """
    kind = answer_kind(gold)
    if kind == "choice":
        correct = choice_letter(prediction) == choice_letter(gold)
    elif kind == "number":
        correct = numeric_match(prediction, gold)
    else:
        correct = exact_match(prediction, gold)
    return {"kind": kind, "correct": bool(correct), "exact": exact_match(prediction, gold)}


# ----------------------------------------------------------------------------- loss per stage


def stage_spans(text: str) -> dict[str, tuple[int, int]]:
    """Character span of each stage's content (inside its tags, first occurrence)."""
    spans = {}
    for stage in STAGES:
        m = re.search(rf"<{stage}>(.*?)</{stage}>", text, flags=re.S)
        if m:
            spans[stage] = (m.start(1), m.end(1))
    return spans


def token_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of ``ids`` and each token's character span in it.

    Re-tokenizes the decoded text to read its offsets when that gives back the same ids; otherwise
    decodes prefix by prefix (exact, slower).
    """
    ids = list(ids)
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) == ids:
        return text, [tuple(o) for o in enc["offset_mapping"]]
    offsets, start = [], 0
    for k in range(1, len(ids) + 1):
        end = len(tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        offsets.append((start, end))
        start = end
    return text, offsets


def token_stages(text: str, offsets: Sequence[tuple[int, int]]) -> list[str | None]:
    """The stage each token belongs to: the one whose content holds the token's first visible character.

    Leading whitespace does not count, so a token such as ``" </"`` that closes a stage is a tag
    token, not content (an all-whitespace token is placed by its first character).
    """
    spans = stage_spans(text)
    out: list[str | None] = []
    for start, end in offsets:
        piece = text[start:end]
        if piece.strip():
            start += len(piece) - len(piece.lstrip())
        inside = [s for s, (a, b) in spans.items() if a <= start < b and end > start]
        out.append(inside[0] if inside else None)
    return out


def label_stages(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int]) -> list[str | None]:
    """For every position of a tokenized sample, the stage of its label token (None: not in a stage).

    Each run of consecutive label tokens (one assistant reply) is decoded and its stage tags located.
    """
    out: list[str | None] = [None] * len(input_ids)
    k = 0
    while k < len(labels):
        if labels[k] == -100:
            k += 1
            continue
        end = k
        while end < len(labels) and labels[end] != -100:
            end += 1
        text, offsets = token_offsets(tokenizer, input_ids[k:end])
        out[k:end] = token_stages(text, offsets)
        k = end
    return out


def stage_loss_totals(losses: Sequence[float], stages: Sequence[str | None]) -> dict[str, list[float]]:
    """Sums per-token losses by stage: ``{stage: [loss_sum, n_tokens]}``; tags and the rest go to 'other'."""
    totals = {s: [0.0, 0] for s in (*STAGES, "other")}
    for loss, stage in zip(losses, stages):
        key = stage or "other"
        totals[key][0] += float(loss)
        totals[key][1] += 1
    return totals


def mean_stage_losses(totals: dict[str, list[float]]) -> dict[str, float | None]:
    """Token-weighted mean loss per stage (None for a stage with no tokens)."""
    return {s: (v[0] / v[1] if v[1] else None) for s, v in totals.items()}
