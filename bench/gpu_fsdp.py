"""One-GPU FSDP2 check: LoRA on a random Mllama with Llama-3.2-11B-Vision's real shapes.

``bench/gpu.sh`` runs this file. It builds the model directly on the GPU in bf16 (random weights,
nothing downloaded), adds cotune's LoRA (r=16 on the language model and its cross-attention layers,
fp32), shards it with cotune's FSDP2 wrap policy on one rank (bf16 compute, fp32 gradient
reduction, activation checkpointing per layer) and trains a few steps on random batches of one
4-tile 560-px image and ``--seq-len`` text tokens, half of them labelled, with cotune's chunked loss
and the loop's token-weighted loss convention. It prints tokens/s, peak GPU memory and the model
FLOPs utilisation (MFU).

Model FLOPs per step (LoRA matmuls, ~0.1% of the total, are left out; causal attention is counted
in full, as is usual for MFU):

* text matmuls: 4 x params x text tokens (forward 2, backward 2: input gradients only, the weights
  are frozen); ``lm_head``: 4 x params x labelled tokens (cotune's loss skips the other positions);
* vision tower, projector and cross-attention k/v projections: 2 x params x image tokens (forward
  only: nothing before them needs a gradient);
* attention: 4 x seq x keys x width per layer forward; text self- and cross-attention x 3
  (forward + backward), vision attention x 1.

``--tiny`` runs the same code on a small config, on CPU if there is no GPU (fp32, gloo): a smoke
test of everything but the GPU (it is what ``bench/gpu.sh --dry-run`` runs).

Usage:
    python bench/gpu_fsdp.py [--text-layers 40] [--vision-layers 32] [--global-layers 8]
        [--seq-len 2048] [--batch-size 2] [--steps 6] [--warmup-steps 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from cotune.config import FsdpConfig, LoraConfig  # noqa: E402
from cotune.models.families import MLLAMA, layer_modules  # noqa: E402
from cotune.models.load import add_lora, trainable_parameters  # noqa: E402
from cotune.train import distributed as D  # noqa: E402
from cotune.train.loss import ChunkedLossModel, inner_model  # noqa: E402

# Llama-3.2-11B-Vision(-Instruct) config.json, the fields that set shapes
TEXT_11B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_hidden_layers=40,
    cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)
VISION_11B = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_global_layers=8,
    attention_heads=16,
    image_size=560,
    patch_size=14,
    max_num_tiles=4,
    vision_output_dim=7680,
    intermediate_layers_indices=[3, 7, 15, 23, 30],
    norm_eps=1e-5,
)
IMAGE_TOKEN_ID = 128256
FULL_DEFAULTS = dict(
    text_layers=40, vision_layers=32, global_layers=8, seq_len=2048, batch_size=2, steps=6, warmup_steps=2
)
TINY_DEFAULTS = dict(
    text_layers=4, vision_layers=2, global_layers=1, seq_len=64, batch_size=2, steps=2, warmup_steps=1
)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def build_config(args: argparse.Namespace):
    """The 11B shapes with ``--text-layers`` text layers, one in five of them cross-attention as in 11B."""
    from transformers import MllamaConfig, MllamaTextConfig, MllamaVisionConfig

    text, vision = dict(TEXT_11B), dict(VISION_11B)
    if args.tiny:
        text.update(vocab_size=4096, hidden_size=64, intermediate_size=128, num_attention_heads=4)
        text.update(num_key_value_heads=2, rope_scaling=None)
        vision.update(hidden_size=32, intermediate_size=64, attention_heads=4, image_size=28)
    n_text = args.text_layers
    n_cross = max(1, round(n_text / 5))
    text["num_hidden_layers"] = n_text
    # spread as in 11B, where 40 layers give 3, 8, ..., 38
    text["cross_attention_layers"] = [max(0, (k + 1) * n_text // n_cross - 2) for k in range(n_cross)]
    vision["num_hidden_layers"] = args.vision_layers
    vision["num_global_layers"] = args.global_layers
    picked = {min(i, args.vision_layers - 1) for i in VISION_11B["intermediate_layers_indices"]}
    vision["intermediate_layers_indices"] = sorted(picked)
    vision["vision_output_dim"] = vision["hidden_size"] * (len(picked) + 1)  # final + intermediate features
    return MllamaConfig(
        vision_config=MllamaVisionConfig(**vision),
        text_config=MllamaTextConfig(
            **text,
            bos_token_id=128000 % text["vocab_size"],
            eos_token_id=128009 % text["vocab_size"],
            pad_token_id=128004 % text["vocab_size"],
        ),
        image_token_index=IMAGE_TOKEN_ID if not args.tiny else text["vocab_size"],
    )


def build_model(config, device: torch.device, dtype: torch.dtype):
    """Random weights created on ``device`` directly (an 11B model in seconds, not minutes on CPU)."""
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = MllamaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    return model


def random_batch(config, batch: int, seq_len: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One image (all tiles used) at position 1, then text; labels on the second half (the "answer")."""
    vision = config.vision_config
    vocab = config.text_config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, min(vocab, 128000) - 1, (batch, seq_len), generator=g)
    ids[:, 0], ids[:, 1] = 128000 % vocab, config.image_token_index
    labels = ids.clone()
    labels[:, : seq_len // 2] = -100
    tiles, size = vision.max_num_tiles, vision.image_size
    cross = torch.zeros(batch, seq_len, 1, tiles, dtype=torch.long)
    cross[:, 1:] = 1
    out = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        labels=labels,
        pixel_values=torch.randn(batch, 1, tiles, vision.num_channels, size, size, generator=g),
        aspect_ratio_ids=torch.full((batch, 1), 6, dtype=torch.long),  # 6: the 2x2 layout, 4 tiles
        aspect_ratio_mask=torch.ones(batch, 1, tiles, dtype=torch.long),
        cross_attention_mask=cross,
    )
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in out.items()}


def model_flops(model, config, batch: int, seq_len: int) -> dict[str, float]:
    """Model FLOPs of one training step (see the module docstring for the counting rules)."""
    core = inner_model(model)
    text_p = head_p = xkv_p = vision_p = 0
    for name, module in core.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lora_" in name:
            continue
        n = module.weight.numel()
        if name.endswith("lm_head"):
            head_p += n
        elif "language_model" in name and ("cross_attn.k_proj" in name or "cross_attn.v_proj" in name):
            xkv_p += n
        elif "language_model" in name:
            text_p += n
        else:  # vision tower, multi-modal projector
            vision_p += n
    vision = config.vision_config
    text = config.text_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    patches += (8 - patches % 8) % 8  # Mllama pads each tile's patch sequence to a multiple of 8
    image_tokens = vision.max_num_tiles * patches  # one image per sample, all tiles
    width = text.num_attention_heads * (text.hidden_size // text.num_attention_heads)
    n_cross = len(text.cross_attention_layers)
    n_self = text.num_hidden_layers - n_cross
    n_vis = vision.num_hidden_layers + vision.num_global_layers
    tokens, labels = batch * seq_len, batch * (seq_len // 2)
    terms = {
        "text matmuls": 4 * text_p * tokens,
        "lm_head": 4 * head_p * labels,
        "vision + projector + cross k/v": 2 * (vision_p + xkv_p) * batch * image_tokens,
        "self-attention": 3 * 4 * n_self * batch * seq_len * seq_len * width,
        "cross-attention": 3 * 4 * n_cross * batch * seq_len * image_tokens * width,
        "vision attention": 4 * n_vis * batch * image_tokens * image_tokens * vision.hidden_size,
    }
    terms["total"] = sum(terms.values())
    return terms


def count_only(args: argparse.Namespace) -> dict:
    """Parameters and model FLOPs per step of the configured shapes, without allocating weights."""
    config = build_config(args)
    model = build_model(config, torch.device("meta"), torch.bfloat16)
    lora_cfg = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="language+cross_attention"
    )
    peft_model = add_lora(model, MLLAMA, lora_cfg)
    lora, total = trainable_parameters(peft_model)
    flops = model_flops(peft_model, config, args.batch_size, args.seq_len)
    units = len(layer_modules(peft_model, MLLAMA))
    print(f"{total:,} parameters ({lora:,} LoRA), {units} FSDP layer units + root")
    for k, v in flops.items():
        print(f"  {k}: {v / 1e12:.1f} TFLOP per step of {args.batch_size} x {args.seq_len} tokens")
    return {"parameters": total, "lora_parameters": lora, "units": units, "flops": flops}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-layers", type=int, help="text layers (11B: 40, 8 of them cross-attention)")
    p.add_argument("--vision-layers", type=int, help="local vision encoder layers (11B: 32)")
    p.add_argument("--global-layers", type=int, help="global vision encoder layers (11B: 8)")
    p.add_argument("--seq-len", type=int, help="text tokens per sample (default 2048)")
    p.add_argument("--batch-size", type=int, help="samples per step (default 2)")
    p.add_argument("--steps", type=int, help="timed steps (default 6)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default 2)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--no-activation-checkpointing", action="store_true")
    p.add_argument(
        "--peak-tflops", type=float, default=0.0, help="the card's dense bf16 peak (default: by name)"
    )
    p.add_argument("--tiny", action="store_true", help="small shapes; runs on CPU (smoke test)")
    p.add_argument(
        "--count-only",
        action="store_true",
        help="build on the meta device; print parameters and FLOPs, no training",
    )
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)
    for key, value in (TINY_DEFAULTS if args.tiny else FULL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.count_only:
        return count_only(args)
    t0 = time.perf_counter()
    info = D.init_distributed(fsdp=True)  # one rank: an in-memory process group, no launcher
    gpu = info.device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    config = build_config(args)
    model = build_model(config, info.device, dtype)
    peft_model = add_lora(
        model,
        MLLAMA,
        LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            target_modules="language+cross_attention",
        ),
    )
    peft_model.train()
    lora, total = trainable_parameters(peft_model)
    flops = model_flops(peft_model, config, args.batch_size, args.seq_len)
    loss_model = ChunkedLossModel(peft_model)
    fsdp = FsdpConfig(fsdp_activation_checkpointing=not args.no_activation_checkpointing)
    D.wrap_fsdp(loss_model, layer_modules(peft_model, MLLAMA), fsdp, info)
    optimizer = torch.optim.AdamW([q for q in peft_model.parameters() if q.requires_grad], lr=1e-5)
    batch = random_batch(config, args.batch_size, args.seq_len, info.device, dtype)
    build_s = time.perf_counter() - t0
    print(
        f"built {total / 1e9:.2f}B parameters ({lora / 1e6:.1f}M LoRA) on {info.device} in {build_s:.0f} s",
        flush=True,
    )

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup_steps + args.steps):
        sync()
        start = time.perf_counter()
        with autocast:
            loss_sum, n = loss_model(**batch)
        (loss_sum / n).backward()  # the loop's convention: mean over the step's label tokens
        D.clip_grad_norm([q for q in peft_model.parameters() if q.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup_steps:
            times.append(time.perf_counter() - start)
        losses.append(float(loss_sum.detach() / n))
        print(f"step {step + 1}: loss {losses[-1]:.4f}, {time.perf_counter() - start:.2f} s", flush=True)

    sec = sum(times) / len(times)
    name = torch.cuda.get_device_name(info.device) if gpu else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    result = {
        "device": name,
        "text_layers": config.text_config.num_hidden_layers,
        "cross_attention_layers": len(config.text_config.cross_attention_layers),
        "vision_layers": f"{config.vision_config.num_hidden_layers}+{config.vision_config.num_global_layers}",
        "parameters": total,
        "lora_parameters": lora,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "activation_checkpointing": not args.no_activation_checkpointing,
        "seconds_per_step": round(sec, 4),
        "tokens_per_s": round(args.batch_size * args.seq_len / sec, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(info.device) / 2**30, 2) if gpu else None,
        "model_tflops_per_step": round(flops["total"] / 1e12, 3),
        "achieved_tflops": round(flops["total"] / sec / 1e12, 2),
        "mfu": round(flops["total"] / sec / (peak * 1e12), 4) if peak else None,
        "flops_terms": {k: round(v / 1e12, 3) for k, v in flops.items()},
        "losses": [round(v, 4) for v in losses],
        "build_seconds": round(build_s, 1),
    }
    mfu = (
        f"{100 * result['mfu']:.1f}% of {peak:.0f} TFLOP/s"
        if result["mfu"] is not None
        else "n/a (no GPU peak)"
    )
    print(
        f"RESULT device={name} layers={result['text_layers']} text ({result['cross_attention_layers']} cross) "
        f"+ {result['vision_layers']} vision, batch {args.batch_size} x {args.seq_len} tokens: "
        f"tokens/s={result['tokens_per_s']} peak_memory_GiB={result['peak_memory_gib']} "
        f"achieved_TFLOP/s={result['achieved_tflops']} MFU={mfu}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    D.cleanup()
    return result


if __name__ == "__main__":
    main()
