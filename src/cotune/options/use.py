"""The sections of the verbs that use a model or build one: generate, chat, eval, merge, demo, data
preview, tiny-model and synth-data."""

from __future__ import annotations

from dataclasses import dataclass

from cotune.options.fields import ConfigError, opt


@dataclass
class PromptOptions:
    """What generate and chat are asked."""

    prompt: str = opt("", "The prompt (or the words after the options; chat: the first message).")
    image: list = opt([], "Image file for the (first) prompt. Repeat for several.", repeat=True)


@dataclass
class GenerationOptions:
    """How long a reply may be."""

    max_new_tokens: int = opt(256, "Longest reply (per stage with --search stage).", positive=True)


@dataclass
class DecodingOptions:
    """How generate and chat pick a reply's tokens."""

    do_sample: bool = opt(False, "Sample instead of greedy decoding.")
    temperature: float = opt(0.7, "Sampling temperature (sampling and searches).")
    top_p: float = opt(0.9, "Nucleus sampling threshold (sampling and searches).")
    search: str = opt(
        "none",
        "none (greedy or --do_sample), stage (LLaVA-CoT stage-level beam search) or best-of-n.",
        choices=("none", "stage", "best-of-n"),
    )
    beam_size: int = opt(4, "Candidates per stage (stage) or replies (best-of-n).", positive=True)
    stream: bool = opt(True, "Print tokens as they come (without --search).")
    verbose: bool = opt(False, "With --search: print every candidate and the winners.")


@dataclass
class EvalOptions:
    """cotune eval's own options."""

    batch_size: int = opt(8, "Prompts per generation batch and samples per loss batch.", positive=True)
    limit: int = opt(0, "Evaluate the first N samples only (0: all).")
    image_ablation: bool = opt(
        False,
        "Also evaluate with images shuffled across samples and with blank images: does the model "
        "look at the image? (accuracy, recall per answer class and CONCLUSION loss per condition, "
        "'image reliance' row)",
    )
    output_dir: str = opt(
        "",
        "Where eval.json, eval.md, the confusion PNGs and predictions.jsonl go (default: RUN/eval next to "
        "RUN/adapter).",
    )
    benchmark: str = opt(
        "",
        "A benchmark file in VLMEvalKit's TSV layout (MMBench, MMStar, AI2D, HallusionBench, ...) to "
        "evaluate instead of --data: prompts built and answers scored as VLMEvalKit does, accuracy "
        "overall and per category.",
    )
    answer_kind: str = opt(
        "auto",
        "How answers are compared: auto (guessed per record from its gold answer and question), yes_no, "
        "choice, number or text. A record's own answer_kind field wins.",
        choices=("auto", "yes_no", "choice", "number", "text"),
    )
    answer_aliases: dict = opt(
        {},
        "Answers that mean the same: {canonical: [other, ...]}, e.g. {'fracture line': ['crack']} "
        "(YAML, or a flag value in YAML flow style).",
    )
    positive_class: str = opt(
        "yes",
        "The positive answer of yes/no questions, for sensitivity, specificity, PPV, NPV and ROC AUC.",
        choices=("yes", "no"),
    )
    roc: bool = opt(
        True,
        "For yes/no questions, score the model's probability of 'yes' at the CONCLUSION (one extra "
        "forward pass per question) and report ROC AUC.",
    )


@dataclass
class MergeOptions:
    """cotune merge's own options."""

    output_dir: str = opt("", "Where the merged checkpoint goes (required; --output is short for it).")
    max_shard_size: str = opt("2GB", "Largest safetensors shard (bounds memory while saving).")
    tolerance: float = opt(0.0, "Largest |merged - adapter| logit difference allowed (0: by dtype).")
    into: str = opt(
        "dequantized",
        "With --quantization 4bit (a QLoRA adapter): merge into the 4-bit base dequantized (what the adapter "
        "was trained against; checked against the 4-bit model + adapter) or into the original base (the usual "
        "deployment; checked against the original base + adapter, and its difference from the 4-bit model "
        "printed as information: the base's quantization error dominates it).",
        choices=("dequantized", "original"),
    )


@dataclass
class DemoOptions:
    """cotune demo's own options."""

    workdir: str = opt("demo_out", "Where the tiny model, the data and the run go (reused when there).")
    n_eval: int = opt(
        100, "Held-out prompts answered greedily, with true and with shuffled images.", positive=True
    )


@dataclass
class PreviewOptions:
    """cotune data preview's own options."""

    augment: int = opt(8, "Augmentations shown per sample (the data.augment settings, enabled).")
    samples: int = opt(4, "Samples shown.", positive=True)
    out: str = opt("data_preview.png", "The PNG written.")


@dataclass
class TinyModelOptions:
    """cotune tiny-model's own options."""

    family: str = opt(
        "mllama", "Architecture of the tiny checkpoint: mllama or llava.", choices=("mllama", "llava")
    )


@dataclass
class SynthDataOptions:
    """cotune synth-data's own options."""

    n_train: int = opt(400, "Training records.", positive=True)
    n_test: int = opt(40, "Held-out records.", positive=True)


@dataclass
class TaskMetricsOptions:
    """Task metrics during training: answers generated at each validation (off by default)."""

    eval_generate_samples: int = opt(
        0,
        "At each validation, greedily answer this many validation questions (a fixed, seeded subset, "
        "those with a gold answer) and log their accuracy, per gold class too, to metrics.jsonl and the "
        "trackers; the cost is printed. 0: off. One process only for now.",
    )
    eval_generate_max_new_tokens: int = opt(256, "Longest reply of those answers.", positive=True)
    best_adapter_metric: str = opt(
        "loss",
        "What best_adapter keeps: the lowest validation loss, or the highest task accuracy (needs "
        "eval_generate_samples; ties go to the earlier step).",
        choices=("loss", "accuracy"),
    )


def check_task_metrics(o: TaskMetricsOptions, prefix: str) -> None:
    if o.eval_generate_samples < 0:
        raise ConfigError(f"{prefix}eval_generate_samples must be 0 (off) or a number of questions")
    if o.best_adapter_metric == "accuracy" and not o.eval_generate_samples:
        raise ConfigError(
            f"{prefix}best_adapter_metric accuracy needs answers to score: set {prefix}eval_generate_samples "
            "(e.g. 64)"
        )
