"""The decoding state of a running batch: one KV cache for every row, left-padded, and per-row masks.

A request is prefilled alone (its own ``DynamicCache``, its images encoded once) and then merged
into the running batch by ``merge``: the self-attention layers' keys and values are left-padded
along the sequence to the longer of the two, the cross-attention layers' (the projected image
states Mllama caches there) are right-padded with zeros along the image-token dimension. Padding
never changes a row's result:

- a left-padded self-attention key is masked by ``attention_mask`` (its weight is exactly 0);
- an image slot a row does not have is masked by its ``cross_mask`` (weight exactly 0);
- a row without images in a batch with images attends uniformly to all-zero values, so the
  cross-attention output is exactly 0, and its feed-forward branch is multiplied by Mllama's
  ``full_text_row_masked_out_mask`` (0 for that row): the layer adds exactly 0, as when a
  text-only prompt skips the layer alone.

Finished rows leave with ``select``, which also drops the columns of padding every row shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Rows:
    """The running rows' cache and masks.

    Attributes:
        cache: a ``DynamicCache`` with one layer per decoder layer, batch dimension = rows.
        attention_mask: (rows, cached length) 1 for real tokens, 0 for left padding.
        positions: (rows,) the position of each row's next token (its real length so far).
        cross_mask: (rows, images, tiles) which image tiles each row's next tokens attend to
            (the last row of its prompt's cross-attention mask); None while no row has images.
        cross_layers: indices of the cross-attention layers.
    """

    cache: object
    attention_mask: torch.Tensor
    positions: torch.Tensor
    cross_mask: torch.Tensor | None
    cross_layers: tuple[int, ...]

    def __len__(self) -> int:
        return self.attention_mask.shape[0]

    def step_inputs(self) -> dict:
        """The masks of one decoding step (one new token per row), appending its column."""
        ones = torch.ones_like(self.attention_mask[:, :1])
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        inputs = {"attention_mask": self.attention_mask, "position_ids": self.positions[:, None]}
        if self.cross_mask is not None:
            inputs["cross_attention_mask"] = self.cross_mask[:, None]
        return inputs

    def advance(self) -> None:
        self.positions = self.positions + 1


def _layers(rows: Rows):
    return rows.cache.layers


def _has_states(layer) -> bool:
    return bool(layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0)


def _set(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    if not layer.is_initialized:
        layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values


def _pad_seq_left(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(x, (0, 0, length - x.shape[-2], 0))


def _pad_seq_right(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, length - x.shape[-2]))


def _image_states(rows: Rows, layer, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A cross-attention layer's keys and values padded to ``length`` image tokens (zeros without images)."""
    if _has_states(layer):
        return _pad_seq_right(layer.keys, length), _pad_seq_right(layer.values, length)
    shape = (len(rows), like.shape[1], length, like.shape[3])
    zeros = torch.zeros(shape, dtype=like.dtype, device=like.device)
    return zeros, zeros


def _cross_mask(rows: Rows, images: int, tiles: int) -> torch.Tensor:
    if rows.cross_mask is None:
        return torch.zeros(len(rows), images, tiles, dtype=torch.long, device=rows.attention_mask.device)
    return F.pad(rows.cross_mask, (0, 0, 0, images - rows.cross_mask.shape[1]))


def merge(a: Rows | None, b: Rows) -> Rows:
    """``a``'s rows followed by ``b``'s, in ``a``'s cache object (``b``'s is consumed)."""
    if a is None or len(a) == 0:
        return b
    length = max(a.attention_mask.shape[1], b.attention_mask.shape[1])
    for idx, (la, lb) in enumerate(zip(_layers(a), _layers(b))):
        if idx in a.cross_layers:
            with_states = [x for x in (la, lb) if _has_states(x)]
            if not with_states:
                continue
            like = with_states[0].keys
            images = max(x.keys.shape[-2] for x in with_states)
            ka, va = _image_states(a, la, images, like)
            kb, vb = _image_states(b, lb, images, like)
        else:
            ka, va = _pad_seq_left(la.keys, length), _pad_seq_left(la.values, length)
            kb, vb = _pad_seq_left(lb.keys, length), _pad_seq_left(lb.values, length)
        _set(la, torch.cat([ka, kb]), torch.cat([va, vb]))
    mask = torch.cat([F.pad(r.attention_mask, (length - r.attention_mask.shape[1], 0)) for r in (a, b)])
    cross = None
    if a.cross_mask is not None or b.cross_mask is not None:
        ref = a.cross_mask if a.cross_mask is not None else b.cross_mask
        images = max(r.cross_mask.shape[1] for r in (a, b) if r.cross_mask is not None)
        cross = torch.cat([_cross_mask(r, images, ref.shape[2]) for r in (a, b)])
    return Rows(a.cache, mask, torch.cat([a.positions, b.positions]), cross, a.cross_layers)


def select(rows: Rows, keep: list[int]) -> Rows:
    """The rows ``keep`` (in that order), without the padding columns they all share."""
    index = torch.tensor(keep, dtype=torch.long, device=rows.attention_mask.device)
    mask = rows.attention_mask.index_select(0, index)
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if len(real) else mask.shape[1]
    mask = mask[:, start:]
    for idx, layer in enumerate(_layers(rows)):
        if not _has_states(layer):
            continue
        keys, values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        if idx not in rows.cross_layers:
            keys, values = keys[:, :, start:], values[:, :, start:]
        layer.keys, layer.values = keys, values
    cross = rows.cross_mask.index_select(0, index) if rows.cross_mask is not None else None
    if cross is not None and not bool(cross.any()):  # no row left attends to an image: skip the layers
        cross = None
        for idx in rows.cross_layers:
            layer = _layers(rows)[idx]
            layer.keys = layer.values = None
            layer.is_initialized = False
    return Rows(rows.cache, mask, rows.positions.index_select(0, index), cross, rows.cross_layers)


def repeat_rows(rows: Rows, n: int) -> Rows:
    """Each row ``n`` times (a request asking for ``n`` choices shares one prefill)."""
    return select(rows, [i for i in range(len(rows)) for _ in range(n)]) if n > 1 else rows
