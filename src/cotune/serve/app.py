"""The OpenAI-compatible HTTP API (FastAPI), following vLLM's conventions where it has them.

``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/load_lora_adapter``,
``POST /v1/unload_lora_adapter``, ``GET /metrics``. Every endpoint but ``/health`` requires the
Bearer key when one is set; every refusal is OpenAI's error body naming the field.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cotune.serve import completions
from cotune.serve.protocol import APIError, parse_chat_request
from cotune.serve.search import run_search
from cotune.serve.state import ServerState

OPEN_PATHS = ("/health",)


class JobStream(StreamingResponse):
    """A streamed reply that cancels its job however the response ends: the client going away ends
    it with an exception, and the event generator's own ``finally`` would wait for the garbage
    collector."""

    def __init__(self, job, content, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled.set()  # a no-op once the job is done


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing more than ``limit`` bytes (413) and anything not JSON (400)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise APIError(
            413, f"the body is over the limit of {limit:,} bytes (--max_body_mb)", None, "body_too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(
                413, f"the body is over the limit of {limit:,} bytes (--max_body_mb)", None, "body_too_large"
            )
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise APIError(400, "the body is not valid JSON", None, "invalid_json") from None


def create_app(state: ServerState) -> FastAPI:
    """The API over ``state`` (its engine must be started)."""
    app = FastAPI(title="cotune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.cotune = state

    _add_error_handling(app, state)

    @app.get("/health")
    async def health():
        alive = state.engine.thread is not None and state.engine.thread.is_alive()
        return JSONResponse(
            {"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503
        )

    @app.get("/v1/models")
    async def models():
        return state.model_list()

    @app.get("/metrics")
    async def metrics():
        text = state.engine.metrics.render(adapters=len(state.adapters))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return PlainTextResponse(await state.load_adapter(await read_json(request, state.max_body_bytes)))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return PlainTextResponse(await state.unload_adapter(await read_json(request, state.max_body_bytes)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state.engine.metrics.add("requests_total", 1)
        body = parse_chat_request(await read_json(request, state.max_body_bytes), state.limits)
        adapter, item, images = await completions.prepare(state, body)
        if body.search != "none":
            return await run_search(state, body, adapter, item, images)
        job, events = completions.submit(state, body, adapter, item)
        if body.stream:
            return JobStream(
                job,
                completions.stream(state, body, job, events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await completions.collect(state, body, job, events, request.is_disconnected)

    return app


def _add_error_handling(app: FastAPI, state: ServerState) -> None:
    """The API key check on every endpoint but /health, and every error as an OpenAI error body."""

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if state.api_key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {state.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                error = APIError(
                    401, "a valid API key is required (Authorization: Bearer KEY)", None, "invalid_api_key"
                )
                return error_response(error)
        try:
            return await call_next(request)
        except APIError as e:
            return error_response(e)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        if error.status < 500 or error.status == 503:
            state.engine.metrics.add("requests_rejected", 1)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = "not_found" if error.status_code == 404 else None
        return error_response(APIError(error.status_code, str(error.detail), None, code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        return error_response(
            APIError(500, f"{type(error).__name__}: {error}", None, "internal_error", "server_error")
        )
