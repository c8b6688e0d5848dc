"""A teacher for ``cotune data reason``: any OpenAI-compatible chat completions endpoint (``cotune
serve``, vLLM, a hosted API), asked over plain HTTP (httpx) with retries and backoff.

Retried: 429, 5xx, timeouts and lost connections, waiting ``Retry-After`` when the server says,
else 1, 2, 4 ... s (up to 60 s) with jitter. Fatal: 401/403 (the key), 404 (the URL or the model):
every later request would fail the same way. Any other 4xx is this request's problem (an image too
large, a prompt too long): it is answered with ``TeacherReply.refused`` and kept as an attempt.
"""

from __future__ import annotations

import base64
import io
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.data.images import load_image

RETRIED = {408, 409, 425, 429, 500, 502, 503, 504}
FATAL = {401, 403, 404}
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


class TeacherError(RuntimeError):
    """A teacher that cannot answer any request (bad key, URL or model)."""


class TeacherUnavailable(RuntimeError):
    """A request that still failed after every retry (the attempt is not recorded: a rerun asks again)."""


@dataclass
class TeacherReply:
    """One answer: the text (None when refused), tokens used, and the refusal's reason."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    refused: str = ""


def image_data_url(ref: Any) -> str:
    """A ``data:`` URL for an image: a file's own bytes when it is PNG/JPEG/WebP, else PNG."""
    if isinstance(ref, str | Path) and Path(ref).suffix.lower() in _MIME:
        data, mime = Path(ref).read_bytes(), _MIME[Path(ref).suffix.lower()]
    else:
        buffer = io.BytesIO()
        load_image(ref).save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def teacher_key(env_name: str) -> str:
    """The key from ``env_name``, else OPENAI_API_KEY, else '' (a local server without a key)."""
    return os.environ.get(env_name) or os.environ.get("OPENAI_API_KEY", "")


class Teacher:
    """One endpoint. Thread-safe: httpx clients may be shared between threads.

    Args:
        url: the base URL, ending in /v1 (a trailing '/chat/completions' is accepted too).
        model: the model name; '' asks ``GET /models`` for the first one.
        key: sent as ``Authorization: Bearer KEY`` when not empty.
        timeout: seconds per request.
        retries: retries of a retried failure.
    """

    def __init__(self, url: str, model: str = "", key: str = "", timeout: float = 300.0, retries: int = 6):
        try:
            import httpx
        except ImportError:
            raise TeacherError("cotune data reason needs httpx: pip install 'cotune[teacher]'") from None

        self.url = url.rstrip("/").removesuffix("/chat/completions")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.retries = retries
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        response = self._send("GET", f"{self.url}/models")
        models = response.json().get("data") or []
        if not models:
            raise TeacherError(f"{self.url}/models lists no model; give --teacher_model")
        return str(models[0]["id"])

    def _send(self, method: str, url: str, body: dict | None = None):
        import httpx

        for attempt in range(self.retries + 1):
            wait = min(60.0, 2.0**attempt) * (0.5 + random.random())
            try:
                response = self.client.request(method, url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                reason = f"{type(e).__name__}: {e}"
            else:
                if response.status_code < 400 or response.status_code not in RETRIED:
                    if response.status_code in FATAL:
                        raise TeacherError(
                            f"{url}: HTTP {response.status_code} ({response.text[:200]}); check "
                            "--teacher_url, --teacher_model and the key (--api_key_env)"
                        )
                    return response
                reason = f"HTTP {response.status_code}"
                after = response.headers.get("retry-after", "")
                wait = float(after) if after.replace(".", "", 1).isdigit() else wait
            if attempt < self.retries:
                time.sleep(wait)
        raise TeacherUnavailable(f"{url}: {reason} after {self.retries + 1} tries")

    def ask(self, content: list[dict], max_tokens: int, temperature: float, seed: int) -> TeacherReply:
        """One chat completion for a user message of ``content`` parts.

        Raises:
            TeacherError: the endpoint refuses everything (key, URL, model).
            TeacherUnavailable: it still failed after every retry.
        """
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
        }
        response = self._send("POST", f"{self.url}/chat/completions", body)
        if response.status_code >= 400:
            return TeacherReply(None, refused=f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            obj = response.json()
            text = obj["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            return TeacherReply(None, refused=f"not a chat completion: {response.text[:200]}")
        usage = obj.get("usage") or {}
        return TeacherReply(
            text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        )

    def close(self) -> None:
        self.client.close()
