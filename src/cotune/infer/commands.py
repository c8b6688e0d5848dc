"""The bodies of ``cotune generate``, ``chat`` and ``merge`` (``eval``'s is ``eval.command.run_eval_command``).

Their options are ``cotune.config``'s sections, as every verb's: ``cfg`` is the verb's configuration
(``CONFIG_CLASSES[verb]``) with the model, adapters, ``data`` (system prompt; for eval and merge
how records are read), ``generation`` and the verb's own section. ``cotune VERB --help`` lists them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.config import VERBS, ConfigError
from cotune.data.chat import system_message


def adapter_specs(cfg: Any):
    from cotune.infer.adapters import parse_adapter_specs

    try:
        return parse_adapter_specs(cfg.adapter)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _load(cfg: Any):
    from cotune.infer.adapters import load_model_with_adapters

    specs = adapter_specs(cfg)
    model, processor, family = load_model_with_adapters(
        cfg.model_name, specs, cfg.torch_dtype, cfg.device, cfg.tokenizer_name,
        cfg.quantization, cfg.quantization_config, cfg.data.date_string,
    )  # fmt: skip
    return specs, model, processor, family


def respond(model, processor, family, messages, images, adapter: str, cfg: Any, out=None) -> str:
    """One reply with the chosen decoding or search, written to ``out`` (streamed when possible)."""
    from cotune.infer.adapters import use_adapter
    from cotune.infer.generate import TokenMeter, encode_prompt, stream_generate
    from cotune.infer.stage_search import best_of_n, stage_search

    out, g = out or sys.stdout, cfg.generation
    seed = cfg.seed if cfg.seed >= 0 else None
    if g.search == "none":
        meter = TokenMeter()
        kwargs = dict(
            max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature,
            top_p=g.top_p, seed=seed, adapter=adapter, meter=meter,
        )  # fmt: skip
        pieces = []
        for piece in stream_generate(model, processor, family, messages, images, **kwargs):
            pieces.append(piece)
            if g.stream:
                out.write(piece)
                out.flush()
        text = "".join(pieces)
        out.write(("" if g.stream else text) + "\n")
        print(f"[cost] {meter.describe()}", file=sys.stderr)
        return text
    search = stage_search if g.search == "stage" else best_of_n
    with use_adapter(model, adapter):
        result = search(
            model, processor, family, messages, images, g.beam_size, g.max_new_tokens,
            g.temperature, g.top_p, seed,
        )  # fmt: skip
    if g.verbose:
        for step in result.steps:
            for k, (cand, ok) in enumerate(zip(step["candidates"], step["valid"])):
                mark = "*" if k == step["winner"] else " "
                print(
                    f"[{step['stage']}] {mark}{k + 1}{'' if ok else ' (no tags)'}: {cand!r}", file=sys.stderr
                )
    out.write(result.text + "\n")
    prompt_len = len(encode_prompt(processor, family, messages, images)["input_ids"])
    plain = prompt_len + result.reply_tokens + 1  # prompt once, then the reply and its end-of-turn
    print(
        f"[cost] {g.search} search (N={g.beam_size}, {result.comparisons} judged comparisons): "
        f"{result.meter.describe()}; one plain generation of this reply: ~{plain:,} tokens "
        f"({result.meter.total / plain:.1f}x)",
        file=sys.stderr,
    )
    return result.text


def check_prompt_image(path: str) -> None:
    """Refuses an ``--image`` (or chat's ``/image``) that generation could not read, in one line.

    Checked before the model loads, so that a typo costs no loading time and no traceback.

    Raises:
        ConfigError: a URL, a missing file, or an image that does not decode.
    """
    from cotune.data.images import check_image

    if "://" in path:
        raise ConfigError(f"image '{path}' is a URL; cotune reads local files only (download it first)")
    if not Path(path).is_file():
        raise ConfigError(f"image file '{path}' not found")
    reason = check_image(path)
    if reason:
        raise ConfigError(reason)


def _opening(cfg: Any, text: str, n_images: int) -> list[dict]:
    """The first user turn, after the system message if one is set."""
    from cotune.infer.generate import user_message

    system_prompt = cfg.data.system_prompt
    system = [system_message(system_prompt)]
    return (system if system_prompt else []) + [user_message(text, n_images)]


def run_generate(cfg: Any, text: str, out=None) -> int:
    """``cotune generate``: one prompt, answered by each ``--adapter`` in turn (one base load)."""
    text = text or cfg.prompt
    if not text:
        raise ConfigError('cotune generate needs a prompt: cotune generate --model_name BASE "PROMPT"')
    out = out or sys.stdout
    for path in cfg.image:
        check_prompt_image(path)
    specs, model, processor, family = _load(cfg)
    names = [s.name for s in specs] or ["none"]
    messages = _opening(cfg, text, len(cfg.image))
    for name in names:
        if len(names) > 1:
            out.write(f"--- {name} ---\n")
        respond(model, processor, family, messages, list(cfg.image), name, cfg, out)
    return 0


CHAT_HELP = """commands: /adapter NAME (switch; 'none' is the base), /adapters, /image PATH (attach to the
next message), /reset (forget the conversation), /quit"""


@dataclass
class ChatState:
    """A ``cotune chat`` conversation: the adapter in use, the turns so far, their pictures, and the
    pictures waiting for the next message."""

    current: str
    messages: list[dict] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)


def run_chat(cfg: Any, read=input, out=None) -> int:
    """``cotune chat``: a multi-turn REPL; the adapter can change between turns (no reload)."""
    from cotune.infer.adapters import adapter_names
    from cotune.infer.generate import user_message

    out = out or sys.stdout
    for path in cfg.image:
        check_prompt_image(path)
    specs, model, processor, family = _load(cfg)
    names = ["none", *adapter_names(model)]
    state = ChatState(current=specs[0].name if specs else "none", pending=list(cfg.image))
    out.write(f"adapters: {', '.join(names)} (using {state.current})\n{CHAT_HELP}\n")
    first = [cfg.prompt] if cfg.prompt else []  # --prompt: the first message, as if typed
    while True:
        try:
            line = first.pop().strip() if first else read(f"[{state.current}] > ").strip()
        except EOFError:
            out.write("\n")
            return 0
        if not line:
            continue
        command, _, arg = line.partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command.startswith("/"):
            _chat_command(state, command, arg.strip(), names, out)
            continue
        try:
            n_new = len(state.pending)
            turn = _opening(cfg, line, n_new) if not state.messages else [user_message(line, n_new)]
            reply = respond(
                model,
                processor,
                family,
                state.messages + turn,
                state.images + state.pending,
                state.current,
                cfg,
                out,
            )
        except ValueError as e:  # e.g. an unreadable image: report it and keep the conversation
            out.write(f"error: {e}\n")
            continue
        state.messages += turn + [{"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        state.images, state.pending = state.images + state.pending, []


def _chat_command(state: ChatState, command: str, arg: str, names: list[str], out: Any) -> None:
    """One of ``cotune chat``'s slash commands (all but /quit), applied to ``state``."""
    if command == "/adapters":
        out.write(", ".join(names) + "\n")
    elif command == "/adapter":
        if arg in names:
            state.current = arg
            out.write(f"using {arg}\n")
        else:
            out.write(f"no adapter '{arg}' (loaded: {', '.join(names)})\n")
    elif command == "/image":
        try:
            check_prompt_image(arg)
        except ConfigError as e:
            out.write(f"error: {e}\n")
            return
        state.pending.append(arg)
        out.write(f"{arg} will go with your next message\n")
    elif command == "/reset":
        state.messages, state.images, state.pending = [], [], []
        out.write("conversation cleared\n")
    else:
        out.write(f"unknown command {command}\n{CHAT_HELP}\n")


def run_merge_command(cfg: Any) -> int:
    """``cotune merge``: the adapter folded into the base, checked on ``data.test_file``'s first record."""
    from cotune.infer.merge import MergeMismatch, merge_adapter

    dirs = [s for s in adapter_specs(cfg) if s.path]
    if len(dirs) != 1 or not cfg.merge.output_dir:
        raise ConfigError(f"usage: {VERBS['merge'].usage} (exactly one adapter directory)")
    dtype = "" if cfg.torch_dtype == "auto" else cfg.torch_dtype  # merge's auto: the checkpoint's own
    try:
        merge_adapter(
            cfg.model_name, dirs[0].path, cfg.merge.output_dir, dtype, cfg.merge.max_shard_size,
            cfg.data.test_file, cfg.merge.tolerance, cfg.tokenizer_name, data_options=cfg.data,
            quantization=cfg.quantization, quantization_config=cfg.quantization_config, into=cfg.merge.into,
        )  # fmt: skip
    except MergeMismatch as e:
        print(f"cotune merge: error: {e}", file=sys.stderr)
        return 1
    return 0
