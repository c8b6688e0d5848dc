"""The ``cotune`` command: one thin function per verb."""

from __future__ import annotations

import sys

from cotune.config import ConfigError, load_config, options_help, parse_flags

USAGE = """usage: cotune VERB [ARGS]

verbs:
  train [CONFIG.yaml] [--option value ...]   LoRA fine-tune (cotune train --help lists options)
  demo [--workdir DIR]                       tiny model + synthetic data + train + check, on CPU
  tiny-model DIR [--seed N] [--family mllama|llava]
                                             write a tiny random checkpoint in HF format
  synth-data DIR [--n_train N] [--n_test N] [--seed N]
                                             write the synthetic LLaVA-CoT dataset
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
    from cotune.train.loop import finetune

    finetune(cfg)
    return 0


def cmd_demo(argv: list[str]) -> int:
    positional, flags = _flags(argv)
    from cotune.demo import run_demo

    workdir = flags.pop("workdir", "demo_out")
    run_demo(workdir, overrides=list(flags.items()))
    return 0


def cmd_tiny_model(argv: list[str]) -> int:
    positional, flags = _flags(argv)
    if len(positional) != 1:
        raise ConfigError("usage: cotune tiny-model DIR [--seed N] [--family mllama|llava]")
    from cotune.models.tiny import build_tiny_llava, build_tiny_mllama

    build = build_tiny_llava if flags.get("family", "mllama") == "llava" else build_tiny_mllama
    path = build(positional[0], seed=int(flags.get("seed", 0)))
    print(f"tiny {flags.get('family', 'mllama')} checkpoint written to {path}")
    return 0


def cmd_synth_data(argv: list[str]) -> int:
    positional, flags = _flags(argv)
    if len(positional) != 1:
        raise ConfigError("usage: cotune synth-data DIR [--n_train N] [--n_test N] [--seed N]")
    from cotune.data.synthetic import write_synthetic_dataset

    paths = write_synthetic_dataset(
        positional[0],
        n_train=int(flags.get("n_train", 400)),
        n_test=int(flags.get("n_test", 40)),
        seed=int(flags.get("seed", 0)),
    )
    print(f"train: {paths['train']}\ntest: {paths['test']}\nimages: {paths['images']}")
    return 0


VERBS = {
    "train": cmd_train,
    "demo": cmd_demo,
    "tiny-model": cmd_tiny_model,
    "synth-data": cmd_synth_data,
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
