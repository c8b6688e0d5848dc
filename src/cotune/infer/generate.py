"""Generation from a base model with or without an adapter, batched, greedy or sampled."""

from __future__ import annotations

from typing import Any

import torch

from cotune.data.batching import PaddingCollator, to_device
from cotune.data.chat import prompt_ids
from cotune.data.images import load_image
from cotune.data.records import Sample
from cotune.models.families import ModelFamily


def prompt_messages(sample: Sample) -> list[dict]:
    """The conversation up to (not including) its last assistant reply."""
    last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
    return sample.messages[:last]


def encode_prompt(processor: Any, family: ModelFamily, messages: list[dict], images: list[Any]) -> dict:
    """One prompt as an item for ``PaddingCollator``: ids ending with the assistant header, images."""
    ids = prompt_ids(processor, messages, family.image_token, family.tokens_per_image(processor))
    item = {"input_ids": torch.tensor(ids), "labels": torch.full((len(ids),), -100)}
    n_images = sum(
        1 for m in messages for c in m["content"] if isinstance(c, dict) and c.get("type") == "image"
    )
    if n_images:
        pil = [load_image(ref) for ref in images[:n_images]]
        item.update(family.image_inputs(processor, [pil]))
    return item


def left_pad(batch: dict) -> dict:
    """Turns a right-padded batch into a left-padded one (generation appends on the right)."""
    lengths = batch["attention_mask"].sum(dim=1)
    seq_len = batch["input_ids"].shape[1]
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "cross_attention_mask"):
        if key in batch:
            rows = [
                torch.roll(batch[key][b], shifts=int(seq_len - lengths[b]), dims=0)
                for b in range(len(lengths))
            ]
            out[key] = torch.stack(rows)
    out.pop("labels", None)
    return out


@torch.no_grad()
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
) -> list[str]:
    """Generates a reply for each (messages, images) prompt, in one batch.

    Args:
        model: a base model or a PEFT model (its active adapter is used).
        processor: the checkpoint's processor.
        family: the model family.
        prompts: conversations ending before the reply, with their images.
        max_new_tokens: limit per reply; generation also stops at the end-of-turn token.
        do_sample, temperature, top_p: sampling settings (greedy by default).
        streamer: a transformers streamer (batch of one only).

    Returns:
        The decoded replies, special tokens removed.
    """
    tokenizer = processor.tokenizer
    items = [encode_prompt(processor, family, msgs, imgs) for msgs, imgs in prompts]
    collate = PaddingCollator(tokenizer.pad_token_id, family, family.image_token_id(tokenizer))
    batch = left_pad(collate(items))
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    batch = to_device(batch, device, float_dtype=dtype)
    eos = [
        t for t in (tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.eos_token_id) if t is not None
    ]
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    out = model.generate(**batch, streamer=streamer, **kwargs)
    model.train(was_training)
    new = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
