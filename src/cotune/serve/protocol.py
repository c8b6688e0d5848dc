"""OpenAI's chat completion request, checked field by field, and its errors.

Every problem is an ``APIError`` whose body is OpenAI's ``{"error": {"message", "type", "param",
"code"}}`` naming the field (``messages[0].content[1].image_url.url``); fields this server does not
use are ignored, as clients send many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cotune.serve.sampling import Sampling

SEARCHES = ("none", "stage", "best-of-n")


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What a request may ask for (``ServeOptions``)."""

    max_images: int = 4
    max_image_pixels: int = 16_000_000
    max_n: int = 8
    max_model_len: int = 131072
    default_max_tokens: int = 256
    allowed_media_dir: str = ""


@dataclass
class ChatRequest:
    """A checked request: cotune's messages (image items in place) with the decoded images."""

    model: str
    messages: list[dict]
    image_urls: list[tuple[str, str]]  # (url, param), decoded later by media.load_image_url
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    max_tokens_given: str = ""  # the field that set max_tokens, if one did
    search: str = "none"
    beam_size: int = 4
    extra: dict = field(default_factory=dict)


def _number(body: dict, name: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low:g} and {high:g}; got {value}", name)
    return value


def _bool(body: dict, name: str, prefix: str = "") -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{prefix}{name}' must be true or false", prefix + name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(stops)


def _content(content: Any, param: str, urls: list) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise APIError(400, "content must be a string or a non-empty list of parts", param)
    items = []
    for k, part in enumerate(content):
        where = f"{param}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            items.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise APIError(400, "image_url.url must be a string", f"{where}.image_url.url")
            urls.append((url, f"{where}.image_url.url"))
            items.append({"type": "image"})
        else:
            raise APIError(400, "a content part must be {type: text, text} or {type: image_url}", where)
    return items


def parse_messages(messages: Any) -> tuple[list[dict], list[tuple[str, str]]]:
    """cotune's messages and the image URLs, in order."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    out, urls = [], []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, "a message must be an object with role and content", param)
        role = {"developer": "system"}.get(message.get("role"), message.get("role"))
        if role not in ("system", "user", "assistant"):
            raise APIError(400, "role must be system, developer, user or assistant", f"{param}.role")
        if "content" not in message:
            raise APIError(400, "a message needs content", f"{param}.content")
        out.append({"role": role, "content": _content(message["content"], f"{param}.content", urls)})
    if out[-1]["role"] == "assistant":
        raise APIError(400, "the last message must not be the assistant's", f"messages[{len(out) - 1}].role")
    return out, urls


def _search(body: dict) -> tuple[str, int]:
    search = body.get("search", "none") or "none"
    if search not in SEARCHES:
        raise APIError(400, f"'search' must be one of {', '.join(SEARCHES)}", "search")
    return search, _number(body, "beam_size", 4, 1, 16, integer=True)


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """Checks a /v1/chat/completions body; the prompt's length is checked once it is tokenized.

    Raises:
        APIError: 400 naming the first wrong field.
    """
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' must be the id of a served model (GET /v1/models)", "model")
    messages, urls = parse_messages(body.get("messages"))
    if len(urls) > limits.max_images:
        raise APIError(400, f"{len(urls)} images; the limit is {limits.max_images} per request", "messages")
    given = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, given, 0, 1, limits.max_model_len, integer=True)
    logprobs = _bool(body, "logprobs")
    top = _number(body, "top_logprobs", 0, 0, 20, integer=True)
    if top and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    sampling = Sampling(
        max_tokens=max_tokens or limits.default_max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)),
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        stop=_stop(body),
        logprobs=logprobs,
        top_logprobs=top,
    )
    if sampling.top_p == 0:
        raise APIError(400, "'top_p' must be above 0", "top_p")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    search, beam_size = _search(body)
    request = ChatRequest(
        model=model,
        messages=messages,
        image_urls=urls,
        sampling=sampling,
        n=_number(body, "n", 1, 1, limits.max_n, integer=True),
        stream=_bool(body, "stream"),
        include_usage=bool(options and _bool(options, "include_usage", "stream_options.")),
        max_tokens_given=given if max_tokens else "",
        search=search,
        beam_size=beam_size,
    )
    if search != "none" and request.n != 1:
        raise APIError(400, "a search returns one choice: n must be 1", "n")
    if search != "none" and request.stream:
        raise APIError(400, "a search answers once it has chosen: stream must be false", "stream")
    return request


def check_length(request: ChatRequest, prompt_tokens: int, limits: Limits) -> None:
    """Fits the reply into the context: 400 when the prompt plus ``max_tokens`` do not fit."""
    room = limits.max_model_len - prompt_tokens
    if room < 1:
        raise APIError(
            400, f"the prompt is {prompt_tokens} tokens; the context is {limits.max_model_len}", "messages"
        )
    if request.sampling.max_tokens > room:
        if request.max_tokens_given:
            raise APIError(
                400,
                f"prompt ({prompt_tokens} tokens) + {request.max_tokens_given} ({request.sampling.max_tokens}) is over the "
                f"context of {limits.max_model_len} tokens",
                request.max_tokens_given,
            )
        request.sampling.max_tokens = room
