"""Every option of every verb, in one system: sections, the verbs that take them, YAML and flags.

An option is a dataclass field with one name, one default and one help text (``cotune.options``:
``fields.py`` holds the model, dtype, seed, device and adapter sections, ``train.py`` the run,
LoRA and FSDP, ``data.py`` the ``data`` sections, ``use.py`` those of the other verbs). Options
are grouped in sections (``SECTIONS`` below: a dataclass and the key it lives under), and each verb
takes a tuple of sections (``VERBS``); a verb's configuration class is composed from them, so an
option shared by several verbs is the same field in each. ``TrainConfig`` is ``cotune train``'s.

A configuration is built from, in order of precedence: command-line flags > a YAML file (the
positional ``CONFIG.yaml`` or ``--config FILE``, for every verb) > the defaults. Flag names follow
llama-cookbook's ``finetuning.py`` so a LLaVA-CoT command line carries over unchanged::

    cotune train --model_name /ckpt/Llama-3.2V-11B-cot --custom_dataset.file my_ds.py \\
        --lr 1e-5 --num_epochs 3 --batch_size_training 2 --run_validation True --use_peft

A section's option is ``--lora_config.r 16`` (a mapping in YAML) or, where the verb has one option
of that name, ``--r 16``. A YAML file may hold options of other verbs, which this verb skips (a run's
``config.yaml`` serves ``cotune eval``); a key no verb takes is an error. On the command line an
option of another verb is an error naming the verbs that take it (``options.parse``).

A new verb (a server, quantized training, run tracking) adds its section to ``SECTIONS`` and a line
to ``VERBS``: its flags, YAML keys, checks and ``--help`` follow, with no parser of its own.
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cotune.options.data import (
    AugmentConfig,
    DataCacheOptions,
    DataOptions,
    SplitOptions,
    SystemPromptOptions,
    TemplateDateOptions,
    TestFileOptions,
    ValidationSubsetOptions,
    check_augment,
    check_split,
    check_validation_subset,
)
from cotune.options.fields import (
    AdapterOptions,
    ConfigError,
    DeviceOptions,
    DtypeOptions,
    ModelOptions,
    Section,
    SeedOptions,
)
from cotune.options.pairs import PairsOptions
from cotune.options.parse import (
    ALIASES,
    BOOL_WORDS,
    Catalog,
    check_values,
    compose,
    parse_flags,
    read_yaml,
    set_value,
)
from cotune.options.plan import PlanOptions
from cotune.options.quant import QuantizationConfig, QuantizationOptions
from cotune.options.serve import ServeOptions, check_serve
from cotune.options.sources import ImportOptions, ReasonOptions, check_reason
from cotune.options.studio import StudioOptions, check_studio
from cotune.options.tracking import (
    ProfilingOptions,
    TrackingOptions,
    WandbConfig,
    check_profiling,
    check_tracking,
)
from cotune.options.train import CustomDatasetConfig, FsdpConfig, LoraConfig, TrainingOptions, check_training
from cotune.options.use import (
    DecodingOptions,
    DemoOptions,
    EvalOptions,
    GenerationOptions,
    MergeOptions,
    PreviewOptions,
    PromptOptions,
    SynthDataOptions,
    TaskMetricsOptions,
    TinyModelOptions,
    check_task_metrics,
)

__all__ = [
    "ALIASES", "AugmentConfig", "ConfigError", "CustomDatasetConfig", "FsdpConfig", "LoraConfig",
    "TrainConfig", "VERBS", "load_config", "load_options", "options_help", "parse_args", "parse_flags",
    "save_config", "to_dict", "validate",
]  # fmt: skip

# name -> Section(heading, key, dataclass, extra check). Key "": top-level options (cookbook spelling).
SECTIONS = {
    s.name: s
    for s in (
        Section("model", "", ModelOptions),
        Section("dtype", "", DtypeOptions),
        Section("training", "", TrainingOptions, check_training),
        Section("seed", "", SeedOptions),
        Section("device", "", DeviceOptions),
        Section("adapters", "", AdapterOptions),
        Section("prompt", "", PromptOptions),
        Section("lora", "lora_config", LoraConfig),
        Section("custom_dataset", "custom_dataset", CustomDatasetConfig),
        Section("data", "data", DataOptions),
        Section("system prompt", "data", SystemPromptOptions),
        Section("template date", "data", TemplateDateOptions),
        Section("held-out file", "data", TestFileOptions),
        Section("validation split", "data", SplitOptions, check_split),
        Section("validation subset", "data", ValidationSubsetOptions, check_validation_subset),
        Section("data cache", "data", DataCacheOptions),
        Section("augmentation", "data.augment", AugmentConfig, check_augment),
        Section("fsdp", "fsdp_config", FsdpConfig),
        Section("quantization", "", QuantizationOptions),
        Section("plan", "", PlanOptions),
        Section("quantization_config", "quantization_config", QuantizationConfig),
        Section("tracking", "", TrackingOptions, check_tracking),
        Section("wandb", "wandb_config", WandbConfig),
        Section("profiling", "", ProfilingOptions, check_profiling),
        Section("task metrics", "", TaskMetricsOptions, check_task_metrics),
        Section("generation", "generation", GenerationOptions),
        Section("decoding", "generation", DecodingOptions),
        Section("eval", "eval", EvalOptions),
        Section("merge", "merge", MergeOptions),
        Section("serve", "serve", ServeOptions, check_serve),
        Section("studio", "studio", StudioOptions, check_studio),
        Section("demo", "demo", DemoOptions),
        Section("preview", "preview", PreviewOptions),
        Section("tiny-model", "tiny_model", TinyModelOptions),
        Section("synth-data", "synth_data", SynthDataOptions),
        Section("import", "source", ImportOptions),
        Section("reason", "reason", ReasonOptions, check_reason),
        Section("pairs", "pairs", PairsOptions),
    )
}


@dataclass(frozen=True)
class Verb:
    """A verb's sections and its command line.

    Attributes:
        sections: names in ``SECTIONS``, in the order of ``--help``.
        usage: the usage line of ``--help``.
        words: what positional words are besides a ``CONFIG.yaml``: '' (none: any one word is the
            config file), 'PROMPT' (free text; a bare boolean flag followed by a word is True and
            the word is text), or the name of one path ('DIR', 'DATA'; a word ending in .yaml or
            .yml is the config file).
    """

    sections: tuple[str, ...]
    usage: str
    words: str = ""


_TRAIN = (
    "model",
    "dtype",
    "training",
    "seed",
    "lora",
    "custom_dataset",
    "data",
    "system prompt",
    "template date",
)
_TRAIN += ("held-out file", "validation split", "augmentation", "fsdp", "quantization", "quantization_config")
_TRAIN += ("tracking", "wandb", "profiling", "task metrics")
_TRAIN += ("validation subset", "data cache")
_USE = ("model", "dtype", "device", "adapters", "quantization", "quantization_config")
_GENERATE = (*_USE, "seed", "system prompt", "template date", "prompt", "generation", "decoding")
_READ = (
    "data",
    "system prompt",
    "template date",
    "held-out file",
)  # records read and rendered as training does

VERBS = {
    "train": Verb(_TRAIN, "cotune train [CONFIG.yaml] [--option value ...]"),
    "demo": Verb(
        (*_TRAIN, "demo"), "cotune demo [CONFIG.yaml] [--workdir DIR] [--n_eval N] [--option value ...]"
    ),
    "data": Verb(
        (
            "model",
            "seed",
            "data",
            "system prompt",
            "template date",
            "held-out file",
            "validation split",
            "augmentation",
            "preview",
            "import",
            "reason",
        ),
        "cotune data check|preview|import|reason [CONFIG.yaml] DATA [--option value ...]",
        "DATA",
    ),
    "generate": Verb(
        _GENERATE,
        'cotune generate [CONFIG.yaml] --model_name BASE [--adapter DIR ...] [--image a.png] "PROMPT"',
        "PROMPT",
    ),
    "chat": Verb(
        _GENERATE,
        'cotune chat [CONFIG.yaml] --model_name BASE [--adapter NAME=DIR ...] [--image a.png] ["FIRST MESSAGE"]',
        "PROMPT",
    ),
    "eval": Verb(
        (*_USE, *_READ, "generation", "eval", "tracking", "wandb"),
        "cotune eval [CONFIG.yaml] --model_name BASE --adapter DIR [--adapter ...] --data TEST.jsonl",
    ),
    "merge": Verb(
        ("model", "dtype", "adapters", "quantization", "quantization_config", *_READ, "merge"),
        "cotune merge [CONFIG.yaml] --model_name BASE --adapter DIR --output DIR [--torch_dtype bf16]",
    ),
    "serve": Verb(
        (*_USE, "template date", "serve"),
        "cotune serve [CONFIG.yaml] --model_name BASE [--adapter NAME=DIR ...] [--port 8000] [--api_key KEY]",
    ),
    "studio": Verb(
        (*_USE, "seed", "system prompt", "template date", "generation", "decoding", "studio"),
        "cotune studio [CONFIG.yaml] [--data FILE ...] [--run DIR ...] [--serve URL] [--adapter NAME=DIR ...] [--port N]",
    ),
    "plan": Verb((*_TRAIN, "plan"), "cotune plan [CONFIG.yaml] [--option value ...] [--gpu_memory 16GB]"),
    "tiny-model": Verb(
        ("seed", "tiny-model"), "cotune tiny-model [CONFIG.yaml] DIR [--family mllama|llava]", "DIR"
    ),
    "synth-data": Verb(("seed", "synth-data"), "cotune synth-data [CONFIG.yaml] DIR [--n_train N]", "DIR"),
    "data-pairs": Verb(
        (*_USE, "seed", "data", "system prompt", "template date", "generation", "decoding", "pairs"),
        "cotune data pairs [CONFIG.yaml] DATA --source attempts|samples|stages [--model_name BASE --adapter DIR] "
        "[--pairs_file pairs.jsonl]",
        "DATA",
    ),
}

CATALOG = Catalog({verb: [SECTIONS[n] for n in v.sections] for verb, v in VERBS.items()})
CONFIG_CLASSES = {
    verb: compose(verb.title().replace("-", "") + "Config", CATALOG.sections[verb], globals())
    for verb in VERBS
}
TrainConfig = CONFIG_CLASSES["train"]  # what the training loop reads: cfg.lr, cfg.lora_config.r, cfg.data...


@dataclass
class Parsed:
    """A verb's command line, resolved.

    Attributes:
        options: the verb's configuration (an instance of ``CONFIG_CLASSES[verb]``), checked.
        words: the positional words besides the config file.
        given: (option path, value) for each option the YAML file or a flag set, in that order.
    """

    options: Any
    words: list[str]
    given: list[tuple[str, Any]]


def load_options(
    verb: str, path: str | Path | None = None, overrides=(), words: list[str] | None = None
) -> Parsed:
    """``verb``'s configuration from the defaults, an optional YAML file and flag overrides, checked.

    Args:
        verb: a key of ``VERBS``.
        path: a YAML file; its options of other verbs are skipped.
        overrides: (name, value) pairs as flags give them; later ones win.
        words: positional words; with ``words``, a bare boolean flag followed by a word (the pair
            ``("verbose", "Why?")``) is True and the word is appended here (``Verb.words == 'PROMPT'``).

    Raises:
        ConfigError: with the file name for YAML problems, the option name for flag problems.
    """
    cfg, options = CONFIG_CLASSES[verb](), CATALOG.options[verb]
    given: list[tuple[str, Any]] = []
    if path:
        for key, value in read_yaml(path).items():
            try:
                pairs = CATALOG.resolve_yaml(verb, key, value)
                given += [(p, set_value(cfg, options[p], v)) for p, v in pairs]
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    repeated: set[str] = set()
    for key, value in overrides:
        for p, v in CATALOG.resolve_flag(verb, key, value):
            option = options[p]
            if words is not None and option.type is bool and _is_text(v):
                words.append(v)  # "--verbose Why?": the flag is bare, the word is the prompt
                v = True
            given.append((p, set_value(cfg, option, v, append=p in repeated)))
            if option.field.metadata.get("repeat"):
                repeated.add(p)
    validate(cfg, verb)
    return Parsed(cfg, words if words is not None else [], given)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() not in BOOL_WORDS


def load_config(path: str | Path | None = None, overrides=()) -> TrainConfig:
    """``cotune train``'s configuration from an optional YAML file and flag overrides, checked.

    Raises:
        ConfigError: with the file name for YAML problems, the option name for flag problems.
    """
    return load_options("train", path, overrides).options


def parse_args(verb: str, argv: list[str]) -> Parsed:
    """``verb``'s command line (without the verb): the config file, the flags, the other words.

    Raises:
        ConfigError: two config files, unexpected words, or any problem of ``load_options``.
    """
    words, pairs = parse_flags(argv)
    kind = VERBS[verb].words
    flagged = [str(v) for k, v in pairs if k == "config"]
    pairs = [(k, v) for k, v in pairs if k != "config"]
    if kind:
        configs = [w for w in words[:1] if w.endswith((".yaml", ".yml")) and " " not in w]
        words = words[len(configs) :]
    else:
        configs, words = words, []
    configs += flagged
    if len(configs) > 1:
        raise ConfigError(f"expected at most one config file, got {configs}")
    parsed = load_options(verb, configs[0] if configs else None, pairs, words if kind == "PROMPT" else None)
    parsed.words = words
    return parsed


def validate(cfg: Any, verb: str = "train") -> None:
    """Checks values that are wrong whatever the data; raises ConfigError naming the option."""
    check_values(cfg, CATALOG.sections[verb])


def to_dict(cfg: Any) -> dict:
    """The resolved configuration as plain data (written to output_dir/config.yaml)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def options_help(verb: str = "train") -> str:
    """One entry per option of ``verb``, grouped by section: names, default, help."""
    lines, options = [], CATALOG.options[verb]
    for section in CATALOG.sections[verb]:
        under = f" (under {section.key})" if section.key not in ("", section.name) else ""
        lines.append(f"{section.name}{under}:")
        for option in (o for o in options.values() if o.section is section):
            names = ", ".join(n for n in (f"--{option.path}", CATALOG.short_name(verb, option.path)) if n)
            lines.append(f"  {names} (default: {option.default!r})")
            lines += textwrap.wrap(option.help, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def verb_help(verb: str) -> str:
    """``cotune VERB --help``."""
    return (
        f"usage: {VERBS[verb].usage}\n\n"
        "Options: the defaults below, then CONFIG.yaml (or --config FILE; options of other verbs in it\n"
        "are skipped), then flags: --name value, --name=value, a bare --flag for True; a section's option\n"
        "as --section.name, or by its last part where this verb has one option of that name.\n\n"
        + options_help(verb)
    )
