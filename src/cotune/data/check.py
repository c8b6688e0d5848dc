"""``cotune data check`` and ``cotune data preview``: look at a dataset before spending GPU hours on it.

``check_data`` runs exactly the validation training runs (``build.load_data_file`` then, with a
model, ``dataset.encode_samples``), so the records it lists as problems are exactly the ones
training skips; a preference-pairs file (records with ``chosen`` and ``rejected``) is checked as
``method: dpo`` training reads it (``check_pairs``). On top it reports what does not stop training but deserves a look: LLaVA-CoT's
four-stage tags missing or out of order, augmentation settings that contradict the questions (hue
jitter under colour questions, flips under left/right ones), and the distribution of token and
label counts.
"""

from __future__ import annotations

import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.data.augment import augment_conflicts
from cotune.data.chat import IGNORE_INDEX
from cotune.data.cot import STAGES, parse_stages
from cotune.data.pairs import is_pairs_file, read_pairs
from cotune.data.records import Problem, Sample, problem_order
from cotune.data.split import check_split

TAG_HINT = ("<SUMMARY>", "<CONCLUSION>")


@dataclass
class CheckReport:
    """What ``check_data`` found."""

    path: str
    fmt: str = ""
    records: int = 0
    usable: int = 0
    images: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)  # skipped by training
    warnings: list[Problem] = field(default_factory=list)  # reported only
    turns: list[int] = field(default_factory=list)
    images_per_record: Counter = field(default_factory=Counter)
    cot: bool = False
    cot_ok: int = 0
    cot_replies: int = 0
    max_seq_len: int = 0
    lengths: list[int] = field(default_factory=list)
    label_tokens: list[int] = field(default_factory=list)
    model_name: str = ""
    split: str = ""  # the held-out side training would use: balance, near-duplicates (data/split.py)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0


def _pct(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else 0


def stage_problem(text: str) -> str | None:
    """Why a reply does not follow the four-stage format, or None."""
    found = parse_stages(text)
    missing = [s for s in STAGES if s not in found]
    if missing:
        return "missing " + ", ".join(f"<{s}>" for s in missing)
    empty = [s for s in STAGES if not found[s]]
    if empty:
        return "empty " + ", ".join(f"<{s}>" for s in empty)
    starts = [text.index(f"<{s}>") for s in STAGES]
    if starts != sorted(starts):
        order = [s for _, s in sorted(zip(starts, STAGES))]
        return "stages out of order: " + " ".join(f"<{s}>" for s in order)
    return None


def _replies(sample: Sample) -> list[str]:
    return [
        " ".join(i["text"] for i in m["content"] if i["type"] == "text")
        for m in sample.messages
        if m["role"] == "assistant"
    ]


def _cot_warnings(samples: list[Sample], report: CheckReport) -> None:
    replies = [(s, k, r) for s in samples for k, r in enumerate(_replies(s), start=1)]
    tagged = sum(any(t in r for t in TAG_HINT) for _, _, r in replies)
    report.cot = bool(replies) and tagged >= len(replies) / 2
    if not report.cot:
        return
    report.cot_replies = len(replies)
    for s, k, text in replies:
        reason = stage_problem(text)
        if reason:
            report.warnings.append(Problem(s.where, f"reply {k}: {reason} (four-stage format)"))
        else:
            report.cot_ok += 1


def check_data(
    cfg: Any, path: str | Path, processor: Any = None, family: Any = None, log=print
) -> CheckReport:
    """Validates a data file as training would, and measures it.

    Args:
        cfg: ``cotune data``'s options or a ``TrainConfig`` (its ``data`` section: format, columns,
            image root, max_seq_len ...).
        path: the data file or folder.
        processor, family: the model's processor and family; without them token lengths and
            label counts are not checked (and over-long samples are not found).
        log: where the detected format is announced.

    Returns:
        A ``CheckReport``; ``report.problems`` are exactly the records training would skip.
    """
    from cotune.data.build import load_data_file
    from cotune.data.dataset import encode_samples

    if cfg.data.format == "auto" and is_pairs_file(path):
        return check_pairs(cfg, path, processor, family, log)
    report = CheckReport(path=str(path), max_seq_len=cfg.data.max_seq_len)
    if cfg.data.format != "auto":
        report.fmt = f"'{cfg.data.format}' (set by data.format)"
    start = time.perf_counter()
    samples, problems = load_data_file(cfg, str(path), log=lambda s: (setattr(report, "fmt", s), log(s)))
    report.seconds = time.perf_counter() - start
    report.records = len(samples) + len(problems)
    report.images = sum(len(s.images) for s in samples)
    report.turns = [len(s.messages) for s in samples]
    report.images_per_record = Counter(len(s.images) for s in samples)
    _cot_warnings(samples, report)
    report.warnings += [Problem(str(path), c) for c in augment_conflicts(cfg.data.augment, samples)]
    held_out = (
        load_data_file(cfg, cfg.data.test_file, log=None)[0] if getattr(cfg.data, "test_file", "") else None
    )
    report.split, duplicates = check_split(cfg, samples, held_out)
    report.warnings += duplicates
    if processor is not None:
        d = cfg.data
        encoded, token_problems, stats = encode_samples(
            samples, processor, family, d.max_seq_len, d.overlength
        )
        problems += token_problems
        report.lengths, report.label_tokens = stats.lengths, stats.label_tokens
        report.usable = len(encoded)
    else:
        report.usable = len(samples)
    report.problems = sorted(problems, key=lambda p: problem_order(p.where))
    report.warnings.sort(key=lambda p: problem_order(p.where))
    return report


def check_pairs(
    cfg: Any, path: str | Path, processor: Any = None, family: Any = None, log=print
) -> CheckReport:
    """A preference-pairs file checked as ``method: dpo`` training reads it (``pairs.read_pairs``:
    structure and pictures; with a processor both replies of each pair tokenized, as
    ``pair_batches.encode_pairs`` does): ``report.problems`` are the pairs training would skip.
    Token lengths are a pair's longer side, label tokens its chosen reply's."""
    from cotune.data.pair_batches import encode_pairs

    d = cfg.data
    report = CheckReport(path=str(path), max_seq_len=d.max_seq_len, fmt="preference pairs (for method dpo)")
    log(f"{Path(path).name}: preference pairs (chosen / rejected)")
    start = time.perf_counter()
    pairs, problems = read_pairs(path, d.image_root, d.system_prompt, d.image_workers, d.image_check)
    report.seconds = time.perf_counter() - start
    chosen = [c for c, _ in pairs]
    report.records, report.usable = len(pairs) + len(problems), len(pairs)
    report.images, report.turns = sum(len(c.images) for c in chosen), [len(c.messages) for c in chosen]
    report.images_per_record = Counter(len(c.images) for c in chosen)
    _cot_warnings(chosen, report)
    if processor is not None:
        encoded, token_problems = encode_pairs(pairs, processor, family, d.max_seq_len, d.overlength)
        problems += token_problems
        report.lengths = [max(len(c.input_ids), len(r.input_ids)) for c, r in encoded]
        report.label_tokens = [sum(t != IGNORE_INDEX for t in c.labels) for c, _ in encoded]
        report.usable = len(encoded)
    report.problems = sorted(problems, key=lambda p: problem_order(p.where))
    report.warnings.sort(key=lambda p: problem_order(p.where))
    return report


def format_report(r: CheckReport) -> str:
    """The summary table and every problem and warning, one per line."""
    rate = r.records / r.seconds if r.seconds > 0 else float("inf")
    per_image = Counter({k: v for k, v in sorted(r.images_per_record.items())})
    rows = [
        ("data", r.path),
        ("format", r.fmt.split(": format ", 1)[-1] if r.fmt else "-"),
        ("records", f"{r.records}"),
        ("usable", f"{r.usable}"),
        ("skipped", f"{len(r.problems)}" + (" (listed below)" if r.problems else "")),
        (
            "read + decode",
            f"{r.records} records, {r.images} images in {r.seconds:.2f} s: {rate:,.0f} records/s",
        ),
        ("messages/record", f"p50 {_pct(r.turns, 50)}, max {max(r.turns, default=0)}"),
        ("images/record", ", ".join(f"{k}: {v}" for k, v in per_image.items()) or "-"),
    ]
    if r.lengths:
        over = sum(n > r.max_seq_len for n in r.lengths)
        rows.append(
            (
                "tokens",
                f"p50 {_pct(r.lengths, 50)}, p95 {_pct(r.lengths, 95)}, max {max(r.lengths)} "
                f"(max_seq_len {r.max_seq_len}: {over} over)",
            )
        )
        labels = r.label_tokens
        rows.append(
            (
                "label tokens",
                f"min {min(labels, default=0)}, p50 {_pct(labels, 50)}, max {max(labels, default=0)}",
            )
        )
    else:
        rows.append(("tokens", "not checked (give --model_name to render with the real processor)"))
    if r.cot:
        rows.append(("four-stage format", f"{r.cot_ok} of {r.cot_replies} replies follow it"))
    if r.split:
        rows += [("held out" if k == 0 else "", line) for k, line in enumerate(r.split.splitlines())]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k.ljust(width)}  {v}" for k, v in rows]
    if r.problems:
        lines.append(f"\nproblems ({len(r.problems)}; training skips these records):")
        lines += [f"  {p}" for p in r.problems]
    if r.warnings:
        lines.append(f"\nwarnings ({len(r.warnings)}; trained on, but worth a look):")
        lines += [f"  {p}" for p in r.warnings]
    lines.append("\nresult: " + ("FAIL: some records would be skipped" if r.problems else "OK"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- preview


def _render_text(sample: Sample, processor: Any) -> str:
    if processor is not None:
        return processor.apply_chat_template(sample.messages, tokenize=False)
    parts = []
    for m in sample.messages:
        body = " ".join("<image>" if i["type"] == "image" else i["text"] for i in m["content"])
        parts.append(f"{m['role'].upper()}: {body}")
    return "\n".join(parts)


def preview_data(
    cfg: Any, path: str | Path, out: str | Path, n_augment: int = 8, n_samples: int = 4, processor: Any = None
) -> Path:
    """Writes a PNG grid: for each of the first ``n_samples`` samples with images, its first image,
    ``n_augment`` augmentations of it (as epochs 0, 1, ... would draw them) and its rendered text.

    The augmentation settings are ``cfg.data.augment`` (enabled here even if off in the config).
    """
    import dataclasses

    from PIL import Image, ImageDraw, ImageFont

    from cotune.data.augment import Augmenter
    from cotune.data.build import load_data_file
    from cotune.data.images import load_image

    samples, _ = load_data_file(cfg, str(path), log=None)
    picked = [(i, s) for i, s in enumerate(samples) if s.images][:n_samples] or list(enumerate(samples))[
        :n_samples
    ]
    augmenter = Augmenter(dataclasses.replace(cfg.data.augment, enabled=True), cfg.seed)
    thumb, pad, text_lines = 200, 10, 9
    font = ImageFont.load_default(size=13)
    columns = 1 + n_augment
    width = pad + columns * (thumb + pad)
    wrap = max(40, width // 8)
    row_height = 22 + thumb + 20 + text_lines * 16 + pad
    canvas = Image.new("RGB", (width, pad + row_height * max(len(picked), 1)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (index, sample) in enumerate(picked):
        y = pad + r * row_height
        n_img = len(sample.images)
        head = f"{sample.where}  id {sample.id}" + (f"  (image 1 of {n_img})" if n_img > 1 else "")
        draw.text((pad, y), head, fill="black", font=font)
        if sample.images:
            image = load_image(sample.images[0])
            tiles = [("original", image)] + [
                (f"epoch {e}", augmenter(image, index, epoch=e)) for e in range(n_augment)
            ]
            for c, (label, img) in enumerate(tiles):
                x = pad + c * (thumb + pad)
                scale = thumb / max(img.size)  # small images are enlarged so a person can see them
                shown = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
                canvas.paste(shown, (x + (thumb - shown.width) // 2, y + 22 + (thumb - shown.height) // 2))
                draw.rectangle((x, y + 22, x + thumb, y + 22 + thumb), outline=(200, 200, 200))
                draw.text((x, y + 24 + thumb), label, fill=(90, 90, 90), font=font)
        text = _render_text(sample, processor).replace("\n\n", "\n")
        lines = [w for line in text.splitlines() for w in (textwrap.wrap(line, wrap) or [""])]
        if len(lines) > text_lines:
            lines = lines[: text_lines - 1] + [f"... ({len(lines) - text_lines + 1} more lines)"]
        for k, line in enumerate(lines):
            draw.text((pad, y + 44 + thumb + k * 16), line, fill="black", font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


# ----------------------------------------------------------------------------- the command

DATA_USAGE = """usage:
  cotune data check [CONFIG.yaml] DATA [--model_name M] [--data.OPTION value ...]
      validate every record and image as training would; with a model, token lengths and labels;
      exit code 1 when any record would be skipped
  cotune data preview [CONFIG.yaml] DATA [--augment 8] [--samples 4] [--out preview.png]
      a PNG grid: a few samples, their augmentations (data.augment.* settings) and rendered text
  cotune data import SOURCE --output DIR [--kind K] [--question T] [--labels L.csv] [--window W]
      folders of pictures, tables, COCO/VQA, VLMEvalKit TSV, DICOM -> LLaVA-CoT JSONL + images
  cotune data reason IN.jsonl --output OUT.jsonl --teacher_url URL [--teacher_model M] [--attempts K]
      four-stage replies from a teacher, kept when their CONCLUSION gives the known answer
"""


def _processor_and_family(model_name: str, tokenizer_name: str, date_string: str) -> tuple[Any, Any]:
    from transformers import AutoConfig

    from cotune.models.families import family_for
    from cotune.models.load import check_model_dir, load_processor

    processor = load_processor(tokenizer_name or model_name, date_string)
    return processor, family_for(AutoConfig.from_pretrained(str(check_model_dir(model_name))))


def run_data_command(argv: list[str], log=print) -> int:
    """``cotune data check|preview ...``; returns the exit code."""
    from cotune.config import ConfigError, options_help, parse_args

    if not argv or argv[0] in ("-h", "--help", "help") or "--help" in argv:
        log(DATA_USAGE + "\noptions:\n" + options_help("data"))
        return 0
    sub, rest = argv[0], argv[1:]
    if sub not in ("check", "preview"):
        raise ConfigError(f"unknown 'data' subcommand '{sub}'\n{DATA_USAGE}")
    parsed = parse_args("data", rest)
    if len(parsed.words) != 1:
        raise ConfigError(f"expected one DATA file or folder, got {parsed.words or 'none'}\n{DATA_USAGE}")
    cfg, path = parsed.options, parsed.words[0]
    # tokens are checked only against a model named on purpose, not the default one
    named = any(p == "model_name" for p, _ in parsed.given)
    model_name = cfg.model_name if named else ""
    processor, family = (
        _processor_and_family(model_name, cfg.tokenizer_name, cfg.data.date_string) if named else (None, None)
    )
    if sub == "preview":
        p = cfg.preview
        out = preview_data(cfg, path, p.out, n_augment=p.augment, n_samples=p.samples, processor=processor)
        log(f"preview written to {out}")
        return 0
    report = check_data(cfg, path, processor, family, log=lambda s: None)
    report.model_name = model_name
    log(format_report(report))
    return report.exit_code
