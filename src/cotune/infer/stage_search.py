"""LLaVA-CoT's stage-level beam search, best-of-N, and the model judging its own candidates.

Stage search (LLaVA-CoT, section 3.2): for each stage in order (SUMMARY, CAPTION, REASONING,
CONCLUSION) sample N continuations of the reply so far in one batched call, each stopping at the
stage's closing tag; keep the winner of a knockout of pairwise comparisons judged by the model
itself (a judging prompt per stage, with the image); continue from the winner.

Differences from the reference demo: the N candidates are sampled in one batched ``generate`` call
and each knockout round is judged in one batched call; a candidate without its stage's tags loses
its match without being judged (the demo crashes); identical candidates are not judged; an answer
of the judge that names no response is settled by comparing the logits of "1" and "2" after
"I choose response ". Every call's prompt and generated tokens are counted (``TokenMeter``).

Best-of-N samples N complete replies in one call and picks one by the same knockout, judged on the
whole reply; a reply that does not follow the four-stage format loses its match.

Example:
    >>> result = stage_search(model, processor, family, messages, images, beam_size=4, seed=0)
    >>> result.text, result.meter.describe()
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from cotune.data.cot import STAGES, follows_format
from cotune.infer.generate import (
    TokenMeter,
    count_images,
    encode_prompt,
    generate_ids,
    prompt_batch,
    seeded,
)
from cotune.models.families import ModelFamily

ANSWER = "ANSWER"  # the "stage" best-of-N judges: a whole reply

# What a better response does, per stage (after LLaVA-CoT's judging prompts).
CRITERIA = {
    "SUMMARY": "better outlines how to solve the question: the main approach, not detailed reasoning or formulas",
    "CAPTION": "describes the parts of the image that matter for the question more thoroughly and with fewer errors",
    "REASONING": "reasons from the question and the image towards the answer more soundly, with fewer errors",
    "CONCLUSION": "gives a final answer that follows from the reasoning so far and does not refuse to answer",
    ANSWER: "answers the question more correctly, reasoning step by step from the image",
}

_CHOICE = re.compile(r"choose\s*(?:the\s+)?(?:response|answer|option)?\s*[\[(#]?\s*([12])\b", re.I)
_MENTION = re.compile(r"(?:response|answer)\s*[\[(#]?\s*([12])\b", re.I)


def parse_choice(text: str) -> int | None:
    """The response a judge chose: 0 for "response 1", 1 for "response 2", None when unclear.

    Reads "I choose response 2", "I choose [2]", "... choose Response 1." (the last such phrase);
    failing that, a text that mentions exactly one of "response 1" / "response 2".
    """
    chosen = _CHOICE.findall(text)
    if chosen:
        return int(chosen[-1]) - 1
    mentioned = set(_MENTION.findall(text))
    if len(mentioned) == 1:
        return int(mentioned.pop()) - 1
    return None


def stage_content(text: str, stage: str) -> str | None:
    """The non-empty text inside ``<STAGE>...</STAGE>``, or None when the tags or the content are missing."""
    m = re.search(rf"<{stage}>(.*?)</{stage}>", text, flags=re.S)
    return m.group(1).strip() or None if m else None


def question_text(messages: list[dict]) -> str:
    """The text of the last user message (what the judge is told the question is)."""
    user = next(m for m in reversed(messages) if m["role"] == "user")
    content = user["content"]
    if isinstance(content, str):
        return content
    return "\n".join(c["text"] for c in content if isinstance(c, dict) and c.get("type") == "text")


def judge_prompt(stage: str, question: str, context: str, response_1: str, response_2: str) -> str:
    """The judging instruction for one comparison (the image goes with it)."""
    what = "response" if stage == ANSWER else f"{stage.lower()} stage of an answer"
    lines = [
        f"You are a judge. Compare two candidates for the {what} to the question about the image "
        f"below and decide which one {CRITERIA[stage]}.",
        f"\nQuestion: {question}",
    ]
    if context.strip():
        lines.append(f"\nThe answer so far: {context.strip()}")
    lines += [
        f"\nResponse 1: {response_1}",
        f"\nResponse 2: {response_2}",
        '\nReply in exactly this form and with nothing else: "Since [reason], I choose response [1/2]."',
    ]
    return "\n".join(lines)


class Judge(Protocol):
    """Decides pairs of candidates: returns 0 (first wins) or 1 (second wins) for each pair."""

    def __call__(
        self, stage: str, messages: list[dict], images: list[Any], context: str, pairs: list[tuple[str, str]]
    ) -> list[int]: ...


class Sampler(Protocol):
    """Samples ``n`` continuations (token ids) of the reply ``prefix``, each ending at ``stop``."""

    def __call__(self, prefix: list[int], stop: str | None, n: int) -> list[list[int]]: ...


class ModelJudge:
    """The model judges its own candidates: one batched greedy call per knockout round.

    Args:
        model, processor, family: the model that judges (normally the one that generated).
        meter: counts the tokens the judging spends.
        max_new_tokens: length of the judge's answer ("Since ..., I choose response N.").
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        family: ModelFamily,
        meter: TokenMeter,
        max_new_tokens: int = 64,
    ) -> None:
        self.model, self.processor, self.family = model, processor, family
        self.meter = meter
        self.max_new_tokens = max_new_tokens
        self.transcript: list[dict] = []  # every comparison with the judge's words, for --verbose

    def _items(self, stage, messages, images, context, pairs, continuation=()) -> list[dict]:
        n_images = count_images(messages)
        question = question_text(messages)
        items = []
        for a, b in pairs:
            text = judge_prompt(stage, question, context, a, b)
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
            judge_messages = [{"role": "user", "content": content}]
            items.append(encode_prompt(self.processor, self.family, judge_messages, images, continuation))
        return items

    def __call__(self, stage, messages, images, context, pairs) -> list[int]:
        items = self._items(stage, messages, images, context, pairs)
        rows = generate_ids(
            self.model,
            self.processor,
            self.family,
            items,
            max_new_tokens=self.max_new_tokens,
            meter=self.meter,
        )
        answers = self.processor.tokenizer.batch_decode(rows, skip_special_tokens=True)
        choices = [parse_choice(a) for a in answers]
        unclear = [k for k, c in enumerate(choices) if c is None]
        if unclear:
            fallback = self.logit_choice(stage, messages, images, context, [pairs[k] for k in unclear])
            for k, c in zip(unclear, fallback):
                choices[k] = c
        for pair, answer, choice, k in zip(pairs, answers, choices, range(len(pairs))):
            self.transcript.append(
                dict(stage=stage, pair=pair, answer=answer, choice=choice, by_logits=k in unclear)
            )
        return choices

    @torch.no_grad()
    def logit_choice(self, stage, messages, images, context, pairs) -> list[int]:
        """Continues "I choose response " and compares the next-token logits of "1" and "2"."""
        tokenizer = self.processor.tokenizer
        ids_1 = tokenizer("I choose response 1", add_special_tokens=False)["input_ids"]
        ids_2 = tokenizer("I choose response 2", add_special_tokens=False)["input_ids"]
        if ids_1[:-1] != ids_2[:-1]:  # a tokenizer that merges the digit with what precedes it
            return [0] * len(pairs)
        items = self._items(stage, messages, images, context, pairs, continuation=ids_1[:-1])
        batch = prompt_batch(self.model, self.processor, self.family, items)
        logits = self.model(**batch, use_cache=False).logits[:, -1].float()
        self.meter.prompt += int(batch["attention_mask"].sum())
        self.meter.calls += 1
        return [int(row[ids_2[-1]] > row[ids_1[-1]]) for row in logits]


class ModelSampler:
    """Samples continuations of a partial reply from the model, all in one batched call."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        family: ModelFamily,
        messages: list[dict],
        images: list[Any],
        meter: TokenMeter,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.9,
    ) -> None:
        self.model, self.processor, self.family = model, processor, family
        self.messages, self.images = messages, images
        self.meter = meter
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    def __call__(self, prefix: list[int], stop: str | None, n: int) -> list[list[int]]:
        item = encode_prompt(self.processor, self.family, self.messages, self.images, prefix)
        return generate_ids(
            self.model,
            self.processor,
            self.family,
            [item] * n,
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            stop_strings=[stop] if stop else None,
            meter=self.meter,
        )


@dataclass
class SearchResult:
    """A searched reply, the candidates of each step, and what the search cost."""

    text: str
    steps: list[dict] = field(default_factory=list)  # per stage: candidates, valid, winner
    meter: TokenMeter = field(default_factory=TokenMeter)
    comparisons: int = 0
    reply_tokens: int = 0  # length of the chosen reply in tokens (what one plain generation would produce)


def knockout(
    candidates: list[str], valid: list[bool], decide: Callable[[list[tuple[int, int]]], list[int]]
) -> tuple[int, int]:
    """Pairs candidates off round by round until one is left; returns (winner index, comparisons judged).

    A valid candidate beats an invalid one and identical candidates are settled without judging;
    ``decide`` judges the remaining pairs of a round in one call (0: first wins, 1: second wins).
    With an odd number alive, the last one goes through to the next round.
    """
    alive, judged = list(range(len(candidates))), 0
    while len(alive) > 1:
        pairs = [(alive[i], alive[i + 1]) for i in range(0, len(alive) - 1, 2)]
        to_judge = [(a, b) for a, b in pairs if valid[a] and valid[b] and candidates[a] != candidates[b]]
        decisions = dict(zip(to_judge, decide(to_judge))) if to_judge else {}
        judged += len(to_judge)
        winners = []
        for a, b in pairs:
            if (a, b) in decisions:
                winners.append(b if decisions[(a, b)] == 1 else a)
            else:
                winners.append(b if valid[b] and not valid[a] else a)
        alive = winners + (alive[-1:] if len(alive) % 2 else [])
    return alive[0], judged


def _select(stage, texts, valid, judge, messages, images, context) -> tuple[int, int]:
    contents = [stage_content(t, stage) or t for t in texts] if stage != ANSWER else texts

    def decide(pairs: list[tuple[int, int]]) -> list[int]:
        return judge(stage, messages, images, context, [(contents[a], contents[b]) for a, b in pairs])

    return knockout(contents, valid, decide)


def stage_search(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    messages: list[dict],
    images: list[Any],
    beam_size: int = 4,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = None,
    judge: Judge | None = None,
    sampler: Sampler | None = None,
) -> SearchResult:
    """LLaVA-CoT stage-level beam search for one prompt.

    Args:
        model, processor, family: the model (its active adapter is used).
        messages, images: the conversation before the reply.
        beam_size: candidates sampled per stage.
        max_new_tokens: limit per stage.
        temperature, top_p: sampling settings of the candidates.
        seed: seeds the sampling (None: the global RNG).
        judge: decides comparisons (default: ``ModelJudge`` on the same model).
        sampler: samples candidates (default: ``ModelSampler`` on the same model).

    Returns:
        The reply, every stage's candidates and winner, and the tokens spent.
    """
    meter = TokenMeter()
    judge = judge or ModelJudge(model, processor, family, meter)
    sampler = sampler or ModelSampler(
        model, processor, family, messages, images, meter, max_new_tokens, temperature, top_p
    )
    tokenizer = processor.tokenizer
    eos = set(family.end_of_turn_ids(tokenizer))
    prefix: list[int] = []
    result = SearchResult(text="", meter=meter)
    with seeded(seed):
        for stage in STAGES:
            rows = sampler(prefix, f"</{stage}>", beam_size)
            rows = [[t for t in row if t not in eos] for row in rows]
            texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
            valid = [stage_content(t, stage) is not None for t in texts]
            context = tokenizer.decode(prefix, skip_special_tokens=True)
            winner, judged = _select(stage, texts, valid, judge, messages, images, context)
            result.comparisons += judged
            result.steps.append(dict(stage=stage, candidates=texts, valid=valid, winner=winner))
            prefix = prefix + rows[winner]
    result.text = tokenizer.decode(prefix, skip_special_tokens=True)
    result.reply_tokens = len(prefix)
    return result


def best_of_n(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    messages: list[dict],
    images: list[Any],
    n: int = 4,
    max_new_tokens: int = 1024,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = None,
    judge: Judge | None = None,
    sampler: Sampler | None = None,
) -> SearchResult:
    """Samples ``n`` complete replies in one call and keeps the knockout winner (model-judged).

    A reply that does not follow the four-stage format loses its match; the judge compares whole
    replies ("which response answers the question better"). Arguments as in ``stage_search``.
    """
    meter = TokenMeter()
    judge = judge or ModelJudge(model, processor, family, meter)
    sampler = sampler or ModelSampler(
        model, processor, family, messages, images, meter, max_new_tokens, temperature, top_p
    )
    tokenizer = processor.tokenizer
    with seeded(seed):
        rows = sampler([], "</CONCLUSION>", n)
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
        valid = [follows_format(t) for t in texts]
        winner, judged = _select(ANSWER, texts, valid, judge, messages, images, "")
    step = dict(stage=ANSWER, candidates=texts, valid=valid, winner=winner)
    return SearchResult(
        text=texts[winner], steps=[step], meter=meter, comparisons=judged, reply_tokens=len(rows[winner])
    )
