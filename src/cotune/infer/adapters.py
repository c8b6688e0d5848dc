"""Several adapters on one base model: loaded once into one PEFT model, switched per call.

The base weights are loaded once; each adapter adds only its LoRA matrices (``PeftModel.load_adapter``).
``use_adapter(model, name)`` makes one of them active for a block (``set_adapter``); the name
``"none"`` runs the base model itself (``disable_adapter``). Nothing is reloaded when switching.

Example:
    >>> specs = parse_adapter_specs(["med=runs/med/adapter", "runs/qa/adapter"])
    >>> [(s.name, s.path) for s in specs]
    [('med', 'runs/med/adapter'), ('qa', 'runs/qa/adapter')]
    >>> model = attach_adapters(base_model, specs)
    >>> with use_adapter(model, "qa"):
    ...     logits = model(**batch).logits
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

NONE = "none"  # the adapter name that means "the base model, no adapter"


@dataclass(frozen=True)
class AdapterSpec:
    """One ``--adapter`` value: a name and a PEFT adapter directory (None for the base model)."""

    name: str
    path: str | None


def _default_name(path: str) -> str:
    p = Path(path)
    # runs/x/adapter and runs/x/best_adapter are named after their run
    if p.name in ("adapter", "best_adapter") and p.parent.name:
        return p.parent.name if p.name == "adapter" else f"{p.parent.name}-best"
    return p.name or "adapter"


def parse_adapter_specs(values: list[str]) -> list[AdapterSpec]:
    """Parses ``--adapter`` values: ``NAME=DIR``, ``DIR`` (named after its run) or ``none`` (the base).

    Raises:
        ValueError: a name used twice, a name 'none' given to a directory, or an empty value.
    """
    specs: list[AdapterSpec] = []
    for value in values:
        value = str(value).strip()
        if not value:
            raise ValueError("--adapter needs a value: DIR, NAME=DIR or none")
        if value.lower() == NONE:
            spec = AdapterSpec(NONE, None)
        elif "=" in value:
            name, path = (s.strip() for s in value.split("=", 1))
            if not name or not path:
                raise ValueError(f"--adapter '{value}': expected NAME=DIR")
            if name.lower() == NONE:
                raise ValueError(f"--adapter '{value}': the name 'none' is reserved for the base model")
            spec = AdapterSpec(name, path)
        else:
            name, k = _default_name(value), 2
            while any(s.name == name for s in specs):
                name = f"{_default_name(value)}-{k}"
                k += 1
            spec = AdapterSpec(name, value)
        if any(s.name == spec.name for s in specs):
            raise ValueError(f"--adapter: the name '{spec.name}' is used twice")
        specs.append(spec)
    return specs


def check_adapter_dir(path: str | Path) -> Path:
    """Raises a clear error unless ``path`` is a PEFT adapter directory."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"adapter directory '{path}' has no adapter_config.json "
            "(a training run writes it to OUTPUT_DIR/adapter)"
        )
    return path


def attach_adapters(model: torch.nn.Module, specs: list[AdapterSpec]) -> torch.nn.Module:
    """Loads every adapter of ``specs`` into one PEFT model around ``model`` (the base, loaded once).

    Returns ``model`` itself when no spec names a directory. The first adapter is active; all are
    frozen (inference).
    """
    from peft import PeftModel

    peft_model = None
    for spec in specs:
        if spec.path is None:
            continue
        path = str(check_adapter_dir(spec.path))
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, path, adapter_name=spec.name, is_trainable=False)
        else:
            peft_model.load_adapter(path, adapter_name=spec.name, is_trainable=False)
    if peft_model is None:
        return model
    first = next(s.name for s in specs if s.path is not None)
    peft_model.set_adapter(first, inference_mode=True)
    peft_model.eval()
    return peft_model


def adapter_names(model: torch.nn.Module) -> list[str]:
    """The adapters loaded into ``model`` (empty for a plain model)."""
    return list(getattr(model, "peft_config", {}) or {})


@contextlib.contextmanager
def use_adapter(model: torch.nn.Module, name: str | None):
    """Runs the block with adapter ``name`` active; ``"none"`` (or None) runs the base model.

    The previously active adapter is active again afterwards.

    Raises:
        ValueError: an adapter that is not loaded, listing those that are.
    """
    names = adapter_names(model)
    if name is None or name == NONE:
        if names:
            with model.disable_adapter():
                yield model
        else:
            yield model
        return
    if name not in names:
        loaded = ", ".join([NONE, *names])
        raise ValueError(f"adapter '{name}' is not loaded (loaded: {loaded})")
    previous = model.active_adapter
    model.set_adapter(name, inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(previous, inference_mode=True)


def load_model_with_adapters(
    model_name: str,
    specs: list[AdapterSpec],
    dtype: str = "auto",
    device: str = "auto",
    tokenizer_name: str = "",
    quantization: str = "",
    quantization_config: Any = None,
    date_string: str = "",
) -> tuple[torch.nn.Module, Any, Any]:
    """Base model (once) + processor + every adapter of ``specs``: what the use commands start with.

    Returns:
        (model, processor, family); the model is a PEFT model when any adapter is given.
        ``quantization`` ('4bit', '8bit') loads the base as training's ``--quantization`` does;
        ``date_string`` is the chat template's date (``data.date_string``; '' for the default).
    """
    from cotune.models.load import load_base_model, load_processor, resolve_dtype

    for spec in specs:  # fail on a bad path before the (slow) base model load
        if spec.path is not None:
            check_adapter_dir(spec.path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    processor = load_processor(tokenizer_name or model_name, *([date_string] if date_string else []))
    base, family = load_base_model(
        model_name,
        resolve_dtype(dtype, torch_device),
        device=torch_device,
        quantization=quantization,
        quantization_config=quantization_config,
    )
    return attach_adapters(base, specs), processor, family
