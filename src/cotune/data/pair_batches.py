"""Preference pairs as training batches: chosen and rejected rows of one padded batch.

A batch of ``n`` pairs is a ``PaddingCollator`` batch of ``2n`` rows, the chosen conversations first,
then the rejected ones in the same order, with ``batch["pairs"] = n``. Each row's labels come from
``chat.tokenize_conversation`` (the one masking rule: only the reply is learned), and each row gets its
pair's image inputs (decoded once per pair), so the vision features are computed for both rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cotune.data.batching import LengthGroupedBatchSampler, PaddingCollator
from cotune.data.build import DataBundle, batch_loader, held_out_loader, loader_settings, validation_subset
from cotune.data.dataset import Encoded, ItemKey, SFTDataset, encode_samples
from cotune.data.pairs import read_pairs
from cotune.data.records import DataError, Problem, report_problems, split_train_test
from cotune.data.sample import Sample
from cotune.models.families import ModelFamily


def encode_pairs(
    pairs: list[tuple[Sample, Sample]], processor: Any, family: ModelFamily, max_seq_len: int, overlength: str
) -> tuple[list[tuple[Encoded, Encoded]], list[Problem]]:
    """Tokenizes both sides of every pair (``dataset.encode_samples``); a pair either side of which is
    unusable (too long, no reply token, not renderable) is dropped with its problem."""
    chosen, p1, _ = encode_samples([c for c, _ in pairs], processor, family, max_seq_len, overlength)
    rejected, p2, _ = encode_samples([r for _, r in pairs], processor, family, max_seq_len, overlength)
    by_where = {e.where: e for e in rejected}
    both = [(c, by_where[c.where]) for c in chosen if c.where in by_where]
    problems = [Problem(p.where, f"chosen: {p.reason}") for p in p1]
    problems += [Problem(p.where, f"rejected: {p.reason}") for p in p2]
    return both, problems


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of encoded pairs; item = {"chosen": item, "rejected": item} (images once)."""

    def __init__(self, pairs: list[tuple[Encoded, Encoded]], processor: Any, family: ModelFamily) -> None:
        self.pairs = pairs
        self.chosen = SFTDataset([c for c, _ in pairs], processor, family)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def lengths(self) -> list[int]:
        """A pair's cost: its longer side (both are padded to the batch's longest row)."""
        return [max(len(c.input_ids), len(r.input_ids)) for c, r in self.pairs]

    def __getitem__(self, key: int | ItemKey) -> dict:
        chosen = self.chosen[key]
        if "error" in chosen:
            return chosen
        rejected = self.pairs[int(key[0] if isinstance(key, tuple) else key)][1]
        other = {k: v for k, v in chosen.items() if k not in ("input_ids", "labels")}  # the same images
        other["input_ids"] = torch.tensor(rejected.input_ids, dtype=torch.long)
        other["labels"] = torch.tensor(rejected.labels, dtype=torch.long)
        return {"chosen": chosen, "rejected": other}


class PairCollator(PaddingCollator):
    """Pads pairs into one batch: the chosen rows, then the rejected rows; ``batch["pairs"]`` = n."""

    def __call__(self, items: list[dict | None]) -> dict:
        skipped = [it["error"] for it in items if it is not None and "error" in it]
        items = [it for it in items if it is not None and "error" not in it]
        if not items:
            return {"skipped": skipped, "empty": True}
        batch = self.collate([it["chosen"] for it in items] + [it["rejected"] for it in items])
        batch["pairs"] = len(items)
        if skipped:
            batch["skipped"] = skipped
        return batch


def _read(cfg: Any, path: str, log: Callable[[str], None]) -> tuple[list, list[Problem], int]:
    d = cfg.data
    pairs, problems = read_pairs(path, d.image_root, d.system_prompt, d.image_workers, d.image_check)
    log(f"{path}: {len(pairs)} preference pairs")
    if not pairs and problems:
        listing = "\n".join(f"  {p}" for p in problems[:20])
        raise DataError(f"{path}: none of its {len(problems)} records is a usable pair:\n{listing}")
    return pairs, problems, len(pairs) + len(problems)


def build_pair_data(
    cfg: Any,
    processor: Any,
    family: ModelFamily,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[str], None] = print,
    device_type: str = "cpu",
) -> DataBundle:
    """Reads, checks, splits, tokenizes and batches the pairs file ``cfg.dataset`` (``method: dpo``).

    Held-out pairs are ``data.test_file`` or a seeded ``data.test_split_ratio`` of the file, of which
    validation reads a seeded ``data.val_max_samples``; problems are reported with file:line and
    skipped, or listed in one error with ``data.on_error: raise``. The loaders are set as
    ``build_data``'s (``device_type`` 'cuda': worker processes and pinned memory).
    """
    d = cfg.data
    if str(cfg.dataset).endswith(".py") or cfg.dataset == "custom_dataset":
        raise DataError("method dpo reads a pairs file (--dataset pairs.jsonl), not a llama-cookbook dataset")
    pairs, problems, total = _read(cfg, cfg.dataset, log)
    if d.test_file:
        val_pairs, val_problems, n = _read(cfg, d.test_file, log)
        problems, total, train_pairs = problems + val_problems, total + n, pairs
    else:
        train_pairs, val_pairs = split_train_test(pairs, d.test_split_ratio, d.split_seed)
    train_enc, p1 = encode_pairs(train_pairs, processor, family, d.max_seq_len, d.overlength)
    val_enc, p2 = encode_pairs(val_pairs, processor, family, d.max_seq_len, d.overlength)
    problems += p1 + p2
    report_problems(problems, d.on_error, total, log=log if rank == 0 else (lambda s: None))
    if not train_enc:
        raise DataError(f"no usable training pairs in {cfg.dataset}")
    tokenizer = processor.tokenizer
    collate = PairCollator(tokenizer.pad_token_id, family, family.image_token_id(tokenizer))
    train_ds = PairDataset(train_enc, processor, family)
    sampler = LengthGroupedBatchSampler(
        train_ds.lengths, cfg.batch_size_training, seed=cfg.seed, rank=rank, world_size=world_size, keys=True
    )
    report = [f"train: {len(train_enc)} pairs", f"validation: {len(val_enc)} pairs"]
    workers, pin = loader_settings(cfg.num_workers_dataloader, device_type)
    val = None
    if cfg.run_validation and val_enc:
        val_enc, line = validation_subset(val_enc, d.val_max_samples, d.split_seed, unit="pairs")
        report.append(line)
        val_ds = PairDataset(val_enc, processor, family)
        val = held_out_loader(cfg, val_ds, collate, rank, world_size, workers, pin)
    report.append(f"loader: {workers} worker processes" + (", pinned memory" if pin else ""))
    train = batch_loader(train_ds, sampler, collate, workers, pin)
    return DataBundle(train=train, val=val, train_sampler=sampler, report=report)
