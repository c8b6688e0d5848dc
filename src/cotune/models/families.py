"""What is specific to each model architecture, in one place; the rest of cotune asks this module.

A family knows its transformers model class, the decoder/encoder layer classes (wrapped one by one
by FSDP and activation checkpointing), the inputs its forward takes, its LoRA target presets, its
image token and how images become model inputs. Adding an architecture means adding one ``ModelFamily`` here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

LORA_PRESETS = ("language", "language+cross_attention", "all", "vision+cross_attention")
# freeze_LLM_only with LoRA: the adapter on the vision tower, the projector and (Mllama) the
# cross-attention layers only, none on the language model's self-attention layers
LLM_FROZEN_PRESET = "vision+cross_attention"

_ATTN = r"(self_attn|cross_attn)\.(q|k|v|o)_proj"
_MLP = r"mlp\.(gate|up|down)_proj"


# Batch key of a blank image that only ``ModelFamily.dummy_vision_pass`` takes (not the forward).
DUMMY_PIXELS = "dummy_pixel_values"


@dataclass(frozen=True)
class ModelFamily:
    """Architecture-specific knowledge.

    Attributes:
        name: short name shown to users.
        model_types: ``config.model_type`` values of this family.
        layer_classes: class names of the repeated blocks (text decoder and vision encoder layers).
        input_keys: the keys of a collated batch that the model's forward takes (``labels``
            included: the loss takes them); ``model_inputs`` picks them out of a batch.
        image_token: the placeholder token that marks an image in the rendered text.
        lora_targets: builds the PEFT ``target_modules`` regex for a preset from the model config.
        image_inputs: turns per-sample image lists into model inputs (see ``mllama_image_inputs``).
        collate_images: stacks the image inputs of a batch's items and builds any masks that tie
            text positions to images (``mllama_collate_images``).
        tokens_per_image: how many copies of ``image_token`` one image occupies in the text (1 for
            cross-attention models; the patch count for LLaVA-style models).
        dummy_image_inputs: for a batch without images, image inputs that no text attends to, so
            that under FSDP every rank runs the vision layers (their collectives) every step;
            None when the family has none (``mllama_dummy_image_inputs``). Inputs the model's
            forward cannot take go under ``DUMMY_PIXELS`` and are run by ``dummy_vision_pass``.
        dummy_vision_pass: ``(inner model, pixel_values) -> scalar``: runs the vision layers on
            ``inputs[DUMMY_PIXELS]`` before the text; the loss adds it times zero
            (``llava_dummy_vision_pass``). None when the dummy inputs go to the forward itself.
        collate_packed_images: like ``collate_images`` for packed rows (lists of items that share a
            row, in order); each sample's text must reach only its own images. None: no packing.
        token_keys: the batch entries laid out along the text (one row per token), which left
            padding for generation moves with the tokens.
        end_of_turn_tokens: the tokens that end an assistant turn in the chat template (besides
            the tokenizer's EOS): generation stops at them.
        unquantized_modules: module names a 4-bit or 8-bit base keeps in its own dtype (transformers'
            ``llm_int8_skip_modules``, which matches a module name's prefix or its last parts: write
            them from the model's root, ``model.vision_model``, since ``vision_model`` alone matches
            no vision linear's name and leaves the tower quantized).
    """

    name: str
    model_types: tuple[str, ...]
    layer_classes: tuple[str, ...]
    input_keys: tuple[str, ...]
    image_token: str
    lora_targets: Callable[[Any, str], str]
    image_inputs: Callable[..., dict]
    collate_images: Callable[[list[dict], int, int], dict] = field(
        default=lambda items, seq_len, image_id: {}
    )
    tokens_per_image: Callable[[Any], int] = field(default=lambda processor: 1)
    dummy_image_inputs: Callable[[dict, Any], dict] | None = None
    dummy_vision_pass: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None
    collate_packed_images: Callable[[list[list[dict]], int, int], dict] | None = None
    token_keys: tuple[str, ...] = ("input_ids", "attention_mask")
    end_of_turn_tokens: tuple[str, ...] = ("<|eot_id|>",)  # Llama 3's chat format
    unquantized_modules: tuple[str, ...] = ("lm_head",)

    def model_inputs(self, batch: dict, dummy_images_for: Any = None) -> dict:
        """The entries of a collated ``batch`` that the forward takes (``input_keys``).

        Args:
            batch: a collated batch.
            dummy_images_for: the model's config when every process must run the vision layers
                (several processes: FSDP's collectives pair up across ranks); a batch without
                images then gets the family's ``dummy_image_inputs``. None: the batch as it is.
        """
        inputs = {k: v for k, v in batch.items() if k in self.input_keys}
        wants_dummy = dummy_images_for is not None and self.dummy_image_inputs is not None
        if wants_dummy and "pixel_values" not in inputs:
            inputs.update(self.dummy_image_inputs(inputs, dummy_images_for))
        return inputs

    def end_of_turn_ids(self, tokenizer: Any) -> list[int]:
        """Ids that end a reply: the family's end-of-turn tokens, the tokenizer's EOS and every id of
        the checkpoint's ``generation_config.eos_token_id`` (``load_processor`` keeps them on the
        tokenizer as ``generation_eos_ids``)."""
        ids = [tokenizer.convert_tokens_to_ids(t) for t in self.end_of_turn_tokens] + [tokenizer.eos_token_id]
        ids += list(getattr(tokenizer, "generation_eos_ids", ()))
        return [t for t in dict.fromkeys(ids) if t is not None and t != tokenizer.unk_token_id]

    def image_token_id(self, tokenizer) -> int:
        return tokenizer.convert_tokens_to_ids(self.image_token)

    def resolve_lora_targets(self, config: Any, target_modules: Any) -> Any:
        """A preset name becomes this family's regex; a list of module names passes through."""
        if isinstance(target_modules, str) and target_modules in LORA_PRESETS:
            return self.lora_targets(config, target_modules)
        if isinstance(target_modules, str) and "," in target_modules:
            return [t.strip() for t in target_modules.split(",") if t.strip()]
        return target_modules


# ----------------------------------------------------------------------------- Mllama


def _mllama_lora_targets(config: Any, preset: str) -> str:
    text = config.text_config
    cross = set(text.cross_attention_layers)
    self_layers = "|".join(str(i) for i in range(text.num_hidden_layers) if i not in cross)
    parts = []
    if preset != LLM_FROZEN_PRESET:
        parts.append(rf"model\.language_model\.layers\.({self_layers})\.({_ATTN}|{_MLP})")
    if preset in ("language+cross_attention", "all", LLM_FROZEN_PRESET) and cross:
        cross_layers = "|".join(str(i) for i in sorted(cross))
        parts.append(rf"model\.language_model\.layers\.({cross_layers})\.({_ATTN}|{_MLP})")
    if preset in ("all", LLM_FROZEN_PRESET):
        parts.append(
            r"model\.vision_model\.(transformer|global_transformer)\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.fc(1|2))"
        )
        parts.append(r"model\.multi_modal_projector")
    return "|".join(f"({p})" for p in parts)


def mllama_image_inputs(processor: Any, images: list[list[Any]]) -> dict:
    """Runs the Mllama image processor on one sample's images.

    Args:
        processor: the checkpoint's ``MllamaProcessor``.
        images: a list with one list of PIL images (one sample).

    Returns:
        ``pixel_values`` (n_images, max_tiles, 3, H, W), ``aspect_ratio_ids`` (n_images,),
        ``aspect_ratio_mask`` (n_images, max_tiles) and ``num_tiles`` (list of ints).
    """
    out = processor.image_processor(images=images, return_tensors="pt")
    return {
        "pixel_values": out["pixel_values"][0],
        "aspect_ratio_ids": out["aspect_ratio_ids"][0],
        "aspect_ratio_mask": out["aspect_ratio_mask"][0],
        "num_tiles": list(out["num_tiles"][0]),
    }


def mllama_cross_attention_mask(
    input_ids: list[int], image_token_id: int, num_tiles: list[int]
) -> list[tuple]:
    """Which text positions attend to which image, as (image_index, start, end, n_tiles) spans.

    Mllama's rule: the text after an image token attends to that image until the next image token;
    consecutive image tokens all attend to the text that follows the group. ``end`` is exclusive and
    ``None`` means "to the end of the sequence".
    """
    locations = [i for i, t in enumerate(input_ids) if t == image_token_id]
    spans: list[list] = []
    for k, loc in enumerate(locations):
        end = locations[k + 1] if k + 1 < len(locations) else None
        spans.append([k, loc, end, num_tiles[k] if k < len(num_tiles) else 0])
    # consecutive image tokens attend to everything the last of the group attends to
    for k in range(len(spans) - 2, -1, -1):
        if spans[k][2] == spans[k + 1][1] and spans[k][1] + 1 == spans[k + 1][1]:
            spans[k][2] = spans[k + 1][2]
    return [tuple(s) for s in spans]


def _empty_aspect_ratio_mask(batch: int, max_images: int, tiles: int) -> torch.Tensor:
    """The aspect-ratio mask of image slots no image fills, as the HF processor pads them: the first
    tile on. An all-zero slot changes what text rows attending to no image see (transformers
    averages over every image slot there, #39379), so the loss would differ from HF's."""
    mask = torch.zeros(batch, max_images, tiles, dtype=torch.long)
    mask[:, :, 0] = 1
    return mask


def mllama_collate_images(items: list[dict], seq_len: int, image_token_id: int) -> dict:
    """Batches Mllama image inputs; samples without images get zero tiles and no cross-attention.

    Returns an empty dict when no item has an image (the model then skips cross-attention).
    Otherwise ``pixel_values`` (B, max_images, max_tiles, 3, H, W), ``aspect_ratio_ids``
    (B, max_images), ``aspect_ratio_mask`` (B, max_images, max_tiles) and
    ``cross_attention_mask`` (B, seq_len, max_images, max_tiles).
    """
    with_images = [it for it in items if it.get("pixel_values") is not None]
    if not with_images:
        return {}
    _, tiles, channels, height, width = with_images[0]["pixel_values"].shape
    max_images = max(it["pixel_values"].shape[0] for it in with_images)
    batch = len(items)
    pixel_values = torch.zeros(
        batch, max_images, tiles, channels, height, width, dtype=with_images[0]["pixel_values"].dtype
    )
    ratio_ids = torch.zeros(batch, max_images, dtype=torch.long)
    ratio_mask = _empty_aspect_ratio_mask(batch, max_images, tiles)
    cross_mask = torch.zeros(batch, seq_len, max_images, tiles, dtype=torch.long)
    for b, it in enumerate(items):
        if it.get("pixel_values") is None:
            continue
        n = it["pixel_values"].shape[0]
        pixel_values[b, :n] = it["pixel_values"]
        ratio_ids[b, :n] = it["aspect_ratio_ids"]
        ratio_mask[b, :n] = it["aspect_ratio_mask"]
        ids = it["input_ids"].tolist()
        for image_index, start, end, n_tiles in mllama_cross_attention_mask(
            ids, image_token_id, it["num_tiles"]
        ):
            cross_mask[b, start : len(ids) if end is None else end, image_index, :n_tiles] = 1
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": ratio_ids,
        "aspect_ratio_mask": ratio_mask,
        "cross_attention_mask": cross_mask,
    }


def mllama_dummy_image_inputs(batch: dict, config: Any) -> dict:
    """One empty image slot per sample that no text position attends to: the slot the collator gives
    a sample without images in a batch with images (blank pixels, aspect-ratio id 0, first tile on).

    The vision tower and the cross-attention layers run on it. An all-zero ``cross_attention_mask``
    masks the feed-forward branch of cross-attention out for every text row, but transformers still
    lets such rows average over the image slots in the gated attention branch (#39379), so the loss
    is not that of the text-only batch run alone (which skips cross-attention): it is that of the
    same samples in a one-process batch that has images, which is what several processes must match.

    Args:
        batch: a collated batch without ``pixel_values`` (``input_ids`` gives batch and length).
        config: the model's ``MllamaConfig``.
    """
    vision = config.vision_config
    batch_size, seq_len = batch["input_ids"].shape
    tiles, size = vision.max_num_tiles, vision.image_size
    ratio_mask = torch.zeros(batch_size, 1, tiles, dtype=torch.long)
    ratio_mask[:, :, 0] = 1
    return {
        "pixel_values": torch.zeros(batch_size, 1, tiles, vision.num_channels, size, size),
        "aspect_ratio_ids": torch.zeros(batch_size, 1, dtype=torch.long),  # 0: an empty slot
        "aspect_ratio_mask": ratio_mask,
        "cross_attention_mask": torch.zeros(batch_size, seq_len, 1, tiles, dtype=torch.long),
    }


def mllama_collate_packed_images(rows: list[list[dict]], seq_len: int, image_token_id: int) -> dict:
    """Packed rows: a row's images are stacked in the image dimension, in sample order, and each
    sample's tokens attend (by Mllama's rule, within the sample) only to that sample's images.

    Returns an empty dict when no item has an image; otherwise the same keys and shapes as
    ``mllama_collate_images`` with B = number of rows and max_images = most images in a row.
    """
    with_images = [it for row in rows for it in row if it.get("pixel_values") is not None]
    if not with_images:
        return {}
    _, tiles, channels, height, width = with_images[0]["pixel_values"].shape
    per_row = [
        sum(it["pixel_values"].shape[0] for it in row if it.get("pixel_values") is not None) for row in rows
    ]
    batch, max_images = len(rows), max(per_row)
    pixel_values = torch.zeros(
        batch, max_images, tiles, channels, height, width, dtype=with_images[0]["pixel_values"].dtype
    )
    ratio_ids = torch.zeros(batch, max_images, dtype=torch.long)
    ratio_mask = _empty_aspect_ratio_mask(batch, max_images, tiles)
    cross_mask = torch.zeros(batch, seq_len, max_images, tiles, dtype=torch.long)
    for b, row in enumerate(rows):
        first_image, first_token = 0, 0
        for it in row:
            n_tokens = len(it["input_ids"])
            if it.get("pixel_values") is not None:
                n = it["pixel_values"].shape[0]
                pixel_values[b, first_image : first_image + n] = it["pixel_values"]
                ratio_ids[b, first_image : first_image + n] = it["aspect_ratio_ids"]
                ratio_mask[b, first_image : first_image + n] = it["aspect_ratio_mask"]
                spans = mllama_cross_attention_mask(it["input_ids"].tolist(), image_token_id, it["num_tiles"])
                for image_index, start, end, n_tiles in spans:
                    stop = n_tokens if end is None else end  # never past the sample's own tokens
                    rows_slice = slice(first_token + start, first_token + stop)
                    cross_mask[b, rows_slice, first_image + image_index, :n_tiles] = 1
                first_image += n
            first_token += n_tokens
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": ratio_ids,
        "aspect_ratio_mask": ratio_mask,
        "cross_attention_mask": cross_mask,
    }


MLLAMA = ModelFamily(
    name="mllama",
    model_types=("mllama",),
    layer_classes=(
        "MllamaSelfAttentionDecoderLayer",
        "MllamaCrossAttentionDecoderLayer",
        "MllamaVisionEncoderLayer",
    ),
    input_keys=(
        "input_ids",
        "attention_mask",
        "labels",
        "position_ids",  # packed rows: positions restart per sample, which confines attention to it
        "pixel_values",
        "aspect_ratio_ids",
        "aspect_ratio_mask",
        "cross_attention_mask",
    ),
    image_token="<|image|>",
    lora_targets=_mllama_lora_targets,
    # QLoRA quantizes the language model's linears (8.7 of the 11B's 10.7 B parameters). The vision
    # tower (0.9 B) and projector read pixels through few, wide layers whose errors every image token
    # carries; embeddings and lm_head are lookups and the logits, not matmuls bitsandbytes replaces.
    unquantized_modules=("model.vision_model", "model.multi_modal_projector", "lm_head", "embed_tokens"),
    image_inputs=mllama_image_inputs,
    collate_images=mllama_collate_images,
    dummy_image_inputs=mllama_dummy_image_inputs,
    collate_packed_images=mllama_collate_packed_images,
    token_keys=("input_ids", "attention_mask", "cross_attention_mask"),
)


# ----------------------------------------------------------------------------- LLaVA (Llama backbone)


def _llava_lora_targets(config: Any, preset: str) -> str:
    parts = [] if preset == LLM_FROZEN_PRESET else [rf"model\.language_model\.layers\.\d+\.({_ATTN}|{_MLP})"]
    if preset in ("all", LLM_FROZEN_PRESET):  # LLaVA has no cross-attention layers
        parts.append(r"model\.vision_tower\..*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)")
        parts.append(r"model\.multi_modal_projector\.linear_(1|2)")
    return "|".join(f"({p})" for p in parts)


def llava_image_inputs(processor: Any, images: list[list[Any]]) -> dict:
    out = processor.image_processor(images=images[0], return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "num_tiles": [1] * len(images[0])}


def _llava_tokens_per_image(processor: Any) -> int:
    size = processor.image_processor.crop_size
    height = size["height"] if isinstance(size, dict) else size.height
    width = size["width"] if isinstance(size, dict) else size.width
    n = (height // processor.patch_size) * (width // processor.patch_size)
    n += getattr(processor, "num_additional_image_tokens", 0)
    if getattr(processor, "vision_feature_select_strategy", "default") == "default":
        n -= 1
    return n


def llava_collate_images(items: list[dict], seq_len: int, image_token_id: int) -> dict:
    """LLaVA takes all images of the batch as one stack; the text's image tokens say where they go."""
    stacks = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
    return {"pixel_values": torch.cat(stacks)} if stacks else {}


def llava_dummy_image_inputs(batch: dict, config: Any) -> dict:
    """One blank image for ``llava_dummy_vision_pass``; no image token refers to it.

    LLaVA's forward needs one image token per patch for every image it is given, so the blank image
    cannot go through the forward: it is passed under ``DUMMY_PIXELS`` instead.

    Args:
        batch: a collated batch without ``pixel_values`` (unused: one image serves any batch).
        config: the model's ``LlavaConfig``.
    """
    vision = config.vision_config
    return {DUMMY_PIXELS: torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size)}


def llava_dummy_vision_pass(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Runs the vision tower and the projector on ``pixel_values`` as a real image would be run.

    Returns the sum of the image features: the loss adds it times zero, so the vision weights get
    zero gradients through the same layers (and, under FSDP, the same collectives) as a real image's.

    Args:
        model: the ``LlavaModel`` (``...ForConditionalGeneration.model``).
        pixel_values: from ``llava_dummy_image_inputs``.
    """
    config = model.config
    out = model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    return sum(f.float().sum() for f in out.pooler_output)


LLAVA = ModelFamily(
    name="llava",
    model_types=("llava",),
    layer_classes=("LlamaDecoderLayer", "CLIPEncoderLayer"),
    input_keys=("input_ids", "attention_mask", "labels", "position_ids", "pixel_values"),
    image_token="<image>",
    lora_targets=_llava_lora_targets,
    unquantized_modules=("model.vision_tower", "model.multi_modal_projector", "lm_head", "embed_tokens"),
    image_inputs=llava_image_inputs,
    collate_images=llava_collate_images,
    tokens_per_image=_llava_tokens_per_image,
    dummy_image_inputs=llava_dummy_image_inputs,
    dummy_vision_pass=llava_dummy_vision_pass,
    # LLaVA takes the batch's images as one stack in text order: packed rows need nothing more
    collate_packed_images=lambda rows, seq_len, image_id: llava_collate_images(
        [it for row in rows for it in row], seq_len, image_id
    ),
)

FAMILIES = (MLLAMA, LLAVA)


def family_for(config: Any) -> ModelFamily:
    """The family of a transformers config (``AutoConfig.from_pretrained(dir)``).

    Raises:
        ValueError: for an architecture cotune does not know, listing those it does.
    """
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model type '{model_type}' is not supported by cotune (supported: {known})")


def layer_modules(model: torch.nn.Module, family: ModelFamily) -> list[torch.nn.Module]:
    """The blocks to wrap one by one (FSDP units, activation-checkpointing units), in module order."""
    names = set(family.layer_classes)
    return [m for m in model.modules() if type(m).__name__ in names]


def text_layer_index(name: str) -> int | None:
    """The index of the language model's decoder layer a parameter ``name`` belongs to, or None."""
    found = re.match(r"model\.language_model\.layers\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def trained_in_full_finetune(config: Any, name: str, cfg: Any) -> bool:
    """Whether a full fine-tune (``use_peft`` off) trains parameter ``name``: every one, or the vision
    side (``freeze_LLM_only``), less the first ``num_freeze_layers`` decoder layers (``freeze_layers``)."""
    train = trained_with_llm_frozen(config, name) if cfg.freeze_LLM_only else True
    layer = text_layer_index(name)
    return train and not (cfg.freeze_layers and layer is not None and layer < cfg.num_freeze_layers)


def trained_with_llm_frozen(config: Any, name: str) -> bool:
    """llama-cookbook's ``freeze_LLM_only``: whether parameter ``name`` stays trainable. The vision
    tower, the projector and (Mllama) the language model's cross-attention layers, whole; the rest of
    the language model (its self-attention layers, embeddings, final norm, lm_head) is frozen."""
    if re.match(r"model\.(vision_model|vision_tower|multi_modal_projector)\.", name):
        return True
    text = getattr(config, "text_config", config)
    layer = text_layer_index(name)
    return layer is not None and layer in set(getattr(text, "cross_attention_layers", None) or ())
