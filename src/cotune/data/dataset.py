"""Samples -> tokenized examples (eagerly, to know lengths) -> model inputs (lazily, images per item)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from jinja2 import TemplateError

from cotune.data.chat import IGNORE_INDEX, SystemPromptRefused, tokenize_conversation
from cotune.data.images import load_image
from cotune.data.sample import Problem, Sample
from cotune.models.families import ModelFamily


@dataclass
class Encoded:
    """A tokenized sample; its images are decoded only when the item is fetched."""

    input_ids: list[int]
    labels: list[int]
    images: list[Any]
    id: str
    where: str
    meta: dict = field(default_factory=dict)

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for lab in self.labels if lab != IGNORE_INDEX)


@dataclass
class EncodeStats:
    """What happened to samples at tokenization, for the run report."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    max_len: int = 0
    lengths: list[int] = field(default_factory=list)  # every rendered sample, before the policy
    label_tokens: list[int] = field(default_factory=list)  # every kept sample

    def describe(self, max_seq_len: int) -> str:
        return (
            f"{self.kept} samples kept (longest {self.max_len} tokens); over max_seq_len={max_seq_len}: "
            f"{self.truncated} truncated, {self.dropped} dropped"
        )


def encode_samples(
    samples: list[Sample],
    processor: Any,
    family: ModelFamily,
    max_seq_len: int,
    overlength: str = "drop",
) -> tuple[list[Encoded], list[Problem], EncodeStats]:
    """Tokenizes every sample and applies the max_seq_len policy.

    Args:
        samples: validated samples.
        processor: the checkpoint's processor.
        family: the model family (image token, tokens per image).
        max_seq_len: longest sample in tokens.
        overlength: 'drop' samples over the limit, or 'truncate' them (kept only if the image tokens
            and at least one label token survive).

    Returns:
        The encoded samples, the problems of those removed, and counts for the report.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    image_id = family.image_token_id(tokenizer)
    per_image = family.tokens_per_image(processor)
    encoded, problems, stats = [], [], EncodeStats()
    for s in samples:
        try:
            ids, labels = tokenize_conversation(processor, s.messages, family.image_token, per_image)
        except SystemPromptRefused:
            raise  # the option's fault, not the record's: one error before any work
        except (ValueError, TemplateError) as e:
            # the record's content: spans that cannot be located, or the template's raise_exception
            # (Mllama's refuses a system message with images); any other error is a bug and stops the run
            problems.append(Problem(s.where, f"cannot render with the chat template: {e}"))
            continue
        stats.lengths.append(len(ids))
        if len(ids) > max_seq_len:
            n_image_tokens = ids.count(image_id)
            if overlength == "drop":
                stats.dropped += 1
                problems.append(Problem(s.where, f"{len(ids)} tokens > max_seq_len={max_seq_len} (dropped)"))
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if ids.count(image_id) != n_image_tokens or all(lab == IGNORE_INDEX for lab in labels):
                stats.dropped += 1
                problems.append(
                    Problem(s.where, f"truncated to {max_seq_len} tokens nothing is left to learn")
                )
                continue
            stats.truncated += 1
        if all(lab == IGNORE_INDEX for lab in labels):
            problems.append(Problem(s.where, "no assistant tokens to learn from"))
            continue
        encoded.append(Encoded(ids, labels, s.images, s.id, s.where, s.meta))
        stats.label_tokens.append(encoded[-1].n_label_tokens)
        stats.max_len = max(stats.max_len, len(ids))
    stats.kept = len(encoded)
    return encoded, problems, stats


class ItemKey(NamedTuple):
    """What a batch sampler hands the dataset for one sample.

    The epoch travels with the index (rather than being set on the dataset) because persistent
    DataLoader workers hold their own copy of the dataset: a key is the only thing that reaches
    them every epoch. ``row`` says which packed row of the batch the sample goes to (-1: none).
    """

    index: int
    epoch: int = 0
    row: int = -1


class SFTDataset(torch.utils.data.Dataset):
    """Map-style dataset of encoded samples; images are decoded and preprocessed per item.

    Args:
        encoded: output of ``encode_samples``.
        processor: the checkpoint's processor (its image processor is used).
        family: the model family.
        augment: optional ``(image, index, epoch, k) -> image`` applied to the k-th decoded image of
            sample ``index`` (training only; see ``augment.Augmenter``).
    """

    def __init__(
        self,
        encoded: list[Encoded],
        processor: Any,
        family: ModelFamily,
        augment: Callable[..., Any] | None = None,
    ) -> None:
        self.encoded = encoded
        self.processor = processor
        self.family = family
        self.augment = augment

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.encoded]

    def __getitem__(self, key: int | ItemKey) -> dict | None:
        key = ItemKey(int(key)) if not isinstance(key, tuple) else ItemKey(*key)
        e = self.encoded[key.index]
        item: dict = {
            "input_ids": torch.tensor(e.input_ids, dtype=torch.long),
            "labels": torch.tensor(e.labels, dtype=torch.long),
            "where": e.where,
            "row": key.row,
        }
        if e.images:
            try:
                images = [load_image(ref) for ref in e.images]
            except ValueError as err:  # checked before training; a file changed since is skipped
                return {"error": f"{e.where}: {err}", "row": key.row}
            if self.augment is not None:
                images = [self.augment(img, key.index, key.epoch, k) for k, img in enumerate(images)]
            item.update(self.family.image_inputs(self.processor, [images]))
        return item
