"""VLMEvalKit's benchmark TSV (MMBench, MMStar, AI2D, HallusionBench...): base64 pictures, hint,
options A-D, answer letter; read by ``cotune.data.benchmarks`` and prompted as VLMEvalKit prompts,
so a model trained on the import is asked as the benchmark will ask it.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from cotune.data.benchmarks import benchmark_kind, build_vlmeval_prompt, read_vlmeval_tsv
from cotune.data.sample import DataError, Problem
from cotune.data.sources.writer import Item


def is_vlmeval_tsv(path: Path) -> bool:
    """A .tsv whose header has index, question and image (VLMEvalKit's layout)."""
    if path.suffix.lower() != ".tsv":
        return False
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter="\t"), [])
    return {"index", "question", "image"} <= set(header)


def read_vlmeval(path: Path) -> Iterator[Item | Problem]:
    """Yields one Item per row with a picture and an answer (a benchmark's test split has none)."""
    try:
        rows = read_vlmeval_tsv(path)
    except ValueError as e:
        raise DataError(str(e)) from None
    for row in rows:
        where = f"{path.name}:{row['line']}"
        if not row.get("answer"):
            yield Problem(where, "no answer (a test split without labels cannot train)")
            continue
        extra = {"index": row["index"], "answer_kind": benchmark_kind(row)}
        for key in ("options", "hint", "category", "l2_category"):
            if row.get(key):
                extra[key] = row[key]
        images = row["images"]
        yield Item(
            id=f"{path.stem}-{row['index']}",
            where=where,
            image=images if len(images) > 1 else images[0],
            question=build_vlmeval_prompt(row),
            answer=str(row["answer"]).strip(),
            name=f"{path.stem}/{row['index']}.png",
            extra=extra,
        )
