"""What the HTTP layer serves: the engine, the served model ids, and hot loading of adapters.

Loading and unloading run on the engine's thread between two decoding steps (the thread owns the
model). An adapter being unloaded stops taking requests at once and leaves the model when no
running or waiting request uses it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.infer.adapters import NONE, adapter_names
from cotune.serve.engine import Engine
from cotune.serve.protocol import APIError, Limits

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class ServerState:
    """Everything a request handler needs.

    Attributes:
        engine: the scheduler (it owns the model).
        base_id: the base model's id in /v1/models.
        adapters: served adapter id -> its directory.
        limits: what a request may ask for.
        api_key: the Bearer key ('' for none).
        max_body_bytes: largest request body.
        reasoning_parser: '' or 'llava-cot'.
        timeout_s: each request's time limit.
    """

    engine: Engine
    base_id: str
    adapters: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    api_key: str = ""
    max_body_bytes: int = 20 * 2**20
    reasoning_parser: str = ""
    timeout_s: float = 600.0
    created: int = field(default_factory=lambda: int(time.time()))

    def adapter_for(self, model: str) -> str:
        """The engine's adapter name for a request's ``model`` (404 when it is not served)."""
        if model == self.base_id:
            return NONE
        if model in self.adapters:
            return model
        served = ", ".join([self.base_id, *self.adapters])
        raise APIError(404, f"model '{model}' is not served (served: {served})", "model", "model_not_found")

    def model_list(self) -> dict:
        entry = {"object": "model", "created": self.created, "owned_by": "cotune"}
        data = [{"id": self.base_id, **entry, "root": self.base_id, "parent": None}]
        data += [{"id": n, **entry, "root": p, "parent": self.base_id} for n, p in self.adapters.items()]
        return {"object": "list", "data": data}

    async def load_adapter(self, body: Any) -> str:
        name, path = _checked_load(body, self)
        try:
            await asyncio.wrap_future(self.engine.call(lambda: _load(self.engine, name, str(path))))
        except Exception as e:
            raise APIError(400, f"the adapter did not load: {type(e).__name__}: {e}", "lora_path") from None
        self.adapters[name] = str(path)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_adapter(self, body: Any, wait_s: float = 60.0) -> str:
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or name not in self.adapters:
            raise APIError(404, f"the adapter '{name}' is not loaded", "lora_name", "adapter_not_found")
        path = self.adapters.pop(name)  # no new request reaches it from now on
        deadline = time.monotonic() + wait_s
        while True:
            done = await asyncio.wrap_future(self.engine.call(lambda: _unload(self.engine, name)))
            if done:
                return f"Success: LoRA adapter '{name}' removed successfully."
            if time.monotonic() > deadline:
                self.adapters[name] = path
                raise APIError(409, f"the adapter '{name}' is still in use; try again", "lora_name")
            await asyncio.sleep(0.05)


def _checked_load(body: Any, state: ServerState) -> tuple[str, Path]:
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object with lora_name and lora_path")
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not NAME.match(name) or name in (NONE, state.base_id):
        raise APIError(
            400, "lora_name must be 1-64 letters, digits, '.', '_' or '-' (not the base's id)", "lora_name"
        )
    if name in state.adapters:
        raise APIError(400, f"the adapter '{name}' is already loaded", "lora_name")
    if not isinstance(path, str) or not path or "\x00" in path or "://" in path:
        raise APIError(400, "lora_path must be a local directory", "lora_path")
    directory = Path(path).expanduser().resolve()
    config = directory / "adapter_config.json"
    if not config.is_file() or not (directory / "adapter_model.safetensors").is_file():
        raise APIError(
            400,
            "lora_path must be a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)",
            "lora_path",
        )
    try:
        peft_type = json.loads(config.read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        raise APIError(400, "the adapter's adapter_config.json is not valid JSON", "lora_path") from None
    if peft_type != "LORA":
        raise APIError(400, f"only LoRA adapters are served (peft_type {peft_type!r})", "lora_path")
    return name, directory


def _load(engine: Engine, name: str, path: str) -> None:
    from peft import PeftModel

    model = engine.model
    try:
        if adapter_names(model):
            model.load_adapter(path, adapter_name=name, is_trainable=False)
        else:
            engine.model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
            engine.model.eval()
    except Exception:
        if name in adapter_names(engine.model):
            engine.model.delete_adapter(name)
        raise


def _unload(engine: Engine, name: str) -> bool:
    """Deletes the adapter unless a request still uses it (then False: try again)."""
    if name in engine.adapters_in_use():
        return False
    if name in adapter_names(engine.model):
        remaining = [n for n in adapter_names(engine.model) if n != name]
        if remaining and engine.model.active_adapter == name:
            engine.model.set_adapter(remaining[0], inference_mode=True)
        engine.model.delete_adapter(name)
    return True
