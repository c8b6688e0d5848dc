"""LLaVA-CoT's four-stage answer format: parsing and checking it, loss per stage.

The CONCLUSION's answer is scored against the gold answer by ``data.answers``.
"""

from __future__ import annotations

import re
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
