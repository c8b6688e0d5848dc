"""``cotune studio``: gather what the user gave (data files, runs, a server or a model) and serve the page."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import yaml

from cotune.config import ConfigError, load_options
from cotune.options.studio import LOOPBACK
from cotune.studio.app import Studio, build_app
from cotune.studio.chat import LocalChat, ServeChat
from cotune.studio.datasets import DataView
from cotune.studio.review import ReviewQueue
from cotune.studio.runs import RunView
from cotune.studio.safety import Folders


def _run_config(run: RunView) -> dict:
    path = run.path / "config.yaml"
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    return data if isinstance(data, dict) else {}


def data_options(runs: list[RunView]) -> Any:
    """How data files are read and augmented: the first run's ``config.yaml`` (its data section and
    seed), else the defaults, as ``cotune data check RUN/config.yaml`` would."""
    for run in runs:
        if (run.path / "config.yaml").is_file():
            return load_options("data", run.path / "config.yaml").options
    return load_options("data").options


def chat_backend(cfg: Any, given: list[tuple[str, Any]], runs: list[RunView], log=print) -> Any:
    """The chat's back end: ``--serve URL``, else the local model (``--model_name``, or the first run's)
    with ``--adapter`` specs (default: each run's adapter, named after its folder); None if there is none."""
    from cotune.infer.adapters import AdapterSpec, parse_adapter_specs

    if cfg.studio.serve:
        return ServeChat(cfg.studio.serve, os.environ.get("COTUNE_API_KEY", ""), cfg)
    named = any(p == "model_name" for p, _ in given)
    if not named:
        found = [c.get("model_name") for c in map(_run_config, runs) if c.get("model_name")]
        if not found or not Path(found[0]).is_dir():
            log(
                "studio: no chat (give --model_name BASE, a --run whose config.yaml names a base here, or --serve URL)"
            )
            return None
        cfg.model_name = found[0]
    try:
        specs = parse_adapter_specs(cfg.adapter)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not cfg.adapter:
        specs = []
        for r in (r for r in runs if r.adapter_dir()):
            taken = {x.name for x in specs}
            name = r.name if r.name not in taken else f"{r.name}-{len(specs) + 1}"
            specs.append(AdapterSpec(name, str(r.adapter_dir())))
    return LocalChat(cfg, specs)


def build_studio(cfg: Any, given: list[tuple[str, Any]] = (), log=print) -> Studio:
    """The ``Studio`` of ``cotune studio``'s options (files are read when a page first asks).

    Raises:
        ConfigError: a data file or run folder that is not there, or an open address without a token.
    """
    s = cfg.studio
    token = s.token or os.environ.get("COTUNE_STUDIO_TOKEN", "")
    if s.host not in LOOPBACK and not token:
        raise ConfigError(
            f"studio.host '{s.host}' is not a loopback address: give --token (or COTUNE_STUDIO_TOKEN) so "
            "that only people with it can read your data"
        )
    for path in s.data:
        if not Path(path).exists():
            raise ConfigError(f"data file '{path}' not found")
    folders = Folders([])
    try:
        runs = [RunView(r, folders) for r in s.run]
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    options = data_options(runs)
    data = [DataView(p, options, folders) for p in s.data]
    queues = [ReviewQueue(p, folders) for p in s.data if Path(p).is_file()]
    return Studio(folders, data, runs, queues, chat_backend(cfg, given, runs, log), token)


def run_studio_command(cfg: Any, given: list[tuple[str, Any]] = (), log=print) -> int:
    """``cotune studio``: serves the page until interrupted."""
    import uvicorn

    studio = build_studio(cfg, given, log)
    s = cfg.studio
    family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((s.host, s.port))  # bound here so that port 0 can be printed as the port it got
    port = sock.getsockname()[1]
    host = f"[{s.host}]" if ":" in s.host else s.host
    url = f"http://{host}:{port}/" + (f"?token={studio.token}" if studio.token else "")
    log(f"cotune studio: {url}  (data {len(studio.data)}, runs {len(studio.runs)}, "
        f"chat: {studio.chat.describe() if studio.chat else 'none'}); Ctrl+C stops it")  # fmt: skip
    if isinstance(studio.chat, LocalChat):  # loads while the user looks at the data
        threading.Thread(target=studio.chat.warm, daemon=True).start()
    if s.open_browser:
        import webbrowser

        webbrowser.open(url)
    server = uvicorn.Server(uvicorn.Config(build_app(studio), log_level="warning"))
    server.run(sockets=[sock])
    return 0
