"""The ``cotune`` command: one thin function per verb."""

from __future__ import annotations

import sys

from cotune.config import ConfigError, load_config, options_help, parse_flags

USAGE = """usage: cotune VERB [ARGS]

verbs:
  train [CONFIG.yaml] [--option value ...]   LoRA fine-tune (cotune train --help lists options)
  demo [--workdir DIR] [--n_eval N] [--key value ...]
                                             tiny model + synthetic data + train + check, on CPU
  tiny-model DIR [--seed N] [--family mllama|llava]
                                             write a tiny random checkpoint in HF format
  synth-data DIR [--n_train N] [--n_test N] [--seed N]
                                             write the synthetic LLaVA-CoT dataset
  generate --model_name BASE [--adapter DIR ...] [--image a.png] "PROMPT" [--search stage]
                                             answer a prompt (streamed; stage search, best-of-n)
  chat --model_name BASE [--adapter NAME=DIR ...]
                                             multi-turn chat; /adapter NAME switches adapter
  eval --model_name BASE --adapter DIR --data test.jsonl
                                             base vs adapters: loss, format, accuracy, per stage
  merge --model_name BASE --adapter DIR --output DIR
                                             merge the adapter into a standard HF checkpoint
  data check DATA [--model_name M] [--config C]
                                             validate a dataset as training would (exit 1: bad records)
  data preview DATA [--augment 8]            PNG grid of samples, their augmentations and text
"""


def _flags(argv: list[str]) -> tuple[list[str], dict]:
    positional, pairs = parse_flags(argv)
    return positional, dict(pairs)


def cmd_train(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print("usage: cotune train [CONFIG.yaml] [--option value ...]\n\noptions:\n" + options_help())
        return 0
    positional, pairs = parse_flags(argv)
    if len(positional) > 1:
        raise ConfigError(f"expected at most one config file, got {positional}")
    cfg = load_config(positional[0] if positional else None, pairs)
    from cotune.train import distributed

    if cfg.enable_fsdp and cfg.nproc_per_node > 1 and not distributed.under_torchrun():
        return distributed.launch_torchrun(argv, cfg.nproc_per_node)  # one node; see README for several
    from cotune.train.loop import finetune

    finetune(cfg)
    return 0


def cmd_demo(argv: list[str]) -> int:
    positional, flags = _flags(argv)
    from cotune.run_demo import run_demo

    workdir = flags.pop("workdir", "demo_out")
    n_eval = int(flags.pop("n_eval", 100))
    figures = run_demo(workdir, overrides=list(flags.items()), n_eval=n_eval)
    return 1 if figures["misses"] else 0


def cmd_tiny_model(argv: list[str]) -> int:
    positional, flags = _flags(argv)
    if len(positional) != 1:
        raise ConfigError("usage: cotune tiny-model DIR [--seed N] [--family mllama|llava]")
    from cotune.demo.tiny import build_tiny_llava, build_tiny_mllama

    build = build_tiny_llava if flags.get("family", "mllama") == "llava" else build_tiny_mllama
    path = build(positional[0], seed=int(flags.get("seed", 0)))
    print(f"tiny {flags.get('family', 'mllama')} checkpoint written to {path}")
    return 0


def cmd_synth_data(argv: list[str]) -> int:
    positional, flags = _flags(argv)
    if len(positional) != 1:
        raise ConfigError("usage: cotune synth-data DIR [--n_train N] [--n_test N] [--seed N]")
    from cotune.demo.synthetic import write_synthetic_dataset

    paths = write_synthetic_dataset(
        positional[0],
        n_train=int(flags.get("n_train", 400)),
        n_test=int(flags.get("n_test", 40)),
        seed=int(flags.get("seed", 0)),
    )
    print(f"train: {paths['train']}\ntest: {paths['test']}\nimages: {paths['images']}")
    return 0


def _use_verb(verb: str, argv: list[str]):
    """Options of generate/chat/eval/merge (None after printing --help)."""
    from cotune.infer.commands import parse_use_flags, use_help

    if "--help" in argv or "-h" in argv:
        print(use_help(verb))
        return None
    return parse_use_flags(verb, argv)


def cmd_generate(argv: list[str]) -> int:
    parsed = _use_verb("generate", argv)
    if parsed is None:
        return 0
    from cotune.infer.commands import run_generate

    return run_generate(parsed[1], " ".join(parsed[0]))


def cmd_chat(argv: list[str]) -> int:
    parsed = _use_verb("chat", argv)
    if parsed is None:
        return 0
    from cotune.infer.commands import run_chat

    return run_chat(parsed[1])


def cmd_eval(argv: list[str]) -> int:
    parsed = _use_verb("eval", argv)
    if parsed is None:
        return 0
    from cotune.infer.commands import run_eval_command

    return run_eval_command(parsed[1])


def cmd_merge(argv: list[str]) -> int:
    parsed = _use_verb("merge", argv)
    if parsed is None:
        return 0
    from cotune.infer.commands import run_merge_command

    return run_merge_command(parsed[1])


def cmd_data(argv: list[str]) -> int:
    from cotune.data.check import run_data_command

    return run_data_command(argv)


VERBS = {
    "train": cmd_train,
    "demo": cmd_demo,
    "tiny-model": cmd_tiny_model,
    "synth-data": cmd_synth_data,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "eval": cmd_eval,
    "merge": cmd_merge,
    "data": cmd_data,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"cotune: unknown verb '{verb}'\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return VERBS[verb](rest)
    except (ConfigError, FileNotFoundError) as e:
        print(f"cotune {verb}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # DataError and other input problems: no traceback for the user
        if type(e).__name__ in ("DataError",):
            print(f"cotune {verb}: error: {e}", file=sys.stderr)
            return 2
        raise
