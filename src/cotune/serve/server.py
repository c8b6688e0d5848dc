"""``cotune serve``: the base model and its adapters loaded once, the engine started, uvicorn serving
the API.

Example:
    >>> state = build_state(cfg)          # cfg: CONFIG_CLASSES["serve"], as `cotune serve` parses it
    >>> uvicorn.run(create_app(state), host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from cotune.config import ConfigError
from cotune.infer.adapters import NONE, load_model_with_adapters, parse_adapter_specs
from cotune.serve.engine import Engine
from cotune.serve.metrics import Metrics
from cotune.serve.protocol import Limits
from cotune.serve.state import NAME, ServerState

API_KEY_ENV = "COTUNE_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_for(host: str, api_key: str) -> str:
    """The key to require: ``--api_key`` or ``$COTUNE_API_KEY``; refuses a non-loopback bind without one.

    Raises:
        ConfigError: ``host`` is not a loopback address and no key is set.
    """
    key = api_key or os.environ.get(API_KEY_ENV, "")
    if not key and not is_loopback(host):
        raise ConfigError(
            f"--host {host} exposes the server beyond this machine: set --api_key KEY or ${API_KEY_ENV}"
        )
    return key


def build_state(cfg: Any) -> ServerState:
    """Loads the model and adapters of ``cfg`` (the serve verb's options) and starts the engine."""
    serve = cfg.serve
    key = api_key_for(serve.host, serve.api_key)
    try:
        specs = [s for s in parse_adapter_specs(cfg.adapter) if s.name != NONE]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    base_id = serve.served_model_name or Path(cfg.model_name).name
    for spec in specs:
        if not NAME.match(spec.name) or spec.name == base_id:
            raise ConfigError(
                f"--adapter {spec.name}: a name of letters, digits, '.', '_', '-' other than {base_id}"
            )
    if serve.num_threads:
        import torch

        torch.set_num_threads(serve.num_threads)
    model, processor, family = load_model_with_adapters(
        cfg.model_name, specs, cfg.torch_dtype, cfg.device, cfg.tokenizer_name,
        cfg.quantization, cfg.quantization_config, cfg.data.date_string,
    )  # fmt: skip
    model.eval()
    text_config = model.config.get_text_config(decoder=True)
    engine = Engine(model, processor, family, serve.max_batch_size, serve.max_queue, Metrics())
    limits = Limits(
        max_images=serve.max_images,
        max_image_pixels=serve.max_image_pixels,
        max_n=min(serve.max_n, serve.max_batch_size),  # n rows must fit in one batch
        max_model_len=serve.max_model_len or int(text_config.max_position_embeddings),
        default_max_tokens=serve.default_max_tokens,
        allowed_media_dir=serve.allowed_media_dir,
    )
    engine.start()
    return ServerState(
        engine=engine,
        base_id=base_id,
        adapters={s.name: str(Path(s.path).resolve()) for s in specs},
        limits=limits,
        api_key=key,
        max_body_bytes=int(serve.max_body_mb * 2**20),
        reasoning_parser=serve.reasoning_parser,
        timeout_s=serve.request_timeout,
    )


def run_serve_command(cfg: Any) -> int:
    """``cotune serve``: serves until interrupted."""
    try:
        import uvicorn

        from cotune.serve.app import create_app
    except ImportError as e:
        raise ConfigError(
            f"cotune serve needs FastAPI and uvicorn: pip install 'cotune[serve]' ({e})"
        ) from None
    api_key_for(cfg.serve.host, cfg.serve.api_key)  # before the (slow) model load
    state = build_state(cfg)
    served = ", ".join([state.base_id, *state.adapters])
    print(
        f"cotune serve: http://{cfg.serve.host}:{cfg.serve.port}/v1 serving {served}",
        file=sys.stderr,
        flush=True,
    )
    try:
        uvicorn.run(
            create_app(state), host=cfg.serve.host, port=cfg.serve.port, log_level="warning",
            timeout_graceful_shutdown=5,
        )  # fmt: skip
    finally:
        state.engine.stop()
    return 0
