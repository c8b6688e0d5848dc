"""LLaVA-CoT's four-stage answer format: parsing and checking it."""

from __future__ import annotations

import re

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
