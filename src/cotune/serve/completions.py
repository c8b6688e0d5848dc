"""One chat completion: the checked request becomes a ``Job``; its engine events become OpenAI's
response, whole or as server-sent events (``data: {chunk}`` ... ``data: [DONE]``)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool

from cotune.infer.generate import encode_prompt
from cotune.serve.engine import Job, QueueFull
from cotune.serve.media import load_image_url
from cotune.serve.protocol import APIError, ChatRequest, check_length
from cotune.serve.reasoning import ReasoningStream, split_llava_cot
from cotune.serve.state import ServerState


async def prepare(state: ServerState, request: ChatRequest) -> tuple[str, dict, list]:
    """(adapter, encoded prompt, images): images decoded within the limits, the prompt tokenized and measured."""
    adapter = state.adapter_for(request.model)
    limits = state.limits
    images = []
    for url, param in request.image_urls:
        images.append(
            await run_in_threadpool(
                load_image_url, url, param, limits.max_image_pixels, limits.allowed_media_dir
            )
        )
    engine = state.engine

    def encode() -> dict:
        try:
            return encode_prompt(engine.processor, engine.family, request.messages, images)
        except Exception as e:  # the chat template refuses it (e.g. a system message with images)
            raise APIError(400, f"the conversation cannot be rendered: {e}", "messages") from None

    item = await run_in_threadpool(encode)
    check_length(request, len(item["input_ids"]), limits)
    return adapter, item, images


def submit(state: ServerState, request: ChatRequest, adapter: str, item: dict) -> tuple[Job, asyncio.Queue]:
    """Queues the job; its events arrive on the returned asyncio queue."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event: dict) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(item, adapter, request.sampling, emit, n=request.n, timeout_s=state.timeout_s)
    try:
        state.engine.submit(job)
    except QueueFull as e:
        raise APIError(
            503,
            f"the server is busy: {e}; retry shortly",
            None,
            "queue_full",
            "server_error",
            {"Retry-After": "1"},
        ) from None
    return job, events


def head(request: ChatRequest, kind: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": request.model,
    }


def message(text: str, parser: str) -> dict:
    if parser == "llava-cot":
        reasoning, content = split_llava_cot(text)
        return {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
    return {"role": "assistant", "content": text}


def _error_of(event: dict) -> APIError:
    code = event.get("code") or "internal_error"
    return APIError(event.get("status", 500), event["message"], None, code, "server_error")


async def collect(state: ServerState, request: ChatRequest, job: Job, events: asyncio.Queue, is_gone) -> dict:
    """The whole response; cancels the job when ``await is_gone()`` says the client left."""
    texts = [""] * request.n
    logprobs: list[list] = [[] for _ in range(request.n)]
    reasons: list[Any] = [None] * request.n
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await is_gone():
                job.cancelled.set()
                raise APIError(499, "the client went away", None, "client_closed") from None
            continue
        kind = event["type"]
        if kind == "delta":
            texts[event["index"]] += event["text"]
            if "logprobs" in event:
                logprobs[event["index"]].append(event["logprobs"])
        elif kind == "finish":
            reasons[event["index"]] = event["reason"]
        elif kind == "error":
            raise _error_of(event)
        elif kind == "done":
            choices = [
                {
                    "index": i,
                    "message": message(texts[i], state.reasoning_parser),
                    "logprobs": {"content": logprobs[i]} if request.sampling.logprobs else None,
                    "finish_reason": reasons[i],
                }
                for i in range(request.n)
            ]
            return {**head(request, "chat.completion"), "choices": choices, "usage": event["usage"]}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


async def stream(
    state: ServerState, request: ChatRequest, job: Job, events: asyncio.Queue
) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice, content chunks, finish chunks, usage, [DONE].

    The client going away closes this generator: the job is cancelled and its rows leave the batch.
    """
    first = head(request, "chat.completion.chunk")
    parsers = [ReasoningStream() if state.reasoning_parser else None for _ in range(request.n)]

    def chunk(index: int, delta: dict, finish=None, logprobs=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        extra = {"usage": None} if request.include_usage else {}
        return _sse({**first, "choices": [choice], **extra})

    try:
        for i in range(request.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            kind, index = event["type"], event.get("index", 0)
            if kind == "delta":
                logprobs = {"content": [event["logprobs"]]} if "logprobs" in event else None
                delta = _delta(parsers[index], event["text"])
                if delta or logprobs:
                    yield chunk(index, delta, logprobs=logprobs)
            elif kind == "finish":
                delta = _delta(parsers[index], "", final=True)
                if delta:
                    yield chunk(index, delta)
                yield chunk(index, {}, finish=event["reason"])
            elif kind == "error":
                yield _sse(_error_of(event).body())
                break
            elif kind == "done":
                if request.include_usage:
                    yield _sse({**first, "choices": [], "usage": event["usage"]})
                break
        yield _sse("[DONE]")
    finally:
        job.cancelled.set()  # a no-op once the job is done


def _delta(parser: ReasoningStream | None, piece: str, final: bool = False) -> dict:
    if parser is None:
        return {"content": piece} if piece else {}
    reasoning, content = parser.add(piece, final)
    delta = {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    return delta
