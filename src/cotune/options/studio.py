"""``cotune studio``'s own options: the files it shows, the server it may talk to, where it listens."""

from __future__ import annotations

from dataclasses import dataclass

from cotune.options.fields import ConfigError, opt

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class StudioOptions:
    """The local web app (``cotune.studio``) over data, runs, eval output and reviews."""

    data: list = opt(
        [],
        "A data file (JSONL or any format cotune reads) to show, check and review; its folder is served "
        "read-only and review decisions are written beside it. Repeat for several.",
        repeat=True,
    )
    run: list = opt(
        [],
        "A run folder (metrics.jsonl, config.yaml, adapter/, eval/). Repeat to overlay several. Its "
        "adapter joins the chat and its config.yaml gives the data and augmentation settings.",
        repeat=True,
    )
    serve: str = opt(
        "",
        "URL of a running 'cotune serve' (http://127.0.0.1:8000): the chat asks it instead of a local model.",
    )
    host: str = opt("127.0.0.1", "Address to bind. Anything but a loopback address requires --token.")
    port: int = opt(7860, "TCP port (0: any free one, printed at start).")
    token: str = opt(
        "",
        "Access token every request must carry (the page keeps it after the first visit to "
        "/?token=...). Default: the COTUNE_STUDIO_TOKEN environment variable; empty allowed on a "
        "loopback address only.",
    )
    open_browser: bool = opt(False, "Open the page in the default browser at start.")


def check_studio(obj: StudioOptions, prefix: str) -> None:
    if not 0 <= obj.port < 65536:
        raise ConfigError(f"option '{prefix}port' must be between 0 and 65535; got {obj.port}")
    if obj.serve and not obj.serve.startswith(("http://", "https://")):
        raise ConfigError(f"option '{prefix}serve' must be an http(s) URL; got '{obj.serve}'")
