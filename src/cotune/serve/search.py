"""A request with ``"search": "stage"`` (or ``"best-of-n"``) in its body's extra fields: the reply of
``cotune.infer.stage_search`` with the request's adapter, run on the engine's thread (the search
makes its own batched calls; the running batch waits for it), and what it cost."""

from __future__ import annotations

import asyncio

from cotune.infer.adapters import use_adapter
from cotune.infer.stage_search import best_of_n, stage_search
from cotune.serve.completions import head, message
from cotune.serve.protocol import ChatRequest
from cotune.serve.state import ServerState


async def run_search(
    state: ServerState, request: ChatRequest, adapter: str, item: dict, images: list
) -> dict:
    """The search's reply as a chat completion; its ``search`` field holds the forward tokens spent
    and their ratio to one plain generation of the same reply."""
    engine, sampling = state.engine, request.sampling
    temperature = sampling.temperature or 0.7  # a search samples its candidates
    search = stage_search if request.search == "stage" else best_of_n

    def work():
        with use_adapter(engine.model, adapter):
            return search(
                engine.model, engine.processor, engine.family, request.messages, images, request.beam_size,
                sampling.max_tokens, temperature, sampling.top_p, sampling.seed,
            )  # fmt: skip

    result = await asyncio.wait_for(asyncio.wrap_future(engine.call(work)), timeout=state.timeout_s)
    prompt = len(item["input_ids"])
    plain = prompt + result.reply_tokens + 1  # the prompt once, the reply and its end of turn
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": result.reply_tokens,
        "total_tokens": prompt + result.reply_tokens,
    }
    cost = {
        "kind": request.search,
        "beam_size": request.beam_size,
        "forward_tokens": result.meter.total,
        "plain_forward_tokens": plain,
        "cost_ratio": round(result.meter.total / plain, 3),
        "comparisons": result.comparisons,
    }
    choice = {"index": 0, "message": message(result.text, state.reasoning_parser), "logprobs": None}
    choice["finish_reason"] = "stop"
    return {**head(request, "chat.completion"), "choices": [choice], "usage": usage, "search": cost}
