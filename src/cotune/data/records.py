"""Reading annotation files into one ``Sample`` type, with every problem located by file and line.

``load_samples`` reads a file in any format of ``formats``, checks every image once and returns
the usable Samples (``sample.Sample``) and the Problems of the others; nothing downstream knows the
file format.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from cotune.data.formats import detect_format, read_records
from cotune.data.images import check_image
from cotune.data.sample import DataError, Problem, Sample

# re-exported: tests/test_packing.py and tests/test_batching_loss.py import it from here
from cotune.data.sample import conversation_to_messages as conversation_to_messages

# Checks of more images than this show a progress bar.
PROGRESS_MIN_IMAGES = 2000


def check_sample_images(
    samples: list[Sample], workers: int = 4, decode: bool = True, progress: bool = True
) -> tuple[list[Sample], list[Problem]]:
    """Checks every image once, in threads; returns the samples whose images are all usable.

    Args:
        samples: parsed samples.
        workers: threads.
        decode: decode every image (True), or read only its header (``data.image_check: header``).
        progress: a progress bar from ``PROGRESS_MIN_IMAGES`` images (False: never, as in a worker
            process whose parent shows one).
    """

    def first_problem(sample: Sample) -> str | None:
        for ref in sample.images:
            reason = check_image(ref, decode=decode)
            if reason:
                return reason
        return None

    n_images = sum(len(s.images) for s in samples)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(
            tqdm(
                pool.map(first_problem, samples, chunksize=16),
                total=len(samples),
                desc=f"checking images ({'decode' if decode else 'header'})",
                unit="record",
                disable=not progress or n_images < PROGRESS_MIN_IMAGES,
                dynamic_ncols=True,
            )
        )
    good = [s for s, r in zip(samples, reasons) if r is None]
    problems = [Problem(s.where, r) for s, r in zip(samples, reasons) if r is not None]
    return good, problems


def problem_order(where: str) -> tuple[str, int]:
    """Sort key: file, then line / row number."""
    name, _, tail = where.rpartition(":")
    digits = "".join(ch for ch in tail if ch.isdigit())
    return (name, int(digits) if digits else 0)


def load_samples(
    path: str | Path,
    image_root: str = "",
    system_prompt: str = "",
    fmt: str = "auto",
    columns: dict | None = None,
    log=None,
    workers: int = 4,
    image_check: str = "decode",
) -> tuple[list[Sample], list[Problem]]:
    """Reads and validates a data file: records parsed, structure checked, images checked.

    Args:
        path: a data file or folder in any format of ``data/formats.py``.
        image_root: folder image paths are relative to (default: the file's folder); paths that
            leave it are refused.
        system_prompt: added as the first message when the record has none.
        fmt: ``data.format``; 'auto' detects it and says what it found through ``log``.
        columns: ``data.columns``, canonical name -> the table's column name.
        log: where to say which format was detected (None: silent).
        workers: threads checking images.
        image_check: 'decode' every image, or read only each image's 'header' (fast; an image
            whose data is cut short is then found, and skipped, when training reaches it).

    Returns:
        The usable samples and the problems of the others, each with file:line and reason.
    """
    if image_check not in ("decode", "header"):
        raise ValueError(f"data.image_check must be 'decode' or 'header', not '{image_check}'")
    samples, problems = read_samples(path, image_root, system_prompt, fmt, columns, log)
    samples, image_problems = check_sample_images(samples, workers=workers, decode=image_check == "decode")
    problems += image_problems
    problems.sort(key=lambda p: problem_order(p.where))
    return samples, problems


def read_samples(
    path: str | Path,
    image_root: str = "",
    system_prompt: str = "",
    fmt: str = "auto",
    columns: dict | None = None,
    log=None,
    byte_range: tuple[int, int] | None = None,
) -> tuple[list[Sample], list[Problem]]:
    """The first half of ``load_samples``: records parsed and their structure checked, images not
    yet looked at (``data.cache`` checks each process's share of them); of a JSON-lines file, with
    ``byte_range``, only the lines that start in it (a process's share)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file '{path}' not found")
    if fmt == "auto":
        fmt, why = detect_format(path, columns)
        if log is not None:
            log(f"{path.name}: format '{fmt}' detected ({why}); set data.format to override")
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    return read_records(path, fmt, root, system_prompt, columns, byte_range)


def report_problems(problems: list[Problem], on_error: str, total: int, log=print) -> None:
    """Prints every problem; raises DataError listing them all when ``on_error`` is 'raise'."""
    if not problems:
        return
    listing = "\n".join(f"  {p}" for p in problems)
    if on_error == "raise":
        raise DataError(f"{len(problems)} of {total} records are unusable (data.on_error=raise):\n{listing}")
    log(f"skipping {len(problems)} of {total} records (data.on_error=skip):\n{listing}")


def split_train_test(samples: list[Sample], ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A deterministic, disjoint split: ``ratio`` of the samples (at least one) go to test."""
    if len(samples) < 2:
        raise DataError(
            "need at least 2 usable records to hold some out for validation (or give a test file)"
        )
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(samples) * ratio))
    test_idx = set(order[:n_test])
    train = [s for i, s in enumerate(samples) if i not in test_idx]
    test = [s for i, s in enumerate(samples) if i in test_idx]
    return train, test
