"""Several continuations of one prefix decoded as one batch: the prefix is fed once, its cache copied.

The stage search samples N candidates of the same reply so far, and its judge reads prompts that
differ only after "Response 1:". Instead of N rows that each re-read the whole prompt (and encode the
image again), ``feed`` runs the shared prefix once as a single row, ``Rows.repeat`` copies its cache
(self-attention keys and values, and Mllama's cross-attention image keys and values) to N rows, and
``decode`` samples the N continuations together, each row with its own ``torch.Generator``, dropping
rows from the batch as they finish. ``ImageMemo`` encodes an image once for every prompt about it.

The rows' results do not depend on the batch: a row decoded with the others equals the same row
decoded alone with the same generator (tests/test_stage_search.py), up to floating-point summation
order.

Example:
    >>> batch = prompt_batch(model, processor, family, [encode_prompt(processor, family, messages, images)])
    >>> memo = ImageMemo(model, family)
    >>> first = one_row(batch, keys=family.token_keys)
    >>> prefix = feed(model, family, None, [first], memo(image_inputs(family, batch)), meter)
    >>> pick = sample_with(0.7, 0.9, generators([1, 2, 3, 4], "cpu"))
    >>> ids, _ = decode(model, prefix.repeat(4), pick, 64, family.end_of_turn_ids(tokenizer), None, meter)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from cotune.infer.generate import TokenMeter
from cotune.models.families import ModelFamily


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def image_inputs(family: ModelFamily, batch: dict) -> dict:
    """The entries of a collated batch that carry images (the forward's inputs not laid out along the text)."""
    skip = set(family.token_keys) | {"labels", "position_ids"}
    return {k: v for k, v in batch.items() if k in family.input_keys and k not in skip}


def one_row(batch: dict, start: int = 0, end: int | None = None, keys: tuple[str, ...] = ()) -> dict:
    """Positions ``start:end`` of row 0 of a collated batch: its ``input_ids`` and the other ``keys``."""
    names = ("input_ids", *[k for k in keys if k not in ("input_ids", "attention_mask") and k in batch])
    return {k: batch[k][0, start:end] for k in names}


def appended(rows: Rows, row: int, ids: list[int]) -> dict:
    """A piece that appends ``ids`` to row ``row``: the token-aligned keys repeat its last token's."""
    n = len(ids)
    piece = {k: v[row].expand(n, *v.shape[2:]) for k, v in rows.tails.items()}
    return {"input_ids": torch.tensor(ids, device=rows.mask.device), **piece}


def same_inputs(a: dict, b: dict) -> bool:
    """Whether two dicts of tensors hold the same keys and values."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class ImageMemo:
    """Encodes a prompt's images once and hands the encoding out again for the same image inputs.

    With a family that has no ``encode_images`` the pixels pass through (each prefill encodes them).
    ``encodes`` counts the encodings.
    """

    def __init__(self, model: torch.nn.Module, family: ModelFamily) -> None:
        self.model, self.family = model, family
        self.encodes = 0
        self._key: dict | None = None
        self._value: dict = {}

    def __call__(self, images: dict) -> dict:
        if not images or self.family.encode_images is None:
            return images
        if self._key is None or not same_inputs(self._key, images):
            self._key, self._value = images, self.family.encode_images(self.model, images)
            self.encodes += 1
        return self._value


@dataclass
class Rows:
    """Sequences that share one model cache: what each has been fed and its next-token logits.

    Attributes:
        cache: the model's key/value cache, one row per sequence.
        mask: (rows, positions fed) 1 for a token, 0 for padding between a shared prefix and a row's own part.
        positions: (rows,) the position id of each row's next token.
        logits: (rows, vocab) float32 logits of each row's next token.
        ids: the token ids each row has been fed (padding left out).
        tails: per token-aligned key other than the ids and the mask (Mllama's ``cross_attention_mask``),
            its value at each row's last token, (rows, 1, ...): a generated token repeats it.
    """

    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor
    ids: list[list[int]]
    tails: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, index: list[int]) -> Rows:
        """The rows at ``index``, in a new cache (this one is left as it is)."""
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        idx = torch.tensor(index, device=self.mask.device)
        cache.batch_select_indices(idx)
        return Rows(
            cache,
            self.mask[idx],
            self.positions[idx],
            self.logits[idx],
            [self.ids[i] for i in index],
            {k: v[idx] for k, v in self.tails.items()},
        )

    def repeat(self, n: int) -> Rows:
        """Each row ``n`` times, in a new cache: a prefix fed once, continued ``n`` ways."""
        return self.select([i for i in range(len(self)) for _ in range(n)])


@torch.no_grad()
def feed(
    model: torch.nn.Module,
    family: ModelFamily,
    rows: Rows | None,
    pieces: list[dict],
    extra: dict | None = None,
    meter: TokenMeter | None = None,
) -> Rows:
    """Feeds each row its own tokens in one forward; returns the rows after them.

    Rows whose pieces differ in length are padded between what they were fed before and their piece
    (masked out, position ids counted over real tokens only), so every row ends on its last token.

    Args:
        model: the model (its active adapter is used); put in eval mode by the caller.
        family: the model family (which keys run along the text).
        rows: the rows so far (None: a fresh cache, one row per piece).
        pieces: per row, ``input_ids`` (L,) and the other token-aligned keys (L, ...); L may be 0.
        extra: inputs for this forward only: the images (or their encoding, see ``ImageMemo``).
        meter: adds the tokens fed to ``prompt``.
    """
    device = next(model.parameters()).device
    lengths = [len(p["input_ids"]) for p in pieces]
    width = max(lengths)
    keys = [k for k in pieces[0] if k != "input_ids"]

    def padded(key: str, fill: int) -> torch.Tensor:
        out = []
        for p, n in zip(pieces, lengths):
            x = p[key].to(device)
            pad = torch.full((width - n, *x.shape[1:]), fill, dtype=x.dtype, device=device)
            out.append(torch.cat([pad, x]))
        return torch.stack(out)

    pad_id = 0  # any id: padded positions are masked out
    new_mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=device)
    start = rows.positions if rows is not None else torch.zeros(len(pieces), dtype=torch.long, device=device)
    positions = (start[:, None] + new_mask.cumsum(1) - 1).clamp(min=0)
    mask = new_mask if rows is None else torch.cat([rows.mask, new_mask], dim=1)
    cache = rows.cache if rows is not None else DynamicCache()
    aligned = {k: padded(k, 0) for k in keys}
    out = model(
        input_ids=padded("input_ids", pad_id),
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        **aligned,
        **(extra or {}),
    )
    logits = out.logits[:, -1].float()
    fed = torch.tensor(lengths, device=device) > 0
    tails = {k: v[:, -1:] for k, v in aligned.items()}
    if rows is not None:  # a row fed nothing keeps its logits and tails
        logits = torch.where(fed[:, None], logits, rows.logits)
        for k in list(tails):
            shape = (-1,) + (1,) * (tails[k].dim() - 1)
            tails[k] = torch.where(fed.view(shape), tails[k], rows.tails[k])
    ids = [(rows.ids[b] if rows else []) + p["input_ids"].tolist() for b, p in enumerate(pieces)]
    if meter is not None:
        meter.prompt += sum(lengths)
    return Rows(out.cache, mask, start + torch.tensor(lengths, device=device), logits, ids, tails)


def _step(model: torch.nn.Module, rows: Rows, tokens: list[int]) -> Rows:
    """Feeds one generated token to each row."""
    device = rows.mask.device
    ids = torch.tensor(tokens, device=device)[:, None]
    mask = torch.cat([rows.mask, torch.ones_like(ids)], dim=1)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=rows.positions[:, None],
        cache=rows.cache,
        use_cache=True,
        logits_to_keep=1,
        **rows.tails,
    )
    fed = [r + [t] for r, t in zip(rows.ids, tokens)]
    return Rows(out.cache, mask, rows.positions + 1, out.logits[:, -1].float(), fed, rows.tails)


Pick = Callable[
    [torch.Tensor, list[int]], list[int]
]  # (logits of the live rows, their row numbers) -> tokens


def greedy(logits: torch.Tensor, live: list[int]) -> list[int]:
    return logits.argmax(-1).tolist()


def generators(seeds: list[int], device: torch.device | str) -> list[torch.Generator]:
    """One random stream per row, seeded."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def sample_with(temperature: float, top_p: float, streams: list[torch.Generator], head: int = 256) -> Pick:
    """Temperature and nucleus sampling; row i draws from ``streams[i]``.

    The nucleus is transformers' (``TopPLogitsWarper``): the most likely tokens, in order, while the
    mass before each is below ``top_p``. It is looked for among the ``head`` most likely tokens
    first (a sort of the whole vocabulary only when they hold less than ``top_p``), and each row draws
    from its nucleus alone: a draw over 128k ids per row and step would cost more than the forward of
    a small model. A temperature of 0 or below is greedy.
    """

    def pick(logits: torch.Tensor, live: list[int]) -> list[int]:
        if temperature <= 0:
            return greedy(logits, live)
        probs = (logits / temperature).softmax(-1)
        k = min(head, probs.shape[-1])
        top, ids = probs.topk(k, dim=-1)
        if top_p >= 1.0 or bool((top.sum(-1) < top_p).any()):
            top, ids = probs.sort(dim=-1, descending=True)
        if top_p < 1.0:
            top = top.masked_fill(top.cumsum(-1) - top >= top_p, 0.0)
        return [int(ids[j, torch.multinomial(top[j], 1, generator=streams[r])]) for j, r in enumerate(live)]

    return pick


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    rows: Rows,
    pick: Pick,
    max_new_tokens: int,
    eos: set[int] | list[int],
    stop: Callable[[list[int]], bool] | None = None,
    meter: TokenMeter | None = None,
    keep_final: bool = False,
) -> tuple[list[list[int]], list[Rows | None]]:
    """Generates a continuation of every row, all rows in one forward per step.

    A row ends at an end-of-turn token (left out of its ids), when ``stop`` says so of its ids (the
    last one kept), or at ``max_new_tokens``; it then leaves the batch.

    Args:
        model: the model, in eval mode.
        rows: the rows to continue (``Rows.repeat`` of a prefix).
        pick: chooses each live row's next token (``greedy`` or ``sample_with``).
        max_new_tokens: limit per row.
        eos: ids that end a row.
        stop: ``ids -> bool``: an extra end (a stop string).
        meter: adds the tokens generated (the end-of-turn token too).
        keep_final: also return each row as it ended (its cache without its last token) so that a
            later prompt that continues it needs to feed only that token.

    Returns:
        Each row's new ids, and each row as it ended (None without ``keep_final``).
    """
    eos = set(eos)
    out: list[list[int]] = [[] for _ in range(len(rows))]
    final: list[Rows | None] = [None] * len(rows)
    live = list(range(len(rows)))
    for _ in range(max_new_tokens):
        tokens = pick(rows.logits, live)
        if meter is not None:
            meter.generated += len(tokens)
        ended = []
        for j, (r, t) in enumerate(zip(live, tokens)):
            if t not in eos:
                out[r].append(t)
            if t in eos or len(out[r]) >= max_new_tokens or (stop is not None and stop(out[r])):
                ended.append(j)
        for j in ended if keep_final else ():
            final[live[j]] = rows.select([j])
        keep = [j for j in range(len(live)) if j not in ended]
        if not keep:
            break
        if ended:
            rows, live, tokens = rows.select(keep), [live[j] for j in keep], [tokens[j] for j in keep]
        rows = _step(model, rows, tokens)
    return out, final
