"""The options and the bodies of ``cotune generate``, ``chat``, ``eval`` and ``merge``.

Flags are parsed by ``cotune.config.parse_flags`` like ``cotune train``'s; ``--adapter`` and
``--image`` may be repeated (their values are collected in order). ``cotune VERB --help`` lists
the options of a verb.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.config import ConfigError, _coerce, parse_flags

GEN, CHAT, EVAL, MERGE = "generate", "chat", "eval", "merge"
USE = (GEN, CHAT)
SEARCHES = ("none", "stage", "best-of-n")


def _opt(default: Any, help: str, verbs: tuple[str, ...]) -> Any:
    meta = {"help": help, "verbs": verbs}
    if isinstance(default, list):
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class UseConfig:
    """Options of the commands that use a trained adapter."""

    model_name: str = _opt("", "Base checkpoint directory (local).", (GEN, CHAT, EVAL, MERGE))
    tokenizer_name: str = _opt(
        "", "Processor directory if different from model_name.", (GEN, CHAT, EVAL, MERGE)
    )
    adapter: list = _opt(
        [], "Adapter: DIR, NAME=DIR, or none (the base model). Repeat for several.", (GEN, CHAT, EVAL, MERGE)
    )
    image: list = _opt([], "Image file for the (first) prompt. Repeat for several.", USE)
    prompt: str = _opt("", "The prompt (or give it as the positional argument).", (GEN,))
    system_prompt: str = _opt("", "System message (Mllama refuses it together with images).", USE)
    max_new_tokens: int = _opt(256, "Longest reply (per stage with --search stage).", (GEN, CHAT, EVAL))
    do_sample: bool = _opt(False, "Sample instead of greedy decoding.", USE)
    temperature: float = _opt(0.7, "Sampling temperature (sampling and searches).", USE)
    top_p: float = _opt(0.9, "Nucleus sampling threshold (sampling and searches).", USE)
    seed: int = _opt(-1, "Seed for sampling (-1: not seeded).", USE)
    search: str = _opt(
        "none", "none (greedy or --do_sample), stage (LLaVA-CoT stage-level beam search) or best-of-n.", USE
    )
    beam_size: int = _opt(4, "Candidates per stage (stage) or replies (best-of-n).", USE)
    stream: bool = _opt(True, "Print tokens as they come (without --search).", USE)
    verbose: bool = _opt(False, "With --search: print every candidate and the winners.", USE)
    torch_dtype: str = _opt(
        "auto", "Weights dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp32.", (GEN, CHAT, EVAL)
    )
    device: str = _opt("auto", "cuda, cpu or auto.", (GEN, CHAT, EVAL))
    data: str = _opt(
        "", "eval: the labelled test file. merge: parity-check on its first record.", (EVAL, MERGE)
    )
    image_root: str = _opt("", "Folder image paths are relative to (default: the data file's).", (EVAL,))
    batch_size: int = _opt(8, "Prompts per generation batch and samples per loss batch.", (EVAL,))
    limit: int = _opt(0, "Evaluate the first N samples only (0: all).", (EVAL,))
    max_seq_len: int = _opt(4096, "Longer samples are left out of the loss.", (EVAL,))
    image_ablation: bool = _opt(
        False,
        "Also evaluate with images shuffled across samples and with blank images: does the model "
        "look at the image? (accuracy and CONCLUSION loss per condition, 'image reliance' row)",
        (EVAL,),
    )
    output_dir: str = _opt(
        "",
        "eval: where eval.json/eval.md go (default RUN/eval). merge: the merged checkpoint.",
        (EVAL, MERGE),
    )
    dtype: str = _opt("", "merge: dtype of the merge and the saved weights (default: the base's).", (MERGE,))
    max_shard_size: str = _opt(
        "2GB", "merge: largest safetensors shard (bounds memory while saving).", (MERGE,)
    )
    tolerance: float = _opt(0.0, "merge: max |merged - adapter| logits (0: by dtype).", (MERGE,))


ALIASES = {"output": "output_dir", "beam": "beam_size", "n": "beam_size", "model": "model_name"}
REPEATED = ("adapter", "image")
BOOL_WORDS = ("true", "false", "1", "0", "yes", "no", "on", "off")


def use_help(verb: str) -> str:
    lines = [f"usage: {USAGE_LINES[verb]}\n\noptions:"]
    for f in dataclasses.fields(UseConfig):
        if verb in f.metadata["verbs"]:
            default = f.default if f.default is not dataclasses.MISSING else []
            lines.append(f"  --{f.name} (default: {default!r})\n      {f.metadata['help']}")
    return "\n".join(lines)


USAGE_LINES = {
    GEN: 'cotune generate --model_name BASE [--adapter DIR|NAME=DIR|none ...] [--image a.png ...] "PROMPT"',
    CHAT: "cotune chat --model_name BASE [--adapter NAME=DIR ...] [--image a.png]",
    EVAL: "cotune eval --model_name BASE --adapter DIR [--adapter ...] --data test.jsonl",
    MERGE: "cotune merge --model_name BASE --adapter DIR --output DIR [--dtype bf16]",
}


def parse_use_flags(verb: str, argv: list[str]) -> tuple[list[str], UseConfig]:
    """Positional arguments and the options of ``verb``.

    Raises:
        ConfigError: an unknown option (with the closest ones), a bad value or a bad --search.
    """
    positional, pairs = parse_flags(argv)
    cfg = UseConfig()
    fields = {f.name: f for f in dataclasses.fields(UseConfig) if verb in f.metadata["verbs"]}
    hints = typing.get_type_hints(UseConfig)
    for key, value in pairs:
        key = key.replace("-", "_")
        key = ALIASES.get(key, key)
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown option '--{key}' for cotune {verb}.{hint} (cotune {verb} --help)")
        if key in REPEATED:
            getattr(cfg, key).append(str(value))
        elif hints[key] is bool and str(value).strip().lower() not in BOOL_WORDS:
            # a bare "--verbose" followed by the prompt: the flag is True, the text is the prompt
            setattr(cfg, key, True)
            positional.append(str(value))
        else:
            setattr(cfg, key, _coerce(value, hints[key], key))
    if cfg.search not in SEARCHES:
        raise ConfigError(f"option 'search' must be one of {', '.join(SEARCHES)}; got '{cfg.search}'")
    if verb in (GEN, CHAT, EVAL, MERGE) and not cfg.model_name:
        raise ConfigError(f"cotune {verb} needs --model_name BASE (a local checkpoint directory)")
    if cfg.beam_size < 1:
        raise ConfigError(f"option 'beam_size' must be at least 1; got {cfg.beam_size}")
    return positional, cfg


def adapter_specs(cfg: UseConfig):
    from cotune.infer.adapters import parse_adapter_specs

    try:
        return parse_adapter_specs(cfg.adapter)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _load(cfg: UseConfig):
    from cotune.infer.adapters import load_model_with_adapters

    specs = adapter_specs(cfg)
    model, processor, family = load_model_with_adapters(
        cfg.model_name, specs, cfg.torch_dtype, cfg.device, cfg.tokenizer_name
    )
    return specs, model, processor, family


def respond(model, processor, family, messages, images, adapter: str, cfg: UseConfig, out=None) -> str:
    """One reply with the chosen decoding or search, written to ``out`` (streamed when possible)."""
    from cotune.infer.adapters import use_adapter
    from cotune.infer.generate import TokenMeter, encode_prompt, stream_generate
    from cotune.infer.stage_search import best_of_n, stage_search

    out = out or sys.stdout
    seed = cfg.seed if cfg.seed >= 0 else None
    if cfg.search == "none":
        meter = TokenMeter()
        kwargs = dict(
            max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, temperature=cfg.temperature,
            top_p=cfg.top_p, seed=seed, adapter=adapter, meter=meter,
        )  # fmt: skip
        pieces = []
        for piece in stream_generate(model, processor, family, messages, images, **kwargs):
            pieces.append(piece)
            if cfg.stream:
                out.write(piece)
                out.flush()
        text = "".join(pieces)
        out.write(("" if cfg.stream else text) + "\n")
        print(f"[cost] {meter.describe()}", file=sys.stderr)
        return text
    search = stage_search if cfg.search == "stage" else best_of_n
    with use_adapter(model, adapter):
        result = search(
            model, processor, family, messages, images, cfg.beam_size, cfg.max_new_tokens,
            cfg.temperature, cfg.top_p, seed,
        )  # fmt: skip
    if cfg.verbose:
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
        f"[cost] {cfg.search} search (N={cfg.beam_size}, {result.comparisons} judged comparisons): "
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


def _opening(cfg: UseConfig, text: str, n_images: int) -> list[dict]:
    """The first user turn, after the system message if one is set."""
    from cotune.infer.generate import user_message

    system = [{"role": "system", "content": [{"type": "text", "text": cfg.system_prompt}]}]
    return (system if cfg.system_prompt else []) + [user_message(text, n_images)]


def run_generate(cfg: UseConfig, text: str, out=None) -> int:
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


def run_chat(cfg: UseConfig, read=input, out=None) -> int:
    """``cotune chat``: a multi-turn REPL; the adapter can change between turns (no reload)."""
    from cotune.infer.adapters import adapter_names
    from cotune.infer.generate import user_message

    out = out or sys.stdout
    for path in cfg.image:
        check_prompt_image(path)
    specs, model, processor, family = _load(cfg)
    names = ["none", *adapter_names(model)]
    current = specs[0].name if specs else "none"
    messages: list[dict] = []
    images: list[str] = []
    pending: list[str] = list(cfg.image)
    out.write(f"adapters: {', '.join(names)} (using {current})\n{CHAT_HELP}\n")
    while True:
        try:
            line = read(f"[{current}] > ").strip()
        except EOFError:
            out.write("\n")
            return 0
        if not line:
            continue
        command, _, arg = line.partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/adapters":
            out.write(", ".join(names) + "\n")
        elif command == "/adapter":
            if arg.strip() in names:
                current = arg.strip()
                out.write(f"using {current}\n")
            else:
                out.write(f"no adapter '{arg.strip()}' (loaded: {', '.join(names)})\n")
        elif command == "/image":
            try:
                check_prompt_image(arg.strip())
            except ConfigError as e:
                out.write(f"error: {e}\n")
                continue
            pending.append(arg.strip())
            out.write(f"{arg.strip()} will go with your next message\n")
        elif command == "/reset":
            messages, images, pending = [], [], []
            out.write("conversation cleared\n")
        elif command.startswith("/"):
            out.write(f"unknown command {command}\n{CHAT_HELP}\n")
        else:
            try:
                turn = (
                    _opening(cfg, line, len(pending)) if not messages else [user_message(line, len(pending))]
                )
                reply = respond(
                    model, processor, family, messages + turn, images + pending, current, cfg, out
                )
            except ValueError as e:  # e.g. an unreadable image: report it and keep the conversation
                out.write(f"error: {e}\n")
                continue
            messages += turn + [{"role": "assistant", "content": [{"type": "text", "text": reply}]}]
            images, pending = images + pending, []


def run_eval_command(cfg: UseConfig) -> int:
    from cotune.eval.evaluate import run_eval

    if not cfg.data:
        raise ConfigError("cotune eval needs --data TEST.jsonl (LLaVA-CoT JSONL with reference replies)")
    run_eval(
        cfg.model_name, adapter_specs(cfg), cfg.data, cfg.output_dir, cfg.batch_size, cfg.max_new_tokens,
        cfg.max_seq_len, cfg.limit, cfg.image_root, cfg.torch_dtype, cfg.device,
        image_ablation=cfg.image_ablation,
    )  # fmt: skip
    return 0


def run_merge_command(cfg: UseConfig) -> int:
    from cotune.infer.merge import MergeMismatch, merge_adapter

    dirs = [s for s in adapter_specs(cfg) if s.path]
    if len(dirs) != 1 or not cfg.output_dir:
        raise ConfigError(f"usage: {USAGE_LINES[MERGE]} (exactly one adapter directory)")
    if cfg.dtype and cfg.dtype not in ("bf16", "bfloat16", "fp32", "float32", "fp16", "float16"):
        raise ConfigError(f"option 'dtype' must be bf16, fp32 or fp16; got '{cfg.dtype}'")
    try:
        merge_adapter(
            cfg.model_name, dirs[0].path, cfg.output_dir, cfg.dtype, cfg.max_shard_size, cfg.data,
            cfg.tolerance, cfg.tokenizer_name,
        )  # fmt: skip
    except MergeMismatch as e:
        print(f"cotune merge: error: {e}", file=sys.stderr)
        return 1
    return 0
