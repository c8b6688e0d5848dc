"""--use_peft False: a full fine-tune in one process, saved as a Hugging Face checkpoint that
transformers loads without cotune, resumed exactly; --freeze_LLM_only and --freeze_layers choose
the weights it trains, as llama-cookbook means them (with LoRA, --freeze_LLM_only puts the adapter on
those modules only)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cotune.config import ConfigError, load_config
from cotune.models import families
from cotune.models.families import text_layer_index
from cotune.models.load import add_lora, load_base_model
from cotune.options.train import LLM_FROZEN_PRESET
from cotune.train.loop import finetune


def full_config(tiny_mllama, shapes, out, *extra):
    return load_config(
        None,
        [("model_name", str(tiny_mllama)), ("dataset", str(shapes["train"])), ("test_file", str(shapes["test"])),
         ("data.image_root", str(shapes["images"].parent)), ("output_dir", str(out)), ("use_peft", "False"),
         ("batch_size_training", "4"), ("run_validation", "False"), ("progress", "False"),
         ("data.max_seq_len", "512"), ("lr", "1e-3"), *extra],
    )  # fmt: skip


def weights(directory) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by name, in one spelling whatever the file's (``vision_model.x``,
    ``language_model.layers.0.x``: transformers saves Mllama in its original key format)."""
    found = load_file(str(next(directory.glob("*.safetensors"))))
    return {
        k.removeprefix("model.").replace("language_model.model.", "language_model."): v
        for k, v in found.items()
    }


def test_full_fine_tune_saves_an_hf_checkpoint_and_resumes_exactly(tiny_mllama, shapes, tmp_path):
    straight = finetune(full_config(tiny_mllama, shapes, tmp_path / "a", ("max_train_step", "4")), log=print)
    assert straight.adapter_dir == tmp_path / "a/model" and straight.steps == 4
    base, tuned = weights(tiny_mllama), weights(straight.adapter_dir)
    assert set(tuned) >= {k for k in base if "layers" in k}
    changed = [k for k in base if k in tuned and not torch.equal(base[k], tuned[k])]
    assert any("language_model.layers.0.self_attn" in k for k in changed)
    assert any("vision_model" in k for k in changed)
    code = (
        "import sys, transformers; "
        f"m = transformers.AutoModelForImageTextToText.from_pretrained({str(straight.adapter_dir)!r}); "
        "assert not any(n.startswith('cotune') for n in sys.modules); print(type(m).__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0 and "Mllama" in done.stdout, done.stderr[-2000:]

    out = tmp_path / "b"
    finetune(
        full_config(tiny_mllama, shapes, out, ("max_train_step", "2"), ("save_every_steps", "2")), log=print
    )
    resumed = finetune(
        full_config(tiny_mllama, shapes, out, ("max_train_step", "4"), ("resume", "auto")), log=print
    )
    assert resumed.train_losses == pytest.approx(straight.train_losses, abs=1e-6)
    again = weights(resumed.adapter_dir)
    assert all(torch.allclose(again[k], tuned[k], atol=1e-6) for k in tuned)


def test_freeze_llm_only_trains_vision_projector_and_cross_attention(tiny_mllama, shapes, tmp_path):
    result = finetune(
        full_config(tiny_mllama, shapes, tmp_path, ("max_train_step", "2"), ("freeze_LLM_only", "True")),
        log=lambda s: None,
    )
    base, tuned = weights(tiny_mllama), weights(result.adapter_dir)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    cross = json.loads((tiny_mllama / "config.json").read_text())["text_config"]["cross_attention_layers"]
    for k in base:
        vision_side = k.startswith(("vision_model.", "multi_modal_projector."))
        in_cross = any(k.startswith(f"language_model.layers.{i}.") for i in cross)
        if not (vision_side or in_cross):
            assert k not in changed, k  # the language model is frozen
    assert any(k.startswith("vision_model.") for k in changed)
    assert any(k.startswith("multi_modal_projector.") for k in changed)
    assert any(k.startswith(f"language_model.layers.{cross[0]}.") for k in changed)


def test_freeze_layers_freezes_the_first_decoder_layers(tiny_mllama, shapes, tmp_path):
    result = finetune(
        full_config(
            tiny_mllama, shapes, tmp_path, ("max_train_step", "1"), ("freeze_layers", "True"),
            ("num_freeze_layers", "2"),
        ),
        log=lambda s: None,
    )  # fmt: skip
    base, tuned = weights(tiny_mllama), weights(result.adapter_dir)
    for k in base:
        if k.startswith(("language_model.layers.0.", "language_model.layers.1.")):
            assert torch.equal(base[k], tuned[k]), k
    assert not torch.equal(
        base["language_model.layers.2.mlp.up_proj.weight"],
        tuned["language_model.layers.2.mlp.up_proj.weight"],
    )


def test_freeze_layers_needs_a_full_fine_tune():
    with pytest.raises(ConfigError, match="--use_peft False"):
        load_config(None, [("freeze_layers", "True")])


def test_freeze_llm_only_with_lora_restricts_the_adapter_to_the_vision_side(tiny_mllama):
    cfg = load_config(None, [("freeze_LLM_only", "True")])
    assert cfg.lora_config.target_modules == LLM_FROZEN_PRESET == families.LLM_FROZEN_PRESET
    with pytest.raises(ConfigError, match="drop --lora_config.target_modules all"):
        load_config(None, [("freeze_LLM_only", "True"), ("lora_config.target_modules", "all")])
    model, family = load_base_model(tiny_mllama)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    cross = set(model.config.text_config.cross_attention_layers)
    peft = add_lora(model, family, cfg.lora_config)
    adapted = {
        n.split(".lora_A")[0].removeprefix("base_model.model.")
        for n, _ in peft.named_parameters()
        if "lora_A" in n
    }

    def vision_side(name):
        layer = text_layer_index(name)
        return name.startswith(("model.vision_model.", "model.multi_modal_projector")) or layer in cross

    assert adapted == {n for n in linears if vision_side(n) and n != "lm_head"}, adapted ^ linears
    assert any(n.startswith("model.vision_model.") for n in adapted)
    assert "model.multi_modal_projector" in adapted
    assert any(".cross_attn." in n for n in adapted)
    assert not any(text_layer_index(n) not in (None, *cross) for n in adapted)  # no self-attention layer


def test_anyprecision_with_pure_bf16_trains_bf16_weights_and_resumes_exactly(tiny_mllama, shapes, tmp_path):
    flags = [("pure_bf16", "True"), ("fsdp_config.optimizer", "anyprecision")]
    straight = finetune(
        full_config(tiny_mllama, shapes, tmp_path / "a", ("max_train_step", "4"), *flags), log=print
    )
    out = tmp_path / "b"
    finetune(full_config(tiny_mllama, shapes, out, ("max_train_step", "2"), *flags), log=lambda s: None)
    resumed = finetune(
        full_config(tiny_mllama, shapes, out, ("max_train_step", "4"), ("resume", "auto"), *flags), log=print
    )
    assert resumed.train_losses == pytest.approx(straight.train_losses, abs=1e-6)
    tuned, again = weights(straight.adapter_dir), weights(resumed.adapter_dir)
    assert all(v.dtype == torch.bfloat16 for v in tuned.values())
    assert all(torch.equal(again[k], tuned[k]) for k in tuned)
    base = weights(tiny_mllama)
    assert not torch.equal(
        base["language_model.layers.2.mlp.up_proj.weight"].bfloat16(),
        tuned["language_model.layers.2.mlp.up_proj.weight"],
    )


def _one_step(model_dir, shapes, out, *extra) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The trainable weights after one optimizer step at lr 1e-5 (full precision, gathered), and the log."""
    from cotune.train import distributed
    from cotune.train.loop import setup, train

    lines: list[str] = []
    cfg = full_config(
        model_dir, shapes, out, ("max_train_step", "1"), ("lr", "1e-5"), ("scheduler", "constant"),
        ("keep_last_checkpoints", "0"), ("save_metrics", "False"), *extra,
    )  # fmt: skip
    run = setup(cfg, log=lines.append)
    try:
        train(run)
        found = {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in run.model.named_parameters()
            if p.requires_grad
        }
    finally:
        distributed.cleanup()
    return found, lines


@pytest.mark.slow  # four one-step runs: ~25 s of CPU
def test_bf16_full_fine_tune_keeps_its_updates(shapes, tmp_path):
    """A full fine-tune of a bf16 base keeps fp32 master weights and computes in bf16, in one process
    and under FSDP: one AdamW step of lr 1e-5 moves the weights as the fp32 run does (within 5%
    relative, against 30% for bf16 weights updated in place, the cookbook's --pure_bf16)."""
    from cotune.demo.tiny import build_tiny_mllama

    base = build_tiny_mllama(tmp_path / "bf16-base", seed=0, dtype=torch.bfloat16)
    start = {n: p.detach().float() for n, p in load_base_model(base)[0].named_parameters()}
    fp32, _ = _one_step(base, shapes, tmp_path / "fp32", ("torch_dtype", "fp32"), ("save_model", "False"))
    assert set(fp32) == set(start)

    def compare(got: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        """(fraction of weights changed, fraction whose bf16 value changed, relative update error)."""
        changed = in_bf16 = total = 0
        err = norm = 0.0
        for n, before in start.items():
            after, ref = got[n].float(), fp32[n]
            changed += int((after != before).sum())
            in_bf16 += int((after.bfloat16() != before.bfloat16()).sum())
            total += before.numel()
            err += float(((after - before) - (ref - before)).pow(2).sum())
            norm += float((ref - before).pow(2).sum())
        return changed / total, in_bf16 / total, (err / norm) ** 0.5

    reference = compare(fp32)
    master, lines = _one_step(base, shapes, tmp_path / "master", ("torch_dtype", "bf16"))
    assert any("trainable weights kept in fp32 (master weights)" in s for s in lines), lines
    assert all(p.dtype == torch.float32 for p in master.values())
    sharded, lines = _one_step(
        base,
        shapes,
        tmp_path / "fsdp",
        ("torch_dtype", "bf16"),
        ("enable_fsdp", "True"),
        ("save_model", "False"),
    )
    assert any("mixed precision bfloat16 compute, fp32 reduction" in s for s in lines), lines
    in_place, _ = _one_step(base, shapes, tmp_path / "pure", ("pure_bf16", "True"), ("save_model", "False"))
    figures = {
        "fp32": reference,
        "master": compare(master),
        "fsdp": compare(sharded),
        "bf16": compare(in_place),
    }
    print("\n(changed, bf16 value changed, relative update error):", figures)
    for got in (figures["master"], figures["fsdp"]):
        assert abs(got[0] - reference[0]) <= 0.01 and abs(got[1] - reference[1]) <= 0.01
        assert got[2] <= 0.05
    assert figures["bf16"][2] >= 0.2  # what the master weights prevent
    saved = weights(tmp_path / "master" / "model")  # the Hugging Face checkpoint is in the base's dtype
    assert all(v.dtype == torch.bfloat16 for v in saved.values())
    keys = {n: n.removeprefix("model.").replace("language_model.model.", "language_model.") for n in master}
    assert all(torch.equal(saved[k], master[n].bfloat16()) for n, k in keys.items() if k in saved)
    assert sum(k in saved for k in keys.values()) >= len(keys) - 1  # lm_head: tied to the embeddings
