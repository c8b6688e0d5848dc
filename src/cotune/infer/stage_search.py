"""LLaVA-CoT's stage-level beam search, best-of-N, and the model judging its own candidates.

Stage search (LLaVA-CoT, section 3.2): for each stage in order (SUMMARY, CAPTION, REASONING,
CONCLUSION) sample N continuations of the reply so far in one batched call, each stopping at the
stage's closing tag; keep the winner of a knockout of pairwise comparisons judged by the model
itself (a judging prompt per stage, with the image); continue from the winner.

Differences from the reference demo: the N candidates are decoded as one batch over their shared
prefix (``cotune.infer.prefix``, in one ``cotune.infer.cache.BatchCache``): the prompt is fed once per search, not once per candidate and
stage, since each stage continues the winner's cache; each candidate draws from its own random
stream (seeded from the global one, so ``seed`` reproduces a search), and equals the same candidate
decoded alone. Each knockout round is judged in one batch over the judging prompt's shared beginning
(fed once per stage); the image is encoded once per search. A candidate without its stage's tags
loses its match without being judged (the demo crashes); identical candidates are not judged; an
answer of the judge that names no response is settled by comparing the logits of "1" and "2" after
"I choose response ". The tokens fed and generated are counted (``TokenMeter``).

Best-of-N samples N complete replies in one batch and picks one by the same knockout, judged on the
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

from cotune.data.chat import prompt_ids
from cotune.data.cot import STAGES, follows_format
from cotune.infer.cache import BatchCache
from cotune.infer.generate import (
    StopOnText,
    TokenMeter,
    count_images,
    encode_prompt,
    model_device_dtype,
    prompt_batch,
    seeded,
)
from cotune.infer.prefix import (
    Rows,
    appended,
    decode,
    evaluating,
    feed,
    generators,
    greedy,
    image_inputs,
    new_cache,
    one_row,
    same_inputs,
    sample_with,
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


def _common_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    return next((i for i in range(n) if any(r[i] != rows[0][i] for r in rows)), n)


class ModelJudge:
    """The model judges its own candidates: one batched greedy decoding per knockout round.

    The judging prompts of a stage share their beginning (the instruction, the question, the answer
    so far, up to the first response): it is fed once and kept for the stage's later rounds and the
    logit fallback; each pair then feeds only its own part. (Kept for the same tokens and image only;
    a judge assumes the model and its adapter do not change between its calls: one judge per search.)

    Args:
        model, processor, family: the model that judges (normally the one that generated).
        meter: counts the tokens the judging spends.
        max_new_tokens: length of the judge's answer ("Since ..., I choose response N.").
        cache: where the rows and the image's keys and values live (share the sampler's to
            encode the image once per search).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        family: ModelFamily,
        meter: TokenMeter,
        max_new_tokens: int = 64,
        cache: BatchCache | None = None,
    ) -> None:
        self.model, self.processor, self.family = model, processor, family
        self.meter = meter
        self.max_new_tokens = max_new_tokens
        self.cache = cache or new_cache(model)
        self.transcript: list[dict] = []  # every comparison with the judge's words, for --verbose
        self._prefix: Rows | None = None  # the current stage's shared beginning, fed
        self._prefix_images: dict = {}  # the image inputs it was fed with

    def _messages(self, stage, messages, context, a: str, b: str) -> list[dict]:
        text = judge_prompt(stage, question_text(messages), context, a, b)
        content = [{"type": "image"} for _ in range(count_images(messages))] + [
            {"type": "text", "text": text}
        ]
        return [{"role": "user", "content": content}]

    def _items(self, stage, messages, images, context, pairs, continuation=()) -> list[dict]:
        return [
            encode_prompt(
                self.processor,
                self.family,
                self._messages(stage, messages, context, a, b),
                images,
                continuation,
            )
            for a, b in pairs
        ]

    def _rows(self, stage, messages, images, context, pairs, continuation=()) -> Rows:
        """The judging prompts of ``pairs`` fed as one batch after their shared beginning."""
        family, keys = self.family, self.family.token_keys
        items = self._items(stage, messages, images, context, pairs, continuation)
        batches = [prompt_batch(self.model, self.processor, family, [item]) for item in items]
        ids = [b["input_ids"][0].tolist() for b in batches]
        # what every pair of this stage shares: up to where the prompt with empty responses differs
        blank = prompt_ids(
            self.processor,
            self._messages(stage, messages, context, "", ""),
            family.image_token,
            family.tokens_per_image(self.processor),
        )
        pictures = image_inputs(family, batches[0])
        kept = self._prefix.ids[0] if self._prefix is not None else None
        fits = kept is not None and all(row[: len(kept)] == kept for row in ids)
        if not (fits and same_inputs(pictures, self._prefix_images)):
            if self._prefix is not None:
                self._prefix.free()
            shared = min(_common_prefix([*ids, blank]), min(map(len, ids)) - 1)
            first = one_row(batches[0], 0, shared, keys)
            self._prefix = feed(self.model, self.cache, [first], pictures, self.meter)
            self._prefix_images = pictures
        base, start = self._prefix, len(self._prefix.ids[0])
        common = min(_common_prefix(ids), min(map(len, ids)) - 1)
        if len(items) > 1 and common > start:  # this round's pairs share more (first responses alike)
            piece = [one_row(batches[0], start, common, keys)]
            base = feed(self.model, base.repeat(1), piece, None, self.meter)
            start = common
        pieces = [one_row(b, start, None, keys) for b in batches]
        rows = base.repeat(len(items), keep=base is self._prefix)
        return feed(self.model, rows, pieces, None, self.meter)

    def __call__(self, stage, messages, images, context, pairs) -> list[int]:
        eos = self.family.end_of_turn_ids(self.processor.tokenizer)
        with evaluating(self.model):
            rows = self._rows(stage, messages, images, context, pairs)
            # the judged prompts are kept as fed, for the logit fallback: the answers go in copies
            outs, _ = decode(self.model, rows.repeat(1), greedy, self.max_new_tokens, eos, meter=self.meter)
        self.meter.calls += 1
        answers = self.processor.tokenizer.batch_decode(outs, skip_special_tokens=True)
        choices = [parse_choice(a) for a in answers]
        unclear = [k for k, c in enumerate(choices) if c is None]
        if unclear:
            unclear_pairs, fed = [pairs[k] for k in unclear], rows.select(unclear)
            fallback = self.logit_choice(stage, messages, images, context, unclear_pairs, fed)
            for k, c in zip(unclear, fallback):
                choices[k] = c
        rows.free()
        for pair, answer, choice, k in zip(pairs, answers, choices, range(len(pairs))):
            self.transcript.append(
                dict(stage=stage, pair=pair, answer=answer, choice=choice, by_logits=k in unclear)
            )
        return choices

    @torch.no_grad()
    def logit_choice(self, stage, messages, images, context, pairs, fed: Rows | None = None) -> list[int]:
        """Continues "I choose response " and compares the next-token logits of "1" and "2".

        ``fed``: the pairs' judging prompts already fed (``__call__`` passes what it judged from).
        """
        tokenizer = self.processor.tokenizer
        ids_1 = tokenizer("I choose response 1", add_special_tokens=False)["input_ids"]
        ids_2 = tokenizer("I choose response 2", add_special_tokens=False)["input_ids"]
        if ids_1[:-1] != ids_2[:-1]:  # a tokenizer that merges the digit with what precedes it
            return [0] * len(pairs)
        with evaluating(self.model):
            own = fed is None
            if own:
                fed = self._rows(stage, messages, images, context, pairs)
            pieces = [appended(fed, b, ids_1[:-1]) for b in range(len(pairs))]
            rows = feed(self.model, fed, pieces, None, self.meter)
            if own:  # (``__call__`` frees the rows it passes)
                fed.free()
        self.meter.calls += 1
        return [int(row[ids_2[-1]] > row[ids_1[-1]]) for row in rows.logits]


class ModelSampler:
    """Samples continuations of a partial reply from the model, as one batch over their shared prefix.

    The prompt and the reply so far are fed once as one row whose cache the ``n`` candidates copy;
    candidate i draws from its own generator, seeded from torch's global random stream (``seeds``
    keeps the last call's), so that a candidate does not depend on the others. The candidates are
    kept as they ended: a later call that continues one of them (the stage search continues the
    winner) feeds only what that candidate has not been fed yet.

    Args:
        model, processor, family, messages, images: the model and the conversation before the reply.
        meter: counts the tokens spent.
        max_new_tokens, temperature, top_p: per candidate (temperature 0: greedy).
        cache: where the rows and the image's keys and values live (share the judge's to encode
            the image once per search).
    """

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
        cache: BatchCache | None = None,
    ) -> None:
        self.model, self.processor, self.family = model, processor, family
        self.messages, self.images = messages, images
        self.meter = meter
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.cache = cache or new_cache(model)
        self.seeds: list[int] = []
        self._ended: list[Rows | None] = []  # the last call's candidates as they ended

    def _resume(self, ids: list[int]) -> Rows | None:
        """The longest kept candidate whose fed ids begin ``ids`` (the others' slots are given back)."""
        fits = [r for r in self._ended if r is not None and ids[: len(r.ids[0])] == r.ids[0]]
        best = max(fits, key=lambda r: len(r.ids[0])) if fits else None
        for r in self._ended:
            if r is not None and r is not best:
                r.free()
        self._ended = []
        return best

    def __call__(self, prefix: list[int], stop: str | None, n: int) -> list[list[int]]:
        tokenizer, keys = self.processor.tokenizer, self.family.token_keys
        item = encode_prompt(self.processor, self.family, self.messages, self.images, prefix)
        batch = prompt_batch(self.model, self.processor, self.family, [item])
        ids = batch["input_ids"][0].tolist()
        self.seeds = torch.randint(0, 2**63 - 1, (n,)).tolist()
        pick = sample_with(
            self.temperature, self.top_p, generators(self.seeds, model_device_dtype(self.model)[0])
        )
        stop_at = None
        if stop:
            criterion = StopOnText(tokenizer, [stop], prompt_len=0)
            stop_at = lambda row: bool(criterion(torch.tensor([row]), None)[0])  # noqa: E731
        eos = self.family.end_of_turn_ids(tokenizer)
        with evaluating(self.model):
            rows = self._resume(ids)
            if rows is None:
                extra = image_inputs(self.family, batch)
                rows = feed(self.model, self.cache, [one_row(batch, 0, None, keys)], extra, self.meter)
            elif len(rows.ids[0]) < len(ids):  # its last token, counted when it was generated
                self.meter.prompt += len(ids) - len(rows.ids[0]) - 1
                rows = feed(self.model, rows, [one_row(batch, len(rows.ids[0]), None, keys)])
            out, self._ended = decode(
                self.model,
                rows.repeat(n, keep=False),
                pick,
                self.max_new_tokens,
                eos,
                stop_at,
                self.meter,
                keep_final=True,
            )
        self.meter.calls += 1
        return out


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
    meter, cache = TokenMeter(), new_cache(model, slots=2 * beam_size + 2)
    judge = judge or ModelJudge(model, processor, family, meter, cache=cache)
    sampler = sampler or ModelSampler(
        model, processor, family, messages, images, meter, max_new_tokens, temperature, top_p, cache
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
    """Samples ``n`` complete replies in one batch and keeps the knockout winner (model-judged).

    A reply that does not follow the four-stage format loses its match; the judge compares whole
    replies ("which response answers the question better"). Arguments as in ``stage_search``.
    """
    meter, cache = TokenMeter(), new_cache(model, slots=2 * n + 2)
    judge = judge or ModelJudge(model, processor, family, meter, cache=cache)
    sampler = sampler or ModelSampler(
        model, processor, family, messages, images, meter, max_new_tokens, temperature, top_p, cache
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
