"""``cotune serve``'s own options: where it listens, who may call it, and the limits on a request."""

from __future__ import annotations

from dataclasses import dataclass

from cotune.options.fields import ConfigError, opt


@dataclass
class ServeOptions:
    """The OpenAI-compatible server (``cotune.serve``)."""

    host: str = opt(
        "127.0.0.1", "Address to bind. Anything but a loopback address requires an API key (--api_key)."
    )
    port: int = opt(8000, "TCP port.", positive=True)
    api_key: str = opt(
        "",
        "Bearer key required on every endpoint but /health (default: the COTUNE_API_KEY environment "
        "variable; empty: none, allowed on a loopback address only).",
    )
    served_model_name: str = opt("", "The base model's id in /v1/models (default: its directory's name).")
    allowed_media_dir: str = opt(
        "",
        "A directory whose images requests may name (file:// URLs or paths inside it). Empty: only "
        "data: URLs; the server never fetches a URL.",
    )
    reasoning_parser: str = opt(
        "",
        "llava-cot: SUMMARY, CAPTION and REASONING go to reasoning_content, the CONCLUSION to content.",
        choices=("", "llava-cot"),
    )
    max_batch_size: int = opt(32, "Most rows (requests x n) decoded together in one forward.", positive=True)
    max_queue: int = opt(
        64, "Most requests waiting to join the batch; more get 503 + Retry-After.", positive=True
    )
    max_body_mb: float = opt(20.0, "Largest request body in MiB (413 beyond).", positive=True)
    max_images: int = opt(4, "Most images in one request.", positive=True)
    max_image_pixels: int = opt(
        16_000_000, "Largest image (width x height), checked before it is decoded.", positive=True
    )
    max_n: int = opt(8, "Largest n (choices per request).", positive=True)
    max_model_len: int = opt(
        0, "Longest prompt + max_tokens in tokens (0: the model's max_position_embeddings)."
    )
    default_max_tokens: int = opt(256, "Reply length when a request gives no max_tokens.", positive=True)
    num_threads: int = opt(
        0,
        "CPU threads for the model's operations (torch.set_num_threads; 0: torch's default, one per core). "
        "On a small or shared machine 1 often serves fastest: a small operation split over threads waits "
        "for the slowest of them at every step.",
    )
    request_timeout: float = opt(
        600.0, "Seconds a request may take from arrival to its last token (504 beyond).", positive=True
    )


def check_serve(obj: ServeOptions, prefix: str) -> None:
    if obj.num_threads < 0:
        raise ConfigError(f"option '{prefix}num_threads' must be 0 or positive; got {obj.num_threads}")
    if obj.max_model_len < 0:
        raise ConfigError(f"option '{prefix}max_model_len' must be 0 or positive; got {obj.max_model_len}")
