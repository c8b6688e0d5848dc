"""llama-cookbook dataset files, used unchanged.

Such a file defines ``get_custom_dataset(dataset_config, processor, split)`` (extra keyword
arguments with defaults, such as ``split_ratio``, are fine) and optionally
``get_data_collator(processor)``. cotune calls them as llama-cookbook's ``finetuning.py`` does,
then audits the first batch for the mistakes such files commonly make.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cotune.data.chat import IGNORE_INDEX


def load_dataset_module(spec: str) -> tuple[Any, str]:
    """'path/file.py' or 'path/file.py:func' -> (module, dataset function name)."""
    path, _, func = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"custom_dataset.file '{file}' not found")
    name = f"cotune_user_dataset_{abs(hash(str(file.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # so DataLoader workers can pickle objects defined in the file
    module_spec.loader.exec_module(module)
    func = func or "get_custom_dataset"
    if not hasattr(module, func):
        raise AttributeError(f"{file} defines no function '{func}' (the cookbook interface needs one)")
    return module, func


def cookbook_dataset(dataset_config: Any, processor: Any, split: str) -> tuple[Any, Callable | None]:
    """Calls the file's dataset function for ``split`` ('train' or 'test').

    Returns:
        The dataset (anything with ``__len__`` and ``__getitem__``) and the file's collator (or None).
    """
    module, func = load_dataset_module(dataset_config.file)
    split_name = dataset_config.train_split if split == "train" else dataset_config.test_split
    dataset = getattr(module, func)(dataset_config, processor, split_name)
    collator = module.get_data_collator(processor) if hasattr(module, "get_data_collator") else None
    return dataset, collator


def audit_batch(batch: dict, tokenizer: Any, image_token_id: int | None) -> list[str]:
    """Problems in a batch built by a user's collator that would silently hurt training."""
    warnings = []
    ids, labels = batch.get("input_ids"), batch.get("labels")
    if not isinstance(ids, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return ["the collator returned no input_ids/labels tensors"]
    bos = tokenizer.bos_token_id
    if bos is not None:
        per_row = (ids == bos).sum(dim=1)
        if (per_row > 1).any():
            warnings.append(
                f"{int((per_row > 1).sum())} of {len(per_row)} samples hold {int(per_row.max())} BOS tokens "
                "(the chat template already adds <|begin_of_text|>; tokenize with add_special_tokens=False)"
            )
    learn = labels != IGNORE_INDEX
    if not learn.any():
        warnings.append("no label tokens in the batch: every label is -100")
    pad = tokenizer.pad_token_id
    if pad is not None and pad != tokenizer.eos_token_id and (learn & (ids == pad)).any():  # EOS pad: learned
        warnings.append("padding tokens are in the loss (labels should be -100 there)")
    if image_token_id is not None and (learn & (ids == image_token_id)).any():
        warnings.append("image tokens are in the loss (labels should be -100 there)")
    if learn.float().mean() > 0.95:
        warnings.append("more than 95% of tokens are labelled: is the prompt left in the loss?")
    return warnings
