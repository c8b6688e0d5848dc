"""Generation from a base model with zero, one or several adapters: batched, greedy or sampled, streamed.

One code path serves ``cotune generate``, ``cotune chat``, ``cotune eval`` and the stage search:
``encode_prompt`` turns a conversation into a ``PaddingCollator`` item, ``generate_ids`` runs one
batched ``model.generate`` call and counts the tokens it spent, ``generate`` decodes, and
``stream_generate`` yields text as it comes. ``adapter=`` picks one of the adapters loaded into a
PEFT model for the call (``"none"`` is the base), see ``cotune.infer.adapters``.

Example:
    >>> messages = [user_message("How many shapes?", n_images=1)]
    >>> generate(model, processor, family, [(messages, ["a.png"])], max_new_tokens=64)
    ['<SUMMARY> ... </CONCLUSION>']
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria

from cotune.data.batching import PaddingCollator, to_device
from cotune.data.chat import prompt_ids
from cotune.data.images import load_image
from cotune.data.sample import Sample, split_placeholders
from cotune.infer.adapters import use_adapter
from cotune.models.families import ModelFamily

ACTIVE = "__active__"  # adapter=ACTIVE: whatever adapter the model has active (no switch)


@dataclass
class TokenMeter:
    """Forward tokens spent: prompt tokens prefilled plus tokens generated, over all calls.

    The figure that makes a search's cost comparable with plain generation: with a KV cache every
    call processes its prompt once and each generated token once.
    """

    prompt: int = 0
    generated: int = 0
    calls: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.generated

    def describe(self) -> str:
        return (
            f"{self.total:,} forward tokens ({self.prompt:,} prompt + {self.generated:,} generated) "
            f"in {self.calls} model call{'s' if self.calls != 1 else ''}"
        )


def user_message(text: str, n_images: int = 0) -> dict:
    """A user turn as ``conversation_to_messages`` builds it: image items, then the text.

    ``<image>`` markers in ``text`` place the images; without markers they go before the text.

    Raises:
        ValueError: the number of markers differs from ``n_images``.
    """
    items = split_placeholders(text)
    n_markers = sum(item["type"] == "image" for item in items)
    if n_markers == 0:
        items[:0] = [{"type": "image"} for _ in range(n_images)]
    elif n_markers != n_images:
        raise ValueError(f"the prompt has {n_markers} '<image>' markers but {n_images} images were given")
    return {"role": "user", "content": items}


def prompt_messages(sample: Sample) -> list[dict]:
    """The conversation up to (not including) its last assistant reply."""
    last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
    return sample.messages[:last]


def count_images(messages: list[dict]) -> int:
    return sum(1 for m in messages for c in m["content"] if isinstance(c, dict) and c.get("type") == "image")


def encode_prompt(
    processor: Any,
    family: ModelFamily,
    messages: list[dict],
    images: list[Any],
    continuation: list[int] | tuple[int, ...] = (),
) -> dict:
    """One prompt as an item for ``PaddingCollator``: ids ending with the assistant header, images.

    Args:
        processor: the checkpoint's processor.
        family: the model family.
        messages: the conversation before the reply.
        images: paths, bytes or PIL images, one per image item of ``messages``.
        continuation: token ids of a partial reply to continue from (stage search).
    """
    ids = prompt_ids(processor, messages, family.image_token, family.tokens_per_image(processor))
    ids = [*ids, *continuation]
    item = {"input_ids": torch.tensor(ids), "labels": torch.full((len(ids),), -100)}
    n_images = count_images(messages)
    if n_images:
        pil = [load_image(ref) for ref in images[:n_images]]
        item.update(family.image_inputs(processor, [pil]))
    return item


def left_pad(batch: dict, family: ModelFamily) -> dict:
    """Turns a right-padded batch into a left-padded one (generation appends on the right): the
    family's ``token_keys`` move with the tokens."""
    lengths = batch["attention_mask"].sum(dim=1)
    seq_len = batch["input_ids"].shape[1]
    out = dict(batch)
    for key in family.token_keys:
        if key in batch:
            rows = [
                torch.roll(batch[key][b], shifts=int(seq_len - lengths[b]), dims=0)
                for b in range(len(lengths))
            ]
            out[key] = torch.stack(rows)
    out.pop("labels", None)
    return out


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    return device, dtype


def prompt_batch(model: torch.nn.Module, processor: Any, family: ModelFamily, items: list[dict]) -> dict:
    """Collates encoded prompts, left-padded and on the model's device, ready for ``model.generate``."""
    tokenizer = processor.tokenizer
    collate = PaddingCollator(tokenizer.pad_token_id, family, family.image_token_id(tokenizer))
    device, dtype = model_device_dtype(model)
    return to_device(left_pad(collate(items), family), device, float_dtype=dtype)


@contextlib.contextmanager
def seeded(seed: int | None):
    """Seeds torch's RNGs for the block and restores them afterwards (None: no seeding)."""
    if seed is None or seed < 0:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class StopOnText(StoppingCriteria):
    """A stopping criterion: a row ends once its generated text contains one of ``stops``.

    Decodes only the last few generated tokens of each row per step. (transformers' own
    ``stop_strings`` preprocesses the whole vocabulary for every new set of strings: seconds per call
    with Llama 3's 128k tokens, and the stage search uses a new stop string for every stage.)
    """

    def __init__(self, tokenizer: Any, stops: list[str], prompt_len: int) -> None:
        self.tokenizer, self.stops, self.prompt_len = tokenizer, list(stops), prompt_len
        self.window = 2 * max(len(s) for s in self.stops) + 8  # tokens; each decodes to >= 1 character

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tails = input_ids[:, self.prompt_len :][:, -self.window :].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    items: list[dict],
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_strings: list[str] | None = None,
    streamer: Any = None,
    meter: TokenMeter | None = None,
) -> list[list[int]]:
    """One batched ``model.generate`` call over encoded prompts; returns each row's new token ids.

    The ids stop before the end-of-turn token (and padding); with ``stop_strings`` a row also stops
    once its text contains one of them (the ids then end with the token that completed it).

    Args:
        model: a base or PEFT model (its active adapter is used).
        processor: the checkpoint's processor.
        family: the model family.
        items: ``encode_prompt`` items (one row each; repeat an item to sample it several times).
        max_new_tokens: limit per row.
        do_sample, temperature, top_p: sampling settings (greedy by default).
        stop_strings: extra strings that end a row (e.g. ``"</SUMMARY>"``).
        streamer: a transformers streamer (one row only).
        meter: adds this call's prompt and generated tokens.
    """
    tokenizer = processor.tokenizer
    batch = prompt_batch(model, processor, family, items)
    eos = family.end_of_turn_ids(tokenizer)
    kwargs = _generate_kwargs(tokenizer, eos, max_new_tokens, do_sample, temperature, top_p)
    if stop_strings:
        from transformers import StoppingCriteriaList

        prompt_len = batch["input_ids"].shape[1]
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnText(tokenizer, stop_strings, prompt_len)])
    was_training = model.training
    model.eval()
    try:
        out = model.generate(**batch, streamer=streamer, **kwargs)
    finally:
        model.train(was_training)
    rows, generated = _cut_rows(out[:, batch["input_ids"].shape[1] :].tolist(), eos, tokenizer.pad_token_id)
    if meter is not None:
        meter.prompt += int(batch["attention_mask"].sum())
        meter.generated += generated
        meter.calls += 1
    return rows


def _generate_kwargs(
    tokenizer: Any, eos: list[int], max_new_tokens: int, do_sample: bool, temperature: float, top_p: float
) -> dict[str, Any]:
    """``model.generate``'s settings: every end-of-turn id stops a row; greedy unsets the sampling knobs
    (a checkpoint's generation_config may sample by default)."""
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def _cut_rows(new: list[list[int]], eos: list[int], pad_id: int | None) -> tuple[list[list[int]], int]:
    """Each row's ids before its first end-of-turn id (or without trailing padding, where a stop string
    ended it), and the number of tokens generated in all (an end-of-turn id counts)."""
    rows, generated = [], 0
    for ids in new:
        cut = next((i for i, t in enumerate(ids) if t in eos), None)
        if cut is not None:
            ids, spent = ids[:cut], cut + 1
        else:
            while ids and ids[-1] == pad_id:  # finished by a stop string, then padded
                ids = ids[:-1]
            spent = len(ids)
        rows.append(ids)
        generated += spent
    return rows, generated


def generate(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    prompts: list[tuple[list[dict], list[Any]]],
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    streamer: Any = None,
    seed: int | None = None,
    adapter: str | None = ACTIVE,
    stop_strings: list[str] | None = None,
    meter: TokenMeter | None = None,
) -> list[str]:
    """Generates a reply for each (messages, images) prompt, in one batch.

    Args:
        model: a base model or a PEFT model with one or several adapters.
        processor: the checkpoint's processor.
        family: the model family.
        prompts: conversations ending before the reply, with their images.
        max_new_tokens: limit per reply; generation also stops at the end-of-turn token.
        do_sample, temperature, top_p: sampling settings (greedy by default).
        streamer: a transformers streamer (batch of one only).
        seed: seeds sampling for this call (None: the global RNG as it is).
        adapter: which loaded adapter to use; ``"none"`` is the base model; by default the active one.
        stop_strings: extra strings that end a reply.
        meter: counts the forward tokens spent.

    Returns:
        The decoded replies, special tokens removed.
    """
    items = [encode_prompt(processor, family, msgs, imgs) for msgs, imgs in prompts]
    switch = contextlib.nullcontext() if adapter == ACTIVE else use_adapter(model, adapter)
    with switch, seeded(seed):
        rows = generate_ids(
            model,
            processor,
            family,
            items,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            stop_strings=stop_strings,
            streamer=streamer,
            meter=meter,
        )
    return processor.tokenizer.batch_decode(rows, skip_special_tokens=True)


def stream_generate(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    messages: list[dict],
    images: list[Any],
    **kwargs: Any,
) -> Iterator[str]:
    """Yields the reply to one prompt piece by piece as it is generated.

    Runs ``generate`` (same arguments as its keywords) in a thread with a ``TextIteratorStreamer``;
    the pieces joined are exactly what ``generate`` returns. An error in generation is re-raised here.
    """
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            generate(model, processor, family, [(messages, images)], streamer=streamer, **kwargs)
        except BaseException as e:  # handed to the consumer; end() unblocks its loop
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failure:
        raise failure[0]
