"""Resumable checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory ``output_dir/checkpoints/step_NNNNNNNN/``::

    .metadata, *.distcp      torch.distributed.checkpoint: LoRA weights + optimizer state, sharded
    adapter/                 the adapter in PEFT format (gathered to rank 0; loads without cotune)
    rng/rank_NNNNN.json      every rank's RNG states (python, numpy, torch, cuda)
    trainer_state.json       step, epoch, position in the epoch, scheduler, best eval loss and accuracy, metrics offset

It is written into ``.step_NNNNNNNN.tmp-write`` by every rank and renamed by rank 0 after a barrier,
so a directory named ``step_*`` is always complete; a crash mid-write leaves the previous one whole.
Only trainable parameters go into the DCP state (``ignore_frozen_params``), so a checkpoint of an
11B LoRA run is the size of the adapter plus twice that for Adam's moments. DCP stores global
shapes, so a checkpoint written by N ranks loads on M ranks or in one process without torchrun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cotune.files import publish_dir
from cotune.train import distributed
from cotune.train.checkpoint import fault_point

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"step_(\d+)")


@dataclass
class TrainerState:
    """Where a run stood when a checkpoint was written.

    Attributes:
        step: optimizer steps done.
        epoch: the epoch the step belongs to.
        batches_done: loader batches of ``epoch`` consumed (the same count on every rank).
        epoch_complete: the epoch was finished; the run continues with epoch + 1.
        best_eval_loss: lowest validation loss so far (decides ``best_adapter``).
        metrics_bytes: size of metrics.jsonl at the checkpoint (None when metrics are off).
        world_size: processes that wrote the checkpoint.
        global_batch: samples per loader batch over all ranks (batch per process x world size).
        scheduler: the learning-rate scheduler's ``state_dict``.
        scaler: the fp16 GradScaler's ``state_dict`` when one is used.
        best_eval_accuracy: highest task accuracy after a step (``best_adapter_metric: accuracy``);
            -inf in checkpoints written before it was kept.
    """

    step: int
    epoch: int
    batches_done: int
    epoch_complete: bool
    best_eval_loss: float
    metrics_bytes: int | None
    world_size: int
    global_batch: int
    scheduler: dict = field(default_factory=dict)
    scaler: dict | None = None
    best_eval_accuracy: float = -math.inf


# ----------------------------------------------------------------------------- finding checkpoints


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and (p / STATE_FILE).is_file() and (p / ".metadata").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_checkpoint(output_dir: str | Path, resume: str, safe: bool = False) -> Path | str | None:
    """The checkpoint ``--resume`` names: 'auto' (newest complete one, or None) or a path.

    Args:
        output_dir: the run directory.
        resume: '', 'auto' or a checkpoint directory.
        safe: return the error message instead of raising it (so rank 0 can pass it to every rank).

    Raises:
        FileNotFoundError: a path that is not a complete checkpoint (unless ``safe``).
    """
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file() or not (path / ".metadata").is_file():
        message = (
            f"--resume {resume}: not a complete cotune checkpoint (expected {STATE_FILE} and .metadata; "
            f"complete ones are listed under {Path(output_dir) / CHECKPOINTS}, or use --resume auto)"
        )
        if safe:
            return message
        raise FileNotFoundError(message)
    return path


def checkpoint_to_resume(output_dir: str | Path, resume: str, is_main: bool) -> Path | None:
    """``find_checkpoint`` on rank 0, its answer given to every rank (collective: every rank calls it).

    Raises:
        FileNotFoundError: on every rank, before any loads, when ``resume`` names no complete checkpoint.
    """
    found = distributed.broadcast_object(find_checkpoint(output_dir, resume, safe=True) if is_main else None)
    if isinstance(found, str):  # rank 0 cannot use --resume PATH: every rank stops, before loading
        raise FileNotFoundError(found)
    return found


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Removes all but the newest ``keep`` (at least one) checkpoints."""
    for old in list_checkpoints(output_dir)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)


def drop_newer_checkpoints(output_dir: str | Path, step: int) -> list[Path]:
    """Removes checkpoints after ``step``: resuming from an older one abandons that timeline (its
    metrics are cut off too), and ``--resume auto`` must not return to it after the next crash."""
    newer = [p for p in list_checkpoints(output_dir) if int(_STEP_DIR.fullmatch(p.name).group(1)) > step]
    for p in newer:
        shutil.rmtree(p, ignore_errors=True)
    return newer


# ----------------------------------------------------------------------------- RNG states


def seed_everything(seed: int) -> None:
    """Seeds python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states as JSON-able data (no pickle in checkpoints)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def restore_rng(checkpoint: Path, rank: int, fallback_seed: int) -> bool:
    """Restores ``rank``'s RNG states; False (and a fresh seed) when the checkpoint has none for it."""
    path = Path(checkpoint) / "rng" / f"rank_{rank:05d}.json"
    if not path.is_file():
        seed_everything(fallback_seed)
        return False
    set_rng_state(json.loads(path.read_text()))
    return True


# ----------------------------------------------------------------------------- save / load


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen base weights are not part of a LoRA run's state: they come from model_name
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns on every call without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    output_dir: str | Path,
    keep_last: int,
    rank: int,
    write_adapter: Callable[[Path], object] | None = None,
) -> Path:
    """Writes a resumable checkpoint atomically (collective: every rank calls it).

    Args:
        model: the module the loop calls (FSDP-sharded or not); only its trainable parameters are saved.
        optimizer: its optimizer.
        state: the trainer state to record.
        output_dir: the run directory.
        keep_last: checkpoints to keep (older ones are removed after the new one is published).
        rank: this process's rank.
        write_adapter: writes the PEFT adapter into a given directory (collective as well).

    Returns:
        The published checkpoint directory.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(output_dir) / CHECKPOINTS
    final = root / f"step_{state.step:08d}"
    tmp = root / f".{final.name}.tmp-write"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    with _single_process_ok():
        dcp.save(
            {"model": model_sd, "optim": optim_sd},
            checkpoint_id=str(tmp),
            no_dist=not distributed.initialized(),
        )
    (tmp / "rng").mkdir(exist_ok=True)
    (tmp / "rng" / f"rank_{rank:05d}.json").write_text(json.dumps(rng_state()))
    if write_adapter is not None:
        write_adapter(tmp / "adapter")
    fault_point(f"checkpoint-write:{state.step}")
    distributed.barrier()  # every rank's files are in tmp before it is published
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=1))
        publish_dir(tmp, final)
        prune_checkpoints(output_dir, keep_last)
    distributed.barrier()
    return final


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainerState:
    """Loads LoRA weights, optimizer, scheduler (and scaler) state from ``path`` into the live objects.

    Works on any world size, with or without a process group; every rank calls it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    # get_state_dict gives the template (right shapes and shardings) that DCP fills in place
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    with _single_process_ok():
        dcp.load(
            {"model": model_sd, "optim": optim_sd},
            checkpoint_id=str(path),
            no_dist=not distributed.initialized(),
        )
    # not strict: the frozen weights are (rightly) absent; dcp.load has already failed if any
    # trainable weight or optimizer entry was missing from the checkpoint
    set_state_dict(
        model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_options(strict=False)
    )
    scheduler.load_state_dict(state.scheduler)
    if scaler is not None and state.scaler:
        scaler.load_state_dict(state.scaler)
    return state


# ----------------------------------------------------------------------------- data position, metrics


def resume_position(state: TrainerState, global_batch: int) -> tuple[int, int, str | None]:
    """(epoch to continue, loader batches of it to skip, a warning or None).

    With the same global batch the data order is the one the interrupted run would have seen;
    with another one the position is carried over in samples and the order of the rest of the
    epoch differs (the sampler groups lengths per global batch).
    """
    if state.epoch_complete:
        return state.epoch + 1, 0, None
    if global_batch == state.global_batch:
        return state.epoch, state.batches_done, None
    samples = state.batches_done * state.global_batch
    warning = (
        f"the checkpoint was written with {state.global_batch} samples per batch over all processes, "
        f"this run has {global_batch}: continuing after {samples} samples of epoch {state.epoch}, "
        "but the rest of the epoch is batched differently than it would have been"
    )
    return state.epoch, samples // global_batch, warning


def truncate_metrics(path: str | Path, nbytes: int | None) -> None:
    """Cuts metrics.jsonl back to its size at the checkpoint, so no step is logged twice."""
    path = Path(path)
    if nbytes is None or not path.is_file():
        return
    if path.stat().st_size > nbytes:
        with open(path, "r+b") as f:
            f.truncate(nbytes)


class _SkipFirst(torch.utils.data.Sampler):
    """A batch sampler without its first ``n`` batches (indices only: nothing is loaded for them)."""

    def __init__(self, batch_sampler, n: int) -> None:
        self.batch_sampler = batch_sampler
        self.n = n

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.n, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.n)


def epoch_batches(
    loader: torch.utils.data.DataLoader,
    skip: int,
    checkpoint: Path | None,
    state: TrainerState | None,
    rank: int,
    fallback_seed: int,
) -> Iterator[dict]:
    """The epoch's batches after the first ``skip``; for the epoch a run resumes in, with the RNG
    states of ``checkpoint`` (written at ``state``) restored where the interrupted run saved them:
    after this epoch's loader drew its seed for a checkpoint inside the epoch, before it for one
    at the epoch's end. ``checkpoint`` None: no RNG states are restored."""
    loader = skip_batches(loader, skip) if skip else loader
    if checkpoint is not None and state.epoch_complete:
        restore_rng(checkpoint, rank, fallback_seed)
    batches = iter(loader)
    if checkpoint is not None and not state.epoch_complete:
        restore_rng(checkpoint, rank, fallback_seed)
    return batches


def skip_batches(loader: torch.utils.data.DataLoader, n: int) -> torch.utils.data.DataLoader:
    """A loader like ``loader`` that starts after its first ``n`` batches of the current epoch."""
    workers = loader.num_workers
    return torch.utils.data.DataLoader(
        loader.dataset,
        batch_sampler=_SkipFirst(loader.batch_sampler, n),
        collate_fn=loader.collate_fn,
        num_workers=workers,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        prefetch_factor=loader.prefetch_factor if workers > 0 else None,
        generator=loader.generator,
    )
