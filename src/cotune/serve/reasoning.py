"""``--reasoning_parser llava-cot``: a LLaVA-CoT reply's SUMMARY, CAPTION and REASONING stages go to
``reasoning_content``, the text inside its CONCLUSION to ``content`` (as reasoning models' servers
split their thinking from the answer).

A reply that does not open with a stage tag is left alone (all ``content``). Streamed, the split is
made on the text so far, holding back what could still be the start of a tag, so the streamed
pieces join to exactly the non-streamed fields.
"""

from __future__ import annotations

from cotune.data.cot import STAGES

OPEN, CLOSE = "<CONCLUSION>", "</CONCLUSION>"
OPENERS = tuple(f"<{s}>" for s in STAGES)


def _partial_tail(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``tag``."""
    return max([0] + [k for k in range(1, len(tag)) if text.endswith(tag[:k])])


def split_llava_cot(text: str, final: bool = True) -> tuple[str, str]:
    """(reasoning_content, content) of ``text``; ``final=False`` for a reply still being written."""
    stripped = text.lstrip()
    if not final and any(o.startswith(stripped) for o in OPENERS):
        return "", ""  # too early to tell
    if not stripped.startswith(OPENERS):
        return "", text
    at = text.find(OPEN)
    if at < 0:
        return (text if final else text[: len(text) - _partial_tail(text, OPEN)]), ""
    answer = text[at + len(OPEN) :]
    end = answer.find(CLOSE)
    if end >= 0:
        answer = answer[:end] + answer[end + len(CLOSE) :]
    elif not final:
        answer = answer[: len(answer) - _partial_tail(answer, CLOSE)]
    return text[:at], answer


class ReasoningStream:
    """Turns a reply's text pieces into (reasoning delta, content delta) pairs."""

    def __init__(self) -> None:
        self.text, self.sent = "", ("", "")

    def add(self, piece: str, final: bool = False) -> tuple[str, str]:
        self.text += piece
        reasoning, content = split_llava_cot(self.text, final)
        old_r, old_c = self.sent
        # both only grow; the slices are the new parts
        self.sent = (max(reasoning, old_r, key=len), max(content, old_c, key=len))
        return reasoning[len(old_r) :], content[len(old_c) :]
