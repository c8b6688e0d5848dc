"""The model's probability of answering "yes" at the CONCLUSION: the score behind the yes/no ROC AUC.

For each yes/no question the prompt and the model's own reply up to its ``<CONCLUSION>`` tag (and
the whitespace the model wrote after it) are fed in one forward pass, and the next-token
distribution is read: the probability of *the first token* of "Yes" / "yes" (with and without a
leading space) against that of "No" / "no", normalised over the two:
``p = P(yes tokens) / (P(yes tokens) + P(no tokens))``. A reply without a CONCLUSION gets one
appended (``\\n\\n<CONCLUSION> ``). First-token probability, not the whole word's: for Llama 3's
tokenizer "Yes" and "No" (and their spaced forms) are single tokens, so the two agree there.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from cotune.infer.generate import encode_prompt, prompt_batch
from cotune.models.families import ModelFamily

YES_FORMS = ("Yes", " Yes", "yes", " yes")
NO_FORMS = ("No", " No", "no", " no")


def first_token_ids(tokenizer: Any, forms: tuple[str, ...]) -> list[int]:
    """The distinct first tokens of each form (no special tokens)."""
    ids = {tokenizer(f, add_special_tokens=False)["input_ids"][0] for f in forms}
    return sorted(ids)


def conclusion_prefix(reply: str) -> str:
    """The reply up to where its CONCLUSION's answer starts (a CONCLUSION tag appended if absent)."""
    m = re.search(r"<CONCLUSION>\s*", reply)
    if m:
        return reply[: m.end()]
    return (reply.rstrip() + "\n\n" if reply.strip() else "") + "<CONCLUSION> "


@torch.no_grad()
def yes_probabilities(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    prompts: list[tuple[list[dict], list[Any]]],
    replies: list[str],
    batch_size: int = 8,
) -> list[float]:
    """For each (messages, images) prompt and its reply, P(yes) at the CONCLUSION (see the module).

    Runs the active adapter, one left-padded batch of ``batch_size`` prompts per forward pass.
    """
    tokenizer = processor.tokenizer
    yes_ids, no_ids = first_token_ids(tokenizer, YES_FORMS), first_token_ids(tokenizer, NO_FORMS)
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in range(0, len(prompts), batch_size):
            items = []
            for (messages, images), reply in zip(
                prompts[start : start + batch_size], replies[start : start + batch_size]
            ):
                continuation = tokenizer(conclusion_prefix(reply), add_special_tokens=False)["input_ids"]
                items.append(encode_prompt(processor, family, messages, images, continuation))
            batch = prompt_batch(model, processor, family, items)
            logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1].float()  # left-padded
            probs = torch.softmax(logits, dim=-1)
            p_yes, p_no = probs[:, yes_ids].sum(-1), probs[:, no_ids].sum(-1)
            out += (p_yes / (p_yes + p_no).clamp_min(1e-30)).tolist()
    finally:
        model.train(was_training)
    return out
