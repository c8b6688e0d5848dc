"""The ``cotune`` command: one thin function per verb."""

from __future__ import annotations

import os
import sys

from cotune.config import VERBS as VERB_OPTIONS
from cotune.config import ConfigError, Parsed, parse_args, verb_help

USAGE = """usage: cotune VERB [CONFIG.yaml] [ARGS] [--option value ...]

Every verb takes its options from the defaults, then a YAML file (a run's config.yaml serves eval,
generate, chat and merge too), then flags; 'cotune VERB --help' lists them.

verbs:
  train [--option value ...]                 LoRA fine-tune
  demo [--workdir DIR] [--n_eval N]          tiny model + synthetic data + train + check, on CPU
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
  serve --model_name BASE [--adapter NAME=DIR ...] [--port 8000] [--api_key KEY]
                                             OpenAI-compatible server: many adapters, one base, batched
  plan [--option value ...] --gpu_memory 16GB
                                             train's options: the memory one GPU needs (config.json only)
  studio [--data FILE ...] [--run DIR ...] [--serve URL] [--port 7860]
                                             local web page: data, runs, answers, review, chat
  merge --model_name BASE --adapter DIR --output DIR
                                             merge the adapter into a standard HF checkpoint
  data check DATA [--model_name M]           validate a dataset as training would (exit 1: bad records)
  data preview DATA [--augment 8]            PNG grid of samples, their augmentations and text
  data import SOURCE --output DIR [--kind folder|table|coco|vqa|vlmeval|dicom]
                                             folders, tables, COCO/VQA, VLMEvalKit TSV, DICOM -> LLaVA-CoT JSONL
  data reason IN.jsonl --output OUT.jsonl --teacher_url URL [--attempts K]
                                             four-stage replies from a teacher, kept when the answer is right
  data pairs DATA --source attempts|samples|stages [--model_name BASE --adapter DIR] [--pairs_file pairs.jsonl]
                                             preference pairs for train --method dpo
"""


def _options(verb: str, argv: list[str]) -> Parsed | None:
    """The verb's options from its command line (None after printing ``--help``)."""
    if "--help" in argv or "-h" in argv:
        print(verb_help(verb))
        return None
    return parse_args(verb, argv)


def _one_dir(verb: str, parsed: Parsed) -> str:
    if len(parsed.words) != 1:
        raise ConfigError(f"usage: {VERB_OPTIONS[verb].usage}")
    return parsed.words[0]


def cmd_train(argv: list[str]) -> int:
    parsed = _options("train", argv)
    if parsed is None:
        return 0
    cfg = parsed.options
    from cotune.train import distributed

    if cfg.enable_fsdp and cfg.nproc_per_node > 1 and not distributed.under_torchrun():
        return distributed.launch_torchrun(argv, cfg.nproc_per_node)  # one node; see README for several
    from cotune.options.cookbook import cookbook_notes
    from cotune.train.loop import finetune

    if os.environ.get("RANK", "0") == "0":  # before the process group exists: the first process says it
        for note in cookbook_notes(parsed.given, argv):
            print(note)
    finetune(cfg)
    return 0


def cmd_demo(argv: list[str]) -> int:
    parsed = _options("demo", argv)
    if parsed is None:
        return 0
    from cotune.run_demo import run_demo

    demo = parsed.options.demo
    overrides = [(k, v) for k, v in parsed.given if not k.startswith("demo.")]  # training's, over the recipe
    figures = run_demo(demo.workdir, overrides=overrides, n_eval=demo.n_eval)
    return 1 if figures["misses"] else 0


def cmd_tiny_model(argv: list[str]) -> int:
    parsed = _options("tiny-model", argv)
    if parsed is None:
        return 0
    from cotune.demo.tiny import build_tiny_llava, build_tiny_mllama

    family = parsed.options.tiny_model.family
    build = build_tiny_llava if family == "llava" else build_tiny_mllama
    path = build(_one_dir("tiny-model", parsed), seed=parsed.options.seed)
    print(f"tiny {family} checkpoint written to {path}")
    return 0


def cmd_synth_data(argv: list[str]) -> int:
    parsed = _options("synth-data", argv)
    if parsed is None:
        return 0
    from cotune.demo.synthetic import write_synthetic_dataset

    cfg = parsed.options
    paths = write_synthetic_dataset(
        _one_dir("synth-data", parsed),
        n_train=cfg.synth_data.n_train,
        n_test=cfg.synth_data.n_test,
        seed=cfg.seed,
    )
    print(f"train: {paths['train']}\ntest: {paths['test']}\nimages: {paths['images']}")
    return 0


def cmd_generate(argv: list[str]) -> int:
    parsed = _options("generate", argv)
    if parsed is None:
        return 0
    from cotune.infer.commands import run_generate

    return run_generate(parsed.options, " ".join(parsed.words))


def cmd_chat(argv: list[str]) -> int:
    parsed = _options("chat", argv)
    if parsed is None:
        return 0
    from cotune.infer.commands import run_chat

    if parsed.words:  # the words after the options are the first message, as --prompt is
        parsed.options.prompt = " ".join(parsed.words)
    return run_chat(parsed.options)


def cmd_eval(argv: list[str]) -> int:
    parsed = _options("eval", argv)
    if parsed is None:
        return 0
    from cotune.eval.command import run_eval_command

    return run_eval_command(parsed.options)


def cmd_merge(argv: list[str]) -> int:
    parsed = _options("merge", argv)
    if parsed is None:
        return 0
    from cotune.infer.commands import run_merge_command

    return run_merge_command(parsed.options)


def cmd_serve(argv: list[str]) -> int:
    parsed = _options("serve", argv)
    if parsed is None:
        return 0
    from cotune.serve.server import run_serve_command

    return run_serve_command(parsed.options)


def cmd_plan(argv: list[str]) -> int:
    parsed = _options("plan", argv)
    if parsed is None:
        return 0
    from cotune.plan import run_plan_command

    return run_plan_command(parsed.options)


def cmd_studio(argv: list[str]) -> int:
    # --data is data.test_file in the other verbs; here it names the files to show (studio.data)
    argv = [
        "--studio.data" if a == "--data" else "--studio.data=" + a[7:] if a.startswith("--data=") else a
        for a in argv
    ]
    parsed = _options("studio", argv)
    if parsed is None:
        return 0
    from cotune.studio.command import run_studio_command

    return run_studio_command(parsed.options, parsed.given)


def _data_source(sub: str, argv: list[str]) -> tuple[Parsed, str] | None:
    """``cotune data SUB``'s options and its one positional path (None after printing ``--help``)."""
    if "--help" in argv or "-h" in argv:
        print(verb_help("data").replace("check|preview|import|reason", sub, 1))
        return None
    parsed = parse_args("data", argv)
    if len(parsed.words) != 1:
        raise ConfigError(f"usage: cotune data {sub} SOURCE --output ... (got {parsed.words or 'no SOURCE'})")
    return parsed, parsed.words[0]


def cmd_data_import(argv: list[str]) -> int:
    got = _data_source("import", argv)
    if got is None:
        return 0
    parsed, source = got
    cfg = parsed.options
    from cotune.data.sources import import_source

    if not cfg.source.output_dir:
        raise ConfigError("give the folder to write with --output DIR")
    print(import_source(source, cfg.source.output_dir, cfg.source, cfg.data).summary())
    return 0


def cmd_data_reason(argv: list[str]) -> int:
    got = _data_source("reason", argv)
    if got is None:
        return 0
    parsed, source = got
    cfg = parsed.options
    from cotune.data.reason import format_reason_report, reason_records

    if not cfg.reason.output_dir:
        raise ConfigError("give the training file to write with --output OUT.jsonl")
    report = reason_records(source, cfg.reason.output_dir, cfg.reason, cfg.data, seed=cfg.seed)
    print(format_reason_report(report))
    return 1 if report.failed else 0


DATA_VERBS = {"import": cmd_data_import, "reason": cmd_data_reason}


def cmd_data(argv: list[str]) -> int:
    if argv and argv[0] == "pairs":  # generates with the model: its body is in infer, above data
        return cmd_data_pairs(argv[1:])
    if argv and argv[0] in DATA_VERBS:
        return DATA_VERBS[argv[0]](argv[1:])
    from cotune.data.check import run_data_command

    return run_data_command(argv)


def cmd_data_pairs(argv: list[str]) -> int:
    parsed = _options("data-pairs", argv)
    if parsed is None:
        return 0
    from cotune.infer.pairs import run_pairs_command

    return run_pairs_command(parsed.options, _one_dir("data-pairs", parsed))


VERBS = {
    "train": cmd_train,
    "demo": cmd_demo,
    "tiny-model": cmd_tiny_model,
    "synth-data": cmd_synth_data,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "eval": cmd_eval,
    "merge": cmd_merge,
    "serve": cmd_serve,
    "plan": cmd_plan,
    "studio": cmd_studio,
    "data": cmd_data,
    "data-pairs": cmd_data_pairs,  # also ``cotune data pairs``
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
    except (ValueError, RuntimeError) as e:  # DataError and other input problems: no traceback for the user
        if type(e).__name__ in ("DataError", "TeacherError"):
            print(f"cotune {verb}: error: {e}", file=sys.stderr)
            return 2
        raise
