"""The sections of ``cotune data import`` (``source``) and ``cotune data reason`` (``reason``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cotune.options.fields import ConfigError, opt

SOURCE_KINDS = ("auto", "folder", "table", "coco", "vqa", "vlmeval", "dicom")


@dataclass
class ImportOptions:
    """cotune data import: from what users hold to LLaVA-CoT JSONL (answer and grouping keys kept)."""

    output_dir: str = opt("", "Folder the records (data.jsonl) and images/ go to (required; --output).")
    kind: str = opt("auto", "What SOURCE is (auto: detect and say).", choices=SOURCE_KINDS)
    question: str = opt(
        "",
        "Question template for sources without questions (folders, DICOM, tables without a question "
        "column); {classes} is the list of answers.",
    )
    classes: list = opt([], "Class folders to import, in this order (default: every subfolder).", repeat=True)
    labels: str = opt("", "DICOM: the table of labels (CSV/TSV/JSON lines) keyed by file name or UID.")
    label_key: str = opt("", "DICOM: the labels table's key column (default: the first that matches).")
    window: str = opt(
        "",
        "Fixed window for DICOM and 16-bit pictures: a preset (lung, mediastinum, bone, brain, abdomen) or "
        "CENTER,WIDTH. Default: the file's Window Center/Width (DICOM), else its type's full range.",
    )
    frames: str = opt("middle", "Multi-frame DICOM: middle, all, or frame indices '0,5,9' (one record each).")
    annotations: str = opt("", "VQA v2: the annotations file (default: beside the questions file).")


@dataclass
class ReasonOptions:
    """cotune data reason: four-stage replies from a teacher, kept when their CONCLUSION is right."""

    output_dir: str = opt(
        "",
        "The accepted records' JSONL file (--output); every attempt goes to NAME.attempts.jsonl beside it.",
    )
    teacher_url: list = opt(
        [],
        "OpenAI-compatible base URL (.../v1) of a teacher; repeat for several (requests are spread).",
        repeat=True,
    )
    teacher_model: str = opt("", "The teacher's model name (default: the first the endpoint lists).")
    api_key_env: str = opt(
        "COTUNE_TEACHER_API_KEY", "Environment variable holding the teachers' key (else OPENAI_API_KEY)."
    )
    prompt_file: str = opt(
        "",
        "The generation prompt (default: cotune's, after LLaVA-CoT's); the question goes where it says "
        "{question}, else after it.",
    )
    attempts: int = opt(1, "Replies asked per record (each kept in the attempts file).", positive=True)
    hint_answer: bool = opt(False, "Put the known answer in the prompt as a hint (the record says so).")
    concurrency: int = opt(4, "Requests in flight per teacher.", positive=True)
    max_tokens: int = opt(1024, "Longest reply.", positive=True)
    teacher_temperature: float = opt(0.7, "The teacher's sampling temperature (attempt k asks with seed+k).")
    timeout: float = opt(300.0, "Seconds one request may take.", positive=True)
    retries: int = opt(6, "Retries of a request on 429, 5xx, timeouts and lost connections (backoff).")
    max_records: int = opt(0, "Reason over the first N records only (0: all).")


def check_reason(r: Any, prefix: str) -> None:
    """Raises ConfigError for a temperature or a retry count out of range."""
    if not 0.0 <= r.teacher_temperature <= 2.0:
        raise ConfigError(
            f"option '{prefix}teacher_temperature' must be in [0, 2]; got {r.teacher_temperature}"
        )
    if r.retries < 0:
        raise ConfigError(f"option '{prefix}retries' must be 0 or more; got {r.retries}")
