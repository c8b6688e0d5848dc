"""``cotune plan``: the memory one GPU needs for a training run, from the checkpoint's config.json alone.

The model is built on the meta device from its config (no weights are read), so parameter counts are
exact, and the family's LoRA targets and unquantized modules are resolved as training resolves them.
What the step holds on top of the weights is counted term by term, as cotune's step computes it:

- LoRA parameters (fp32), their gradients (fp32) and AdamW's two moments (fp32); under FSDP all of
  them and the base weights are split over the processes, and one layer is gathered at a time.
- A full fine-tune (``use_peft`` off) instead trains the base's own weights (all, or the vision side
  with ``freeze_LLM_only``, less ``num_freeze_layers``): each with a gradient and two AdamW moments in
  its dtype; over a bf16 base the trained weights are fp32 master weights (4 bytes each, their
  gradients and moments too) and one process's autocast holds a bf16 copy of them through the step.
- Activations saved for backward, per token and per text layer. A layer with LoRA on its seven
  linears saves about ``13 H + 5 I`` values (with LoRA dropout: the normed input's three dropout
  copies, q/k/v after RoPE and GQA expansion, the attention output and the o_proj input, its dropout
  copy, gate/up/silu/product and the down_proj input's dropout copy) plus one-byte dropout masks; without
  dropout ``9 H + 4 I``. A frozen cross-attention layer saves about ``4 H + 3 I`` per token and, per
  sample, the image tokens' keys and values. With activation checkpointing each layer keeps only its
  input (``H`` per token), and one layer is recomputed at a time.
- The vision tower runs without gradients (frozen, no LoRA): only one layer's working set is live.
- The loss never holds the full logits (``train/loss.py``): one buffer of ``chunk x vocab`` fp32
  (plus a bf16 copy of it in bf16), and the fp32 gradient of the final hidden states.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from cotune.models.families import family_for, trained_in_full_finetune, trained_with_llm_frozen
from cotune.models.load import DTYPES, check_model_dir
from cotune.train.step import keeps_master_weights

GIB = 2**30
CHUNK = 512  # chunked_cross_entropy's default chunk_size
CUDA_CONTEXT = int(0.75 * GIB)  # CUDA context, cuBLAS workspace and allocator fragmentation (typical)


@dataclasses.dataclass
class Plan:
    """Bytes per GPU, by part, and the verdict."""

    parts: dict[str, int]
    gpu_bytes: int
    notes: list[str]
    setting: str

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    @property
    def step_bytes(self) -> int:
        """What a training step adds to the loaded model (what a CPU measurement of one step sees)."""
        return self.peak - self.parts["weights"] - self.parts.get("CUDA context", 0)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_bytes


def parse_memory(text: str) -> int:
    """'16GB', '24 GiB', '80g', '512MB' -> bytes (GB read as GiB, as GPU makers' sizes usually are)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([gGmMtT])?i?[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"gpu_memory '{text}' is not a size such as 16GB")
    unit = {"g": GIB, "m": 2**20, "t": 2**40, None: GIB}[m.group(2).lower() if m.group(2) else None]
    return int(float(m.group(1)) * unit)


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """transformers' rule for ``llm_int8_skip_modules``: a prefix, or the name's last parts."""
    return any(name == k or name.startswith(k + ".") or name.endswith("." + k) for k in skip)


def _meta_model(config: Any) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def weight_bytes(
    model: torch.nn.Module, family: Any, quantization: str, qopts: Any, dtype_bytes: int
) -> dict:
    """Bytes of the base weights: quantized linears and the rest, with the largest quantized linear."""
    skip = family.unquantized_modules
    quantized = other = largest = 0
    counted: set[str] = set()
    for name, module in model.named_modules():
        if quantization and isinstance(module, torch.nn.Linear) and not _skipped(name, skip):
            n = module.weight.numel()
            largest = max(largest, n)
            if quantization == "4bit":  # 4 bits + one absmax per 64 weights (uint8 + fp32 per 256 blocks
                per = 0.5 + (1 / 64 + 4 / (64 * 256) if qopts.use_double_quant else 4 / 64)  # if doubled)
                quantized += int(n * per)
            else:  # int8 + an fp32 scale per row
                quantized += n + 4 * module.weight.shape[0]
            counted.add(name + ".weight")
    for name, p in model.named_parameters():
        if name not in counted:
            other += p.numel() * dtype_bytes
    return {"quantized": quantized, "other": other, "largest_quantized": largest}


def lora_parameters(model: torch.nn.Module, family: Any, lora: Any) -> int:
    """LoRA parameters PEFT would add: r x (in + out) for each targeted linear."""
    targets = family.resolve_lora_targets(model.config, lora.target_modules)
    n = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        hit = re.fullmatch(targets, name) if isinstance(targets, str) else name.split(".")[-1] in targets
        if hit:
            n += lora.r * (module.in_features + module.out_features)
    return n


def image_tokens(vision: Any) -> int:
    """Tokens one image becomes in the vision tower: tiles x (patches + class token, padded to 8)."""
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    return vision.max_num_tiles * (patches + (-patches) % 8)


def estimate(cfg: Any, gpu_bytes: int, device: str = "cuda", images_per_sample: int = 1) -> Plan:
    """The memory of one GPU for ``cfg`` (a train or plan configuration).

    Args:
        cfg: ``cotune train``'s options (``model_name`` must hold a config.json).
        gpu_bytes: the GPU's memory.
        device: 'cuda' (torch_dtype auto = bf16, bf16 autocast, a CUDA context) or 'cpu' (fp32).
        images_per_sample: images each sample carries (vision tokens, cross-attention keys and values).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(check_model_dir(cfg.model_name)))
    family = family_for(config)
    model = _meta_model(config)
    base, act = _dtypes(cfg, device)
    world = max(1, cfg.nproc_per_node) if cfg.enable_fsdp else 1
    seq = cfg.context_length if cfg.batching_strategy == "packing" else cfg.data.max_seq_len
    if cfg.use_peft:
        parts = _weight_parts(model, family, cfg, base.itemsize, act.itemsize, world)
    else:
        parts = _full_weight_parts(model, cfg, base, world, device, images_per_sample > 0)
    img = image_tokens(config.vision_config) * images_per_sample if hasattr(config, "vision_config") else 0
    vision_trained = not cfg.use_peft and any(
        trained_in_full_finetune(config, n, cfg) for n, _ in model.named_parameters() if "vision" in n
    )
    activations, notes = _activation_parts(
        cfg, config, cfg.batch_size_training * seq, act.itemsize, img, vision_trained
    )
    parts.update(activations)
    if device == "cuda":
        parts["CUDA context"] = CUDA_CONTEXT
    q = cfg.quantization or "none"
    trains = (
        f"LoRA r={cfg.lora_config.r}"
        if cfg.use_peft
        else f"full fine-tune of {full_finetune_parameters(model, cfg) / 1e9:.2f} B parameters"
    )
    setting = (
        f"{family.name}, base {str(base).removeprefix('torch.')}, quantization {q}, compute "
        f"{str(act).removeprefix('torch.')}, batch {cfg.batch_size_training} x {seq} tokens, {trains}, "
        f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, {world} process(es)"
    )
    return Plan(parts, gpu_bytes, notes, setting)


def _dtypes(cfg: Any, device: str) -> tuple[torch.dtype, torch.dtype]:
    """The weights' dtype and the compute (activation) dtype of ``cfg`` on ``device``."""
    auto = torch.bfloat16 if device == "cuda" else torch.float32
    base = (
        torch.bfloat16 if cfg.pure_bf16 else (auto if cfg.torch_dtype == "auto" else DTYPES[cfg.torch_dtype])
    )
    act = torch.bfloat16 if (device == "cuda" and cfg.mixed_precision and not cfg.use_fp16) else base
    if device == "cuda" and cfg.mixed_precision and cfg.use_fp16:
        act = torch.float16
    return base, act


def full_finetune_parameters(model: torch.nn.Module, cfg: Any, images: bool = True) -> int:
    """Parameters a full fine-tune trains (``families.trained_in_full_finetune``); with ``images``
    False, those that get a gradient from text-only batches (the vision side and the cross-attention
    layers are skipped, so they get neither a gradient nor AdamW moments)."""
    config = model.config
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if trained_in_full_finetune(config, n, cfg) and (images or not trained_with_llm_frozen(config, n))
    )


def _full_weight_parts(
    model, cfg: Any, base: torch.dtype, world: int, device: str, images: bool
) -> dict[str, int]:
    """A full fine-tune's weights, gradients and AdamW moments (sharded over ``world``). Over a bf16
    base the trained weights are fp32 master weights (``step.keeps_master_weights``), so are their
    gradients and moments, and one process's bf16 autocast keeps a bf16 copy of each for the step."""
    layers = getattr(model.config, "text_config", model.config).num_hidden_layers
    total, trained = sum(p.numel() for p in model.parameters()), full_finetune_parameters(model, cfg)
    stepped = full_finetune_parameters(model, cfg, images)  # those with a gradient and moments
    wb, master = base.itemsize, keeps_master_weights(cfg, base)
    tb = 4 if master else wb  # bytes of a trained weight, its gradient and each AdamW moment
    parts = {"weights": ((total - trained) * wb + trained * tb) // world}
    if world > 1:
        parts["weights"] += 2 * total * wb // max(1, layers)  # one gathered layer (and the next, prefetched)
    elif master and device == "cuda":
        parts["bf16 weight copies (autocast)"] = trained * wb
    parts["gradients"] = stepped * tb // world
    parts["optimizer states"] = 2 * stepped * tb // world
    return parts


def _weight_parts(model, family, cfg: Any, wb: int, b: int, world: int) -> dict[str, int]:
    """Weights (sharded over ``world``), the dequantized copy, LoRA parameters, gradients, optimizer."""
    layers = getattr(model.config, "text_config", model.config).num_hidden_layers
    w = weight_bytes(model, family, cfg.quantization, cfg.quantization_config, wb)
    n_lora = lora_parameters(model, family, cfg.lora_config)
    parts: dict[str, int] = {}
    parts["weights"] = (w["quantized"] + w["other"]) // world
    if world > 1:
        parts["weights"] += 2 * w["other"] // max(1, layers)  # one gathered layer (and the next, prefetched)
    if cfg.quantization:  # the matmul's dequantized copy of one layer's weight
        parts["dequantized weight"] = w["largest_quantized"] * b
    parts["LoRA parameters"] = 4 * n_lora // world
    parts["LoRA gradients"] = 4 * n_lora // world
    parts["optimizer states"] = 8 * n_lora // world
    return parts


def _vision_parts(cfg: Any, config: Any, img: int, b: int, trained: bool) -> dict[str, int]:
    """The vision tower's activations for ``img`` tokens an image, ``b`` bytes a value. Frozen it runs
    without gradients (one layer's working set and the outputs); trained (a full fine-tune) each of
    its layers saves about ``9 H + 4 I`` values per token, as a text layer does (estimated, not
    measured: the CPU check runs text-only batches), or only its input with checkpointing."""
    v = config.vision_config
    text_hidden = getattr(config, "text_config", config).hidden_size
    tokens = cfg.batch_size_training * img
    outputs = tokens * (getattr(v, "vision_output_dim", v.hidden_size) + text_hidden) * b
    if not trained:
        return {"vision tower (no grad)": tokens * (4 * v.hidden_size + v.intermediate_size) * b + outputs}
    layers = v.num_hidden_layers + getattr(v, "num_global_layers", 0)
    per_layer = v.hidden_size if cfg.gradient_checkpointing else 9 * v.hidden_size + 4 * v.intermediate_size
    return {"vision tower (trained)": tokens * layers * per_layer * b + outputs}


def _activation_parts(
    cfg: Any, config: Any, tokens: int, b: int, img: int, vision_trained: bool = False
) -> tuple[dict[str, int], list[str]]:
    """Saved activations, the vision tower's, and the larger of the loss's forward and backward peaks
    (``tokens`` per step, ``b`` bytes per value, ``img`` image tokens per sample); and the notes."""
    text = getattr(config, "text_config", config)
    hidden, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    cross = set(getattr(text, "cross_attention_layers", []) or [])
    dropout = cfg.use_peft and cfg.lora_config.lora_dropout > 0  # a full fine-tune has no LoRA dropout
    lora_layer = (
        b * (13 * hidden + 5 * inter) + (6 * hidden + inter) if dropout else b * (9 * hidden + 4 * inter)
    )
    cross_layer = b * (4 * hidden + 3 * inter)
    cross_kv = 2 * hidden * img * b * cfg.batch_size_training  # per cross layer
    n_cross = len(cross) if img else 0  # without images the cross-attention layers are skipped
    full = tokens * ((layers - len(cross)) * lora_layer + n_cross * cross_layer) + n_cross * cross_kv
    kept = tokens * hidden * b * layers + cross_kv  # checkpointing: each layer's input, the image keys/values
    parts = {
        "activations (checkpointed)" if cfg.gradient_checkpointing else "activations": kept
        if cfg.gradient_checkpointing
        else full
    }
    if img:
        parts.update(_vision_parts(cfg, config, img, b, vision_trained))
    # The forward ends in the loss: its chunk buffer (freed before backward) on top of the saved activations,
    # with the last layer's and the loss's temporaries (about 14 H values per token, measured on CPU).
    # Backward instead holds one recomputed layer (with checkpointing) and that layer's gradients.
    forward = min(CHUNK, tokens) * text.vocab_size * (4 + (2 if b == 2 else 0)) + tokens * 14 * hidden * b
    backward = tokens * lora_layer * (2 if cfg.gradient_checkpointing else 1)
    parts["hidden-state gradient (loss)"] = tokens * hidden * 4
    if forward >= backward:
        parts["logits (chunked, forward)"] = forward
    else:
        parts["recomputed layer (backward)"] = backward
    notes = [
        f"activations without checkpointing would be {full / GIB:.2f} GiB, with it "
        f"{kept / GIB:.2f} GiB (saved for backward)",
        f"logits chunk + forward temporaries {forward / GIB:.2f} GiB; backward working set {backward / GIB:.2f} GiB "
        "(the larger counts)",
    ]
    return parts, notes


def advice(plan: Plan, cfg: Any) -> list[str]:
    """Which knob to turn when the plan does not fit, biggest saving first."""
    if plan.fits:
        return []
    tips = []
    if not cfg.gradient_checkpointing and "activations" in plan.parts:
        tips.append("--gradient_checkpointing True (activations: each layer keeps only its input)")
    if not cfg.use_peft:
        tips.append("--use_peft True (LoRA: no gradients or AdamW moments for the base's weights)")
    elif not cfg.quantization:
        tips.append(
            "--quantization 4bit (QLoRA: the language model's linears in NF4, about a quarter of bf16)"
        )
    if cfg.batch_size_training > 1:
        tips.append(
            f"--batch_size_training {max(1, cfg.batch_size_training // 2)} with "
            f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps * 2} (same samples per step)"
        )
    tips.append("--data.max_seq_len lower (activations and logits grow with tokens)")
    if not cfg.enable_fsdp and cfg.quantization != "8bit":  # an 8-bit base is not sharded
        tips.append("--enable_fsdp --nproc_per_node N (weights and optimizer states split over N GPUs)")
    return tips


def report(plan: Plan, cfg: Any) -> str:
    """The lines ``cotune plan`` prints; the last is ``fits=yes|no peak_gib=X gpu_gib=Y``."""
    lines = [f"plan: {plan.setting}"]
    for name, n in plan.parts.items():
        lines.append(f"  {name:<32}{n / GIB:8.2f} GiB")
    lines.append(f"  {'peak':<32}{plan.peak / GIB:8.2f} GiB of {plan.gpu_bytes / GIB:.2f} GiB")
    lines.append(f"  {'headroom':<32}{(plan.gpu_bytes - plan.peak) / GIB:8.2f} GiB")
    lines += [f"note: {n}" for n in plan.notes]
    tips = advice(plan, cfg)
    if tips:
        lines.append("does not fit; turn, in this order:")
        lines += [f"  {t}" for t in tips]
    lines.append(
        f"fits={'yes' if plan.fits else 'no'} peak_gib={plan.peak / GIB:.2f} gpu_gib={plan.gpu_bytes / GIB:.2f}"
    )
    return "\n".join(lines)


def run_plan_command(cfg: Any) -> int:
    """``cotune plan``: prints the report; exit 0 when it fits, 1 when it does not."""
    plan = estimate(cfg, parse_memory(cfg.gpu_memory), device=cfg.plan_device)
    print(report(plan, cfg))
    return 0 if plan.fits else 1
