"""The one batched KV cache: rows in preallocated slots, each image's keys and values stored once.

Stage search (``cotune.infer.prefix``) and the server (``cotune.serve.engine``) both decode many rows
through one model. They share this cache:

- **Self-attention**: one preallocated buffer per layer, ``(slots, heads, length, head_dim)``. A row
  owns a slot; its tokens are written in place at its own end (``end``), so a row joins by taking a
  free slot and leaves by giving it back: no other row's cache is copied. Each slot has its own mask
  over the buffer's positions (left padding between pieces of different lengths is a masked hole)
  and its own position count (position ids count real tokens only), so a row's result does not
  depend on the others'. Buffers double when full (the one copy of everything, amortised).
- **Cross-attention** (Mllama's image keys and values): an ``Image`` entry per distinct image,
  computed once by the forward that first sees the pixels and found again by its inputs
  (``Image.inputs``). Rows that look at one image (stage search's candidates, a request's ``n``
  choices, requests with the same picture and adapter) share the entry: the forward gets it as a
  broadcast view (``expand``), not a copy. Only a forward that mixes rows of different images (or
  rows with and without one) needs one tensor per row: each slot then gets a copy of its image in
  a per-slot buffer once, when it first shares a forward with other images.
- A forward runs over a contiguous range of slots (views of the buffers, no gather); slots in the
  range that are not fed this time ride along masked and unchanged (``forward``).

``forward`` is the one entry point that feeds tokens; the next engine feature (chunked prefill: a
prompt fed in pieces over several steps; prefix sharing: ``fork`` without the copy) goes here.

Example:
    >>> cache = BatchCache(model.config, device, dtype)
    >>> slot = cache.add()
    >>> logits = forward(model, cache, {slot: {"input_ids": ids}}, extra=pixel_inputs)  # prefill
    >>> rows = cache.fork(slot, 4)  # 4 candidates continue the prompt; the image is shared
    >>> logits = forward(model, cache, {r: {"input_ids": torch.tensor([t])} for r, t in zip(rows, tokens)})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_ZEROS = object()  # a slot's image buffer holds zeros (its row looks at no image)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@dataclass(eq=False)  # compared by identity: the store holds each once
class Image:
    """One image's (or one prompt's images') cross-attention keys and values, per cross layer.

    Attributes:
        inputs: the pixel inputs it was computed from (how a later prompt finds it).
        tag: what else it depends on (the server's adapter name).
        keys, values: per cross layer, (1, kv heads, image tokens, head_dim).
        images: how many images (the cross-attention mask's image dimension).
        users: slots that look at it (freed at 0).
    """

    inputs: dict
    tag: str
    images: int
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    users: int = 0


class _SelfLayer:
    """What the model's self-attention layer ``idx`` sees: ``update`` writes and returns the batch view."""

    is_initialized = True

    def __init__(self, cache: BatchCache, idx: int) -> None:
        self.cache, self.idx = cache, idx

    @property
    def keys(self) -> torch.Tensor:
        return self.cache.k.get(self.idx, torch.empty(0))

    @property
    def values(self) -> torch.Tensor:
        return self.cache.v.get(self.idx, torch.empty(0))

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs):
        return self.cache._write(self.idx, keys, values)


class _CrossLayer:
    """What Mllama's cross-attention layer ``idx`` sees: the images of the rows in the forward.

    ``is_initialized`` is False when no row looks at an image (the model then skips the layer, as for
    a text-only prompt alone); ``update`` stores a new image's keys and values.
    """

    def __init__(self, cache: BatchCache, idx: int) -> None:
        self.cache, self.idx = cache, idx

    @property
    def is_initialized(self) -> bool:
        return self.cache._plan_has_images()

    @property
    def keys(self) -> torch.Tensor:
        view = self.cache._image_view(self.idx)
        return view[0] if view is not None else torch.empty(0)

    @property
    def values(self) -> torch.Tensor:
        view = self.cache._image_view(self.idx)
        return view[1] if view is not None else torch.empty(0)

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs):
        return self.cache._store_image(self.idx, keys, values)


@dataclass
class _Plan:
    """One forward: slots ``lo:hi``, each row's write start, and the key length it attends over."""

    lo: int
    hi: int
    starts: torch.Tensor  # (rows,) where each row's T new positions begin
    length: int  # key positions the forward attends over
    tokens: int  # real tokens fed (padding and rows riding along left out)
    fed: list[bool]  # which rows are fed (the others ride along: their outputs are dropped)
    new_image: Image | None = None  # the entry this forward's pixels fill


class BatchCache:
    """Rows in slots over one model; see the module docstring.

    Args:
        config: the model's config (its text config names the cross-attention layers).
        device, dtype: where and in what the keys and values live (the model's).
        slots: rows to allocate at first (doubles when full).
        length: positions per row to allocate at first (doubles when full).
        keep_images: keep an image's keys and values when no row looks at it any more (stage
            search: the judge's prompts come back to the image); otherwise its last row frees it.
    """

    def __init__(
        self,
        config: Any,
        device: torch.device | str,
        dtype: torch.dtype,
        slots: int = 8,
        length: int = 256,
        keep_images: bool = False,
    ) -> None:
        self.keep_images = keep_images
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.cross_layers = frozenset(getattr(text, "cross_attention_layers", None) or ())
        self.n_layers = text.num_hidden_layers
        self.device, self.dtype = torch.device(device), dtype
        self.layers = [
            _CrossLayer(self, i) if i in self.cross_layers else _SelfLayer(self, i)
            for i in range(self.n_layers)
        ]
        self.capacity, self.max_length = slots, length
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.mask = torch.zeros(slots, length, dtype=torch.bool, device=self.device)
        self.end = [0] * slots  # positions used (real tokens and holes)
        self.position = [0] * slots  # real tokens: the next token's position id
        self.used = [False] * slots
        self.image: list[Image | None] = [None] * slots
        self.images: list[Image] = []  # live entries
        # per cross layer, per-slot copies of the images (for forwards that mix images) and which
        # image each slot's copy holds
        self._buffer: dict[int, tuple[torch.Tensor, torch.Tensor, list]] = {}
        self.plan: _Plan | None = None  # the forward in progress
        self.encodes = 0  # images whose keys and values were computed
        self.copied = 0  # bytes copied between rows or into bigger buffers (the cost of joining)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """What the model's attention layers call (transformers' ``Cache.update``)."""
        return self.layers[layer_idx].update(keys, values)

    # ------------------------------------------------------------------ rows
    def add(self, image: Image | None = None) -> int:
        """A free slot, empty (looking at ``image``, if given)."""
        if all(self.used):
            self._grow(slots=2 * self.capacity)
        slot = self.used.index(False)
        self.used[slot] = True
        self.end[slot] = self.position[slot] = 0
        self.mask[slot] = False
        self._look_at(slot, image)
        return slot

    def free(self, slots) -> None:
        """Gives the slots back (nothing is copied; their image is freed with its last user)."""
        for slot in slots:
            self._look_at(slot, None)
            self.used[slot] = False

    def move(self, src: int, dst: int) -> None:
        """Moves row ``src`` into the free slot ``dst`` (its tokens copied, its image kept); ``src``
        is free after. What keeps a batch's rows in its lowest slots when others leave."""
        self.used[dst] = True
        self._look_at(dst, self.image[src])
        self._copy_tokens(src, dst)
        self.free([src])

    def fork(self, slot: int, n: int) -> list[int]:
        """``n`` new slots holding a copy of ``slot``'s tokens (``slot`` is kept); its image is shared."""
        out = []
        for _ in range(n):
            new = self.add(self.image[slot])
            self._copy_tokens(slot, new)
            out.append(new)
        return out

    def _copy_tokens(self, src: int, dst: int) -> None:
        """Slot ``dst`` gets ``src``'s keys, values, mask and positions (its image is set apart)."""
        end = self.end[src]
        for i in self.k:
            self.k[i][dst, :, :end] = self.k[i][src, :, :end]
            self.v[i][dst, :, :end] = self.v[i][src, :, :end]
            self.copied += 2 * self.k[i][src, :, :end].nbytes
        self.mask[dst] = self.mask[src]
        self.end[dst], self.position[dst] = end, self.position[src]

    def rows(self) -> int:
        return sum(self.used)

    def image_count(self, slots) -> int:
        """The image dimension a forward over ``slots`` takes for its cross-attention mask."""
        lo, hi = min(slots), max(slots) + 1
        return max((img.images for img in self.image[lo:hi] if img is not None), default=0)

    def find_image(self, inputs: dict, tag: str = "") -> Image | None:
        """The stored image computed from ``inputs`` (and ``tag``), if any."""
        return next((img for img in self.images if img.tag == tag and _same(img.inputs, inputs)), None)

    def _look_at(self, slot: int, image: Image | None) -> None:
        old = self.image[slot]
        if old is not None:
            old.users -= 1
            if old.users == 0 and not self.keep_images:
                self.images.remove(old)
        if image is not None:
            image.users += 1
        self.image[slot] = image

    # ------------------------------------------------------------------ a forward
    def prepare(self, lo: int, hi: int, fed: list[int], width: int) -> dict:
        """Plans a forward of ``width`` positions over slots ``lo:hi``; row i's last ``fed[i]`` are real.

        Returns the forward's ``attention_mask`` (4D, additive) and ``position_ids``; moves each fed
        row's end and position on.
        """
        starts = torch.tensor(self.end[lo:hi], device=self.device)
        need = int(starts.max()) + width
        if need > self.max_length:
            self._grow(length=max(need, 2 * self.max_length))
        steps = torch.arange(width, device=self.device)
        n = torch.tensor(fed, device=self.device)
        pad = (width - n)[:, None]
        real = (steps[None] >= pad) & (n[:, None] > 0)  # (rows, width)
        at = starts[:, None] + steps[None]
        self.mask[lo:hi].scatter_(1, at, real | self.mask[lo:hi].gather(1, at))
        length = need
        keys = torch.arange(length, device=self.device)
        visible = self.mask[lo:hi, None, :length] & (
            keys[None, None] <= at[:, :, None]
        )  # (rows, width, length)
        # a query with nothing to see (a pad in an empty row) gets a row of equal finite scores: no NaN
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        base = torch.tensor(self.position[lo:hi], device=self.device)
        positions = base[:, None] + (steps[None] - pad).clamp(min=0)
        for i, k in enumerate(fed):
            if k:
                self.end[lo + i] += width
                self.position[lo + i] += k
        self.plan = _Plan(lo, hi, starts, length, sum(fed), [k > 0 for k in fed])
        return {"attention_mask": mask[:, None], "position_ids": positions}

    def _write(self, idx: int, keys: torch.Tensor, values: torch.Tensor):
        plan = self.plan
        if idx not in self.k:
            self._allocate(idx, keys)
        rows, heads, width, dim = keys.shape
        at = (plan.starts[:, None] + torch.arange(width, device=self.device))[:, None, :, None]
        at = at.expand(rows, heads, width, dim)
        k, v = self.k[idx][plan.lo : plan.hi], self.v[idx][plan.lo : plan.hi]
        k.scatter_(2, at, keys.to(k.dtype))
        v.scatter_(2, at, values.to(v.dtype))
        return k[:, :, : plan.length], v[:, :, : plan.length]

    def _allocate(self, idx: int, like: torch.Tensor) -> None:
        shape = (self.capacity, like.shape[1], self.max_length, like.shape[3])
        self.k[idx] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v[idx] = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _grow(self, slots: int | None = None, length: int | None = None) -> None:
        """Bigger buffers (``slots`` rows, ``length`` positions), the old contents copied in."""
        slots, length = slots or self.capacity, length or self.max_length
        for store in (self.k, self.v):
            for i, old in store.items():
                new = old.new_zeros(slots, old.shape[1], length, old.shape[3])
                new[: old.shape[0], :, : old.shape[2]] = old
                self.copied += old.nbytes
                store[i] = new
        mask = self.mask.new_zeros(slots, length)
        mask[: self.mask.shape[0], : self.mask.shape[1]] = self.mask
        self.mask = mask
        for i, (k, v, held) in self._buffer.items():
            more = slots - k.shape[0]
            self._buffer[i] = (
                torch.cat([k, k.new_zeros(more, *k.shape[1:])]),
                torch.cat([v, v.new_zeros(more, *v.shape[1:])]),
                held + [None] * more,
            )
        grow = slots - self.capacity
        self.end += [0] * grow
        self.position += [0] * grow
        self.used += [False] * grow
        self.image += [None] * grow
        self.capacity, self.max_length = slots, length

    # ------------------------------------------------------------------ images
    def _fed_images(self) -> list[Image | None]:
        """The images of the rows fed in this forward (a row riding along may look at anything)."""
        plan = self.plan
        return [img for img, fed in zip(self.image[plan.lo : plan.hi], plan.fed) if fed]

    def _plan_has_images(self) -> bool:
        return self.plan.new_image is not None or any(img is not None for img in self._fed_images())

    def _store_image(self, idx: int, keys: torch.Tensor, values: torch.Tensor):
        image = self.plan.new_image
        if image is None or keys.shape[0] != 1:
            raise RuntimeError("BatchCache: pixels go with a forward of one row (forward(extra=...))")
        image.keys[idx], image.values[idx] = keys.to(self.dtype), values.to(self.dtype)
        return self._image_view(idx)

    def _image_view(self, idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The forward's rows' image keys and values: one shared entry broadcast, else per-slot
        copies (None while the forward's new image is not computed yet)."""
        plan = self.plan
        rows = self._fed_images()
        if any(img is not None and idx not in img.keys for img in rows):
            return None
        first = rows[0]
        if first is not None and all(img is first for img in rows):
            shape = (plan.hi - plan.lo, *first.keys[idx].shape[1:])
            return first.keys[idx].expand(shape), first.values[idx].expand(shape)
        tokens = max(img.keys[idx].shape[2] for img in rows if img is not None)
        k, v, held = self._buffers(idx, tokens)
        for slot, img, fed in zip(range(plan.lo, plan.hi), self.image[plan.lo : plan.hi], plan.fed):
            if fed and held[slot] is not (img or _ZEROS):
                k[slot], v[slot] = 0, 0  # a row without an image attends to zeros: its cross-attention adds 0
                if img is not None:
                    n = img.keys[idx].shape[2]
                    k[slot, :, :n], v[slot, :, :n] = img.keys[idx][0], img.values[idx][0]
                    self.copied += 2 * img.keys[idx].nbytes
                held[slot] = img or _ZEROS
        return k[plan.lo : plan.hi, :, :tokens], v[plan.lo : plan.hi, :, :tokens]

    def _buffers(self, idx: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Layer ``idx``'s per-slot image buffers, at least ``tokens`` long (new ones are empty)."""
        have = self._buffer.get(idx)
        if have is None or have[0].shape[2] < tokens:
            like = next(img.keys[idx] for img in self.image if img is not None)
            shape = (self.capacity, like.shape[1], tokens, like.shape[3])
            self._buffer[idx] = (like.new_zeros(shape), like.new_zeros(shape), [None] * self.capacity)
        return self._buffer[idx]


def _aligned(rows: list[dict | None], key: str, width: int, images: int, device) -> torch.Tensor:
    """Each row's ``key`` left-padded with zeros to ``width`` positions (an idle row: zeros).

    A cross-attention mask is also padded along its image dimension to ``images`` (the forward's
    image keys hold that many per row).
    """
    present = [r[key] for r in rows if r is not None and key in r]
    trailing = [max(x.shape[d] for x in present) for d in range(1, present[0].dim())]
    if key == "cross_attention_mask":
        trailing[0] = max(trailing[0], images)
    out = torch.zeros(len(rows), width, *trailing, dtype=present[0].dtype, device=device)
    for i, row in enumerate(rows):
        x = row.get(key) if row is not None else None
        if x is not None and len(x):
            out[(i, slice(width - len(x), None), *[slice(0, n) for n in x.shape[1:]])] = x.to(device)
    return out


@torch.no_grad()
def forward(
    model: torch.nn.Module,
    cache: BatchCache,
    pieces: dict[int, dict],
    extra: dict | None = None,
    image_tag: str = "",
    adapter_names: dict[int, str] | None = None,
    idle_adapter: str = "__base__",
) -> torch.Tensor:
    """Feeds each slot in ``pieces`` its tokens, all in one forward; their next-token logits.

    The forward runs over the slots from the lowest to the highest in ``pieces``; a slot between
    them that is not fed rides along (its cache unchanged, its output dropped). Pieces of different
    lengths are left-padded (a masked hole in the row's cache).

    Args:
        model: the model (put in eval mode by the caller).
        cache: the cache the slots belong to.
        pieces: per slot, ``input_ids`` (L,) and the other token-aligned inputs (L, ...).
        extra: pixel inputs of the one fed slot's prompt. With cross-attention layers their keys and
            values are stored once (an ``Image``) and found again for the same inputs and ``image_tag``,
            in which case the pixels are not run again.
        image_tag: what else the image's keys and values depend on (the adapter).
        adapter_names: per fed slot, PEFT's adapter for that row (rows riding along: ``idle_adapter``).

    Returns:
        (len(pieces), vocab) float32 logits of each fed slot's next token, in ``pieces``' order.
    """
    slots = list(pieces)
    lo, hi = min(slots), max(slots) + 1
    rows = [pieces.get(s) for s in range(lo, hi)]
    fed = [len(r["input_ids"]) if r is not None else 0 for r in rows]
    width = max(1, *fed)
    extra = _attach_image(cache, slots, extra, image_tag)
    masks = cache.prepare(lo, hi, fed, width)
    cache.plan.new_image = extra.pop(_NEW, None) if extra else None
    keys = {k for r in rows if r is not None for k in r}
    images = cache.image_count(range(lo, hi)) or 1
    inputs = {k: _aligned(rows, k, width, images, cache.device) for k in keys}
    if adapter_names is not None:
        inputs["adapter_names"] = [adapter_names.get(s, idle_adapter) for s in range(lo, hi)]
    try:
        out = model(**inputs, **masks, **(extra or {}), cache=cache, use_cache=True, logits_to_keep=1)
    finally:
        cache.plan = None
    if slots == list(range(lo, hi)):  # every row fed, in order: a view, not a copy of (rows, vocab)
        return out.logits[:, -1].float()
    return out.logits[[s - lo for s in slots], -1].float()


_NEW = "__new_image__"


def _attach_image(cache: BatchCache, slots: list[int], extra: dict | None, tag: str) -> dict | None:
    """The forward's pixel inputs: None when the slot's image is stored already (the slot now looks
    at it); with cross-attention layers, a new ``Image`` for the forward to fill goes under ``_NEW``."""
    if not extra or not cache.cross_layers:
        return extra
    if len(slots) != 1:
        raise ValueError("forward: pixel inputs go with one fed slot")
    (slot,) = slots
    found = cache.find_image(extra, tag)
    if found is not None:
        cache._look_at(slot, found)
        return None
    image = Image(inputs=extra, tag=tag, images=int(extra["pixel_values"].shape[1]))
    cache.images.append(image)
    cache.encodes += 1
    cache._look_at(slot, image)
    return {**extra, _NEW: image}
