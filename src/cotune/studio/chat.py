"""The Chat page: one picture and one question, answered by several adapters (and the base) in turn,
each reply streamed as it is generated.

Two back ends answer the same way: ``LocalChat`` loads the base and the adapters once (on the first
question) and answers through ``infer.commands.respond``, the function behind ``cotune generate``, so
a greedy reply here is ``cotune generate``'s; ``ServeChat`` asks a running ``cotune serve`` through its
OpenAI API (the picture sent as a ``data:`` URL, the adapter as the model).
"""

from __future__ import annotations

import base64
import copy
import json
import queue
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

from cotune.studio.safety import png_bytes

NONE = "none"


class _Pieces:
    """A file-like ``out`` for ``respond``: what it writes goes to a queue the page's stream reads."""

    def __init__(self, q: queue.Queue) -> None:
        self.q = q

    def write(self, text: str) -> None:
        if text:
            self.q.put(text)

    def flush(self) -> None:
        """Nothing to flush: every write is already on the queue (``respond`` calls it as on a file)."""


def messages_for(question: str, n_images: int, system_prompt: str = "") -> list[dict]:
    """The first turn as ``cotune generate`` builds it: the system prompt if any, then the user turn."""
    from cotune.infer.generate import user_message

    system = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
    return (system if system_prompt else []) + [user_message(question, n_images)]


class LocalChat:
    """The base and adapters in this process.

    Args:
        cfg: ``cotune studio``'s options: the model (``model_name``, dtype, device, quantization),
            ``generation`` and ``decoding`` (how replies are decoded), ``seed``, the system prompt.
        specs: the adapters (``infer.adapters.AdapterSpec``).
    """

    def __init__(self, cfg: Any, specs: list) -> None:
        self.cfg, self.specs = cfg, specs
        self._loaded: tuple | None = None
        self._lock = threading.Lock()  # one reply at a time: adapters are switched on one model

    def names(self) -> list[str]:
        return [NONE, *(s.name for s in self.specs if s.name != NONE)]

    def describe(self) -> str:
        return f"local model {self.cfg.model_name}"

    def warm(self) -> None:
        """Loads the model now (the studio starts this in a thread, so the first question does not wait)."""
        with self._lock:
            self._model()

    def _model(self) -> tuple:
        if self._loaded is None:
            from cotune.infer.adapters import load_model_with_adapters

            c = self.cfg
            self._loaded = load_model_with_adapters(
                c.model_name, self.specs, c.torch_dtype, c.device, c.tokenizer_name,
                c.quantization, c.quantization_config, c.data.date_string,
            )  # fmt: skip
        return self._loaded

    def answer(self, question: str, image: Any, model: str, search: str = "none") -> Iterator[str]:
        """Yields the reply of adapter ``model`` ('none': the base) piece by piece."""
        from cotune.infer.commands import respond

        cfg = copy.deepcopy(self.cfg)
        cfg.generation.search = search
        cfg.generation.stream = True
        images = [image] if image is not None else []
        messages = messages_for(question, len(images), cfg.data.system_prompt)
        q: queue.Queue = queue.Queue()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with self._lock:
                    m, processor, family = self._model()
                    respond(m, processor, family, messages, images, model, cfg, out=_Pieces(q))
            except BaseException as e:  # shown on the page in place of the reply
                failure.append(e)
            finally:
                q.put(None)

        threading.Thread(target=work, daemon=True).start()
        pieces: list[str] = []
        while (piece := q.get()) is not None:
            pieces.append(piece)
            yield piece
        if failure:
            raise failure[0]


class ServeChat:
    """A running ``cotune serve`` at ``url`` (its adapters are its models)."""

    def __init__(self, url: str, api_key: str = "", cfg: Any = None) -> None:
        self.url, self.api_key, self.cfg = url.rstrip("/"), api_key, cfg

    def describe(self) -> str:
        return f"cotune serve at {self.url}"

    def _request(self, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data else "GET")
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        return urllib.request.urlopen(request, timeout=600)

    def names(self) -> list[str]:
        with self._request("/v1/models") as response:
            ids = [m["id"] for m in json.loads(response.read())["data"]]
        return ids

    def answer(self, question: str, image: Any, model: str, search: str = "none") -> Iterator[str]:
        """Yields the server's reply piece by piece (a stage search answers in one piece)."""
        content: list[dict] = []
        if image is not None:
            url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
            content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": question})
        g = self.cfg.generation if self.cfg is not None else None
        body = {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": g.max_new_tokens if g else 256,
            "temperature": 0.0,
            "stream": search == "none",
        }
        if search != "none":
            body["search"] = search
        with self._request("/v1/chat/completions", body) as response:
            if search != "none":
                message = json.loads(response.read())["choices"][0]["message"]
                yield (message.get("reasoning_content") or "") + (message.get("content") or "")
                return
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[5:])["choices"][0].get("delta", {})
                piece = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
                if piece:
                    yield piece
