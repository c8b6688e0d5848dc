"""``cotune plan``: the 11B's config (written by hand from transformers' MllamaConfig defaults, which are the
11B's) and the planner against memory measured on CPU for the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cotune.cli import main
from cotune.config import load_options
from cotune.plan import GIB, estimate, parse_memory

ELEVEN_B = Path(__file__).parent / "data" / "llama-3.2-11b-vision"


def plan_11b(*extra):
    cfg = load_options(
        "plan",
        overrides=[("model_name", str(ELEVEN_B)), ("batch_size_training", "2"), ("data.max_seq_len", "2048"),
                   ("gradient_checkpointing", "True"), *extra],
    ).options  # fmt: skip
    return estimate(cfg, parse_memory("16GB")), cfg


def test_the_hand_written_config_is_the_11b():
    from transformers import AutoConfig

    from cotune.plan import _meta_model

    model = _meta_model(AutoConfig.from_pretrained(str(ELEVEN_B)))
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 10.67


def test_qlora_fits_16gb_at_batch_2_by_2048_where_bf16_lora_does_not():
    qlora, _ = plan_11b(("quantization", "4bit"))
    bf16, _ = plan_11b()
    assert qlora.fits and not bf16.fits
    assert abs(qlora.parts["weights"] / GIB - 7.82) < 0.01  # NF4 + double quant text linears, the rest bf16
    assert abs(bf16.parts["weights"] / GIB - 19.87) < 0.01  # 10.67 B parameters in bf16
    assert qlora.parts["LoRA parameters"] == bf16.parts["LoRA parameters"]


def test_a_full_fine_tune_counts_fp32_master_weights_their_gradients_and_moments():
    from cotune.plan import advice

    lora, _ = plan_11b()
    full, cfg = plan_11b(("use_peft", "False"))
    pure, _ = plan_11b(("use_peft", "False"), ("pure_bf16", "True"))
    n = 10_670_143_547  # every parameter trains: the count test_the_hand_written_config_is_the_11b rounds
    assert abs(full.parts["weights"] - 4 * n) < 1e-3 * n and pure.parts["weights"] == lora.parts["weights"]
    assert (
        full.parts["gradients"] == full.parts["weights"]
        and full.parts["optimizer states"] == 2 * full.parts["gradients"]
    )
    assert (
        pure.parts["optimizer states"] == 2 * pure.parts["gradients"] == full.parts["optimizer states"] // 2
    )
    assert (
        full.parts["bf16 weight copies (autocast)"] == pure.parts["weights"]
        and "bf16 weight copies (autocast)" not in pure.parts
    )
    assert "vision tower (trained)" in full.parts and "vision tower (no grad)" in lora.parts
    assert advice(full, cfg)[0].startswith("--use_peft True") and not any(
        "4bit" in t for t in advice(full, cfg)
    )
    eight, _ = plan_11b(("use_peft", "False"), ("enable_fsdp", "True"), ("nproc_per_node", "8"))
    assert eight.parts["optimizer states"] == full.parts["optimizer states"] // 8


def test_the_command_prints_parts_advice_and_the_last_line(capsys):
    args = ["plan", "--model_name", str(ELEVEN_B), "--gpu_memory", "16GB", "--batch_size_training", "2",
            "--data.max_seq_len", "2048"]  # fmt: skip
    assert main(args) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("fits=no peak_gib=") and out[-1].endswith("gpu_gib=16.00")
    assert any("--gradient_checkpointing True" in line for line in out)
    assert any(line.strip().startswith("activations ") for line in out)
    assert main([*args, "--quantization", "4bit", "--gradient_checkpointing", "True"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("fits=yes")


def test_sharding_divides_weights_and_optimizer_states():
    one, _ = plan_11b()
    four, _ = plan_11b(("enable_fsdp", "True"), ("nproc_per_node", "4"))
    assert four.parts["optimizer states"] == one.parts["optimizer states"] // 4
    assert four.parts["weights"] < 0.3 * one.parts["weights"]


def test_memory_sizes():
    assert parse_memory("16GB") == 16 * GIB == parse_memory("16 GiB")
    assert parse_memory("512MB") == 512 * 2**20
    with pytest.raises(ValueError):
        parse_memory("lots")


def measured_step_bytes(model_dir, tmp_path, batch: int, seq: int, **options) -> int:
    """One training step's memory above the loaded model, measured in a fresh process (see plan_probe.py)."""
    config = tmp_path / "probe.yaml"
    config.write_text("\n".join([f"model_name: {model_dir}"] + [f"{k}: {v!r}" for k, v in options.items()]))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": os.pathsep.join(sys.path)}
    probe = Path(__file__).parent / "plan_probe.py"
    out = subprocess.run([sys.executable, str(probe), str(config), str(batch), str(seq)], env=env,
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    return int(out.stdout.split()[-1])


@pytest.fixture(scope="module")
def wide_mllama(tmp_path_factory):
    """A random Mllama whose text layers (512 wide, MLP 1536) outweigh its logits (32k vocabulary): the
    activation terms dominate the step, where in the tiny model the 128k-vocabulary loss chunk does."""
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(0)
    text = dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        cross_attention_layers=[2],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=4,
        image_size=32,
        patch_size=8,
        max_num_tiles=4,
        vision_output_dim=192,
        intermediate_layers_indices=[0, 1],
    )
    config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=31999)  # fmt: skip
    out = tmp_path_factory.mktemp("models") / "wide-mllama"
    MllamaForConditionalGeneration(config).save_pretrained(str(out))
    return out


SETTINGS = [
    ("tiny_mllama", 8, 2048, {}),
    ("tiny_mllama", 8, 2048, {"gradient_checkpointing": True}),
    ("tiny_mllama", 4, 1024, {"quantization": "4bit"}),
    ("wide_mllama", 4, 1024, {}),
    ("wide_mllama", 4, 1024, {"gradient_checkpointing": True}),
    ("wide_mllama", 4, 1024, {"quantization": "4bit"}),
    ("wide_mllama", 4, 1024, {"use_peft": False}),
    ("wide_mllama", 4, 1024, {"use_peft": False, "freeze_layers": True, "num_freeze_layers": 2}),
]


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="measures peak RSS through Linux /proc"
)
@pytest.mark.parametrize(
    "model,batch,seq,options",
    SETTINGS,
    ids=[
        "tiny-lora",
        "tiny-lora-checkpointed",
        "tiny-qlora",
        "wide-lora",
        "wide-lora-checkpointed",
        "wide-qlora",
        "wide-full",
        "wide-full-2-layers-frozen",
    ],
)
def test_the_plan_is_within_15_percent_of_a_measured_cpu_step(request, model, tmp_path, batch, seq, options):
    """Text-only batches (the probe's random tokens): no images, so the plan takes none."""
    if options.get("quantization"):
        pytest.importorskip("bitsandbytes")
    model_dir = request.getfixturevalue(model)
    measured = measured_step_bytes(model_dir, tmp_path, batch, seq, **options)
    overrides = [("model_name", str(model_dir)), ("batch_size_training", str(batch)),
                 ("data.max_seq_len", str(seq)), ("torch_dtype", "fp32")]  # fmt: skip
    overrides += [(k, str(v)) for k, v in options.items()]
    cfg = load_options("plan", overrides=overrides).options
    planned = estimate(cfg, 16 * GIB, device="cpu", images_per_sample=0).step_bytes
    print(
        f"{model} {batch}x{seq} {options}: planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    )
    assert abs(planned - measured) <= 0.15 * measured, (planned / 2**20, measured / 2**20)
