"""Several continuations of one prefix decoded as one batch: the prefix is fed once, then forked.

The stage search samples N candidates of the same reply so far, and its judge reads prompts that
differ only after "Response 1:". Instead of N rows that each re-read the whole prompt (and encode the
image again), ``feed`` runs the shared prefix once as a single row of a ``BatchCache``
(``cotune.infer.cache``), ``Rows.repeat`` forks it into N slots (the prefix's self-attention keys and
values copied, the image's cross-attention keys and values shared), and ``decode`` samples the N
continuations together, each row with its own ``torch.Generator``; a row that finishes stops being
fed (its slot given back, or kept for a later prompt that continues it). The cache keeps each
image's keys and values for every later prompt about it.

The rows' results do not depend on the batch: a row decoded with the others equals the same row
decoded alone with the same generator (tests/test_stage_search.py), up to floating-point summation
order.

Example:
    >>> batch = prompt_batch(model, processor, family, [encode_prompt(processor, family, messages, images)])
    >>> cache = new_cache(model)
    >>> first = one_row(batch, keys=family.token_keys)
    >>> prefix = feed(model, cache, [first], image_inputs(family, batch), meter)
    >>> pick = sample_with(0.7, 0.9, generators([1, 2, 3, 4], "cpu"))
    >>> ids, _ = decode(model, prefix.repeat(4), pick, 64, family.end_of_turn_ids(tokenizer), None, meter)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from cotune.infer.cache import BatchCache, forward
from cotune.infer.generate import TokenMeter, model_device_dtype
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


def new_cache(model: torch.nn.Module, slots: int = 8) -> BatchCache:
    """An empty ``BatchCache`` for ``model`` (PEFT-wrapped or not), on its device and in its dtype,
    that keeps every image it has seen (a search's prompts keep coming back to its image)."""
    device, dtype = model_device_dtype(model)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return BatchCache(config, device, dtype, slots=slots, keep_images=True)


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
    return {"input_ids": torch.tensor(ids, device=rows.logits.device), **piece}


def same_inputs(a: dict, b: dict) -> bool:
    """Whether two dicts of tensors hold the same keys and values."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@dataclass
class Rows:
    """Sequences in slots of one ``BatchCache``: what each has been fed and its next-token logits.

    Feeding rows changes their slots in place; ``repeat`` forks them into new slots, ``select``
    picks some without copying (they are the same slots), ``free`` gives the slots back.

    Attributes:
        cache: the cache the slots belong to.
        slots: each row's slot.
        logits: (rows, vocab) float32 logits of each row's next token.
        ids: the token ids each row has been fed (padding left out).
        tails: per token-aligned key other than the ids (Mllama's ``cross_attention_mask``), its value
            at each row's last token, (rows, 1, ...): a generated token repeats it.
    """

    cache: BatchCache
    slots: list[int]
    logits: torch.Tensor
    ids: list[list[int]]
    tails: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, index: list[int]) -> Rows:
        """The rows at ``index``: the same slots (feeding one feeds the other)."""
        idx = torch.tensor(index, dtype=torch.long, device=self.logits.device)
        return Rows(
            self.cache,
            [self.slots[i] for i in index],
            self.logits[idx],
            [self.ids[i] for i in index],
            {k: v[idx] for k, v in self.tails.items()},
        )

    def repeat(self, n: int, keep: bool = True) -> Rows:
        """Each row ``n`` times, in new slots (these rows are left as they are); ``keep=False``:
        each row is the first of its ``n`` (one copy fewer; these rows are not to be used again)."""
        slots = [
            new for s in self.slots for new in ([] if keep else [s]) + self.cache.fork(s, n - (not keep))
        ]
        index = [i for i in range(len(self)) for _ in range(n)]
        return Rows(self.cache, slots, *_at(self, index))

    def free(self) -> None:
        """Gives the rows' slots back to the cache."""
        self.cache.free(self.slots)


def _at(rows: Rows, index: list[int]) -> tuple:
    idx = torch.tensor(index, dtype=torch.long, device=rows.logits.device)
    return rows.logits[idx], [list(rows.ids[i]) for i in index], {k: v[idx] for k, v in rows.tails.items()}


@torch.no_grad()
def feed(
    model: torch.nn.Module,
    rows: Rows | BatchCache,
    pieces: list[dict],
    extra: dict | None = None,
    meter: TokenMeter | None = None,
) -> Rows:
    """Feeds each row its own tokens in one forward; returns the rows after them (the same slots).

    Rows whose pieces differ in length are padded between what they were fed before and their piece
    (masked out, position ids counted over real tokens only), so every row ends on its last token.

    Args:
        model: the model (its active adapter is used); put in eval mode by the caller.
        rows: the rows so far, or a ``BatchCache``: new rows, one per piece.
        pieces: per row, ``input_ids`` (L,) and the other token-aligned keys (L, ...); L may be 0.
        extra: inputs for this forward only: the images of a single new row (their keys and values
            stay in the cache for every later prompt about them).
        meter: adds the tokens fed to ``prompt``.
    """
    fresh = isinstance(rows, BatchCache)
    cache = rows if fresh else rows.cache
    slots = [cache.add() for _ in pieces] if fresh else rows.slots
    fed = {s: p for s, p in zip(slots, pieces) if len(p["input_ids"])}
    if not fed:
        return rows
    logits = forward(model, cache, fed, extra)
    at = {s: i for i, s in enumerate(fed)}
    keys = [k for k in pieces[0] if k != "input_ids"]
    old_logits = None if fresh else rows.logits
    out_logits, tails = [], {k: [] for k in keys}
    for b, (s, p) in enumerate(zip(slots, pieces)):
        out_logits.append(logits[at[s]] if s in at else old_logits[b])
        for k in keys:
            tails[k].append(p[k][-1:].to(logits.device) if s in at else rows.tails[k][b])
    ids = [([] if fresh else rows.ids[b]) + p["input_ids"].tolist() for b, p in enumerate(pieces)]
    if meter is not None:
        meter.prompt += sum(len(p["input_ids"]) for p in pieces)
    return Rows(cache, slots, torch.stack(out_logits), ids, {k: torch.stack(v) for k, v in tails.items()})


def _step(model: torch.nn.Module, rows: Rows, tokens: list[int]) -> Rows:
    """Feeds one generated token to each row."""
    device = rows.logits.device
    pieces = {
        s: {"input_ids": torch.tensor([t], device=device), **{k: v[b] for k, v in rows.tails.items()}}
        for b, (s, t) in enumerate(zip(rows.slots, tokens))
    }
    logits = forward(model, rows.cache, pieces)
    fed = [r + [t] for r, t in zip(rows.ids, tokens)]
    return Rows(rows.cache, rows.slots, logits, fed, rows.tails)


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
        rows: the rows to continue (``Rows.repeat`` of a prefix); their slots are fed in place.
        pick: chooses each live row's next token (``greedy`` or ``sample_with``).
        max_new_tokens: limit per row.
        eos: ids that end a row.
        stop: ``ids -> bool``: an extra end (a stop string).
        meter: adds the tokens generated (the end-of-turn token too).
        keep_final: also return each row as it ended (its slot, fed all but its last token) so that a
            later prompt that continues it needs to feed only that token; otherwise a row's slot is
            given back when it ends.

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
        for j in ended:
            if keep_final:
                final[live[j]] = rows.select([j])
            else:
                rows.cache.free([rows.slots[j]])
        keep = [j for j in range(len(live)) if j not in ended]
        if not keep:
            return out, final
        if ended:
            rows, live, tokens = rows.select(keep), [live[j] for j in keep], [tokens[j] for j in keep]
        rows = _step(model, rows, tokens)
    if keep_final:  # rows cut at max_new_tokens without ending
        for j, r in enumerate(live):
            final[r] = rows.select([j])
    else:
        rows.free()
    return out, final
