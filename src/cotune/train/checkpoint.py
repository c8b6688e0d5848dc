"""Saving adapters in PEFT format, atomically (``cotune.files``): a crash mid-write leaves the previous
copy whole."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from cotune.files import atomic_dir


def fault_point(tag: str) -> None:
    """Fault injection for the crash tests: SIGKILLs this process when ``COTUNE_FAULT`` equals ``tag``.

    A real crash cannot be scheduled at an exact point of a checkpoint write; this can, so the test
    that a half-written checkpoint is never used is deterministic. Unset in normal runs.
    """
    if os.environ.get("COTUNE_FAULT") == tag:
        os.kill(os.getpid(), signal.SIGKILL)


def save_adapter(
    peft_model,
    out_dir: str | Path,
    state_dict: dict | None = None,
    extra: Callable[[Path], None] | None = None,
    adapters: list[str] | None = None,
) -> Path:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` atomically.

    Args:
        peft_model: the PEFT model.
        out_dir: final directory (replaced atomically).
        state_dict: the adapter weights when they are not local to this process (FSDP gathers them
            first); by default PEFT takes them from the model.
        extra: writes more files into the directory before it is published (e.g. the processor).
        adapters: which of the model's adapters to write (None: all; DPO leaves out its reference).
    """
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(
            str(tmp), state_dict=state_dict, safe_serialization=True, selected_adapters=adapters
        )
        if extra is not None:
            extra(tmp)
    return Path(out_dir)


def save_model(model, out_dir: str | Path, state_dict: dict | None = None, extra=None) -> Path:
    """A full fine-tune's model as a standard Hugging Face checkpoint (``config.json`` +
    ``model.safetensors``), atomically; ``from_pretrained`` loads it without cotune."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        if extra is not None:
            extra(tmp)
    return Path(out_dir)
