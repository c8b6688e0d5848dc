"""QLoRA: 4-bit and 8-bit bases with bitsandbytes, the family's unquantized modules, training and portability."""

from __future__ import annotations

import pytest
import torch

from cotune.config import ConfigError, load_config
from cotune.models.load import add_lora, load_base_model
from cotune.models.quant import keep_training_kernels, quantized_layer_counts
from cotune.options.quant import QuantizationConfig
from cotune.train.loop import finetune
from test_batching_loss import collate, dataset
from test_train_e2e import few_records

bnb = pytest.importorskip("bitsandbytes")


def layer_types(model, prefix: str) -> set[str]:
    return {
        type(m).__name__
        for n, m in model.named_modules()
        if n.startswith(prefix) and isinstance(m, torch.nn.Linear)
    }


def load_4bit(model_dir, **options):
    return load_base_model(model_dir, quantization="4bit", quantization_config=QuantizationConfig(**options))


def test_the_family_keeps_vision_projector_and_head_unquantized(tiny_mllama):
    model, family = load_4bit(tiny_mllama)
    assert layer_types(model, "model.language_model") == {"Linear4bit"}
    assert layer_types(model, "model.vision_model") == {"Linear"}  # the loaded layers, not the config
    assert layer_types(model, "model.multi_modal_projector") == {"Linear"}
    assert layer_types(model, "lm_head") == {"Linear"}
    assert type(model.model.language_model.embed_tokens) is torch.nn.Embedding
    w = next(m for m in model.modules() if type(m).__name__ == "Linear4bit").weight
    assert w.quant_state.quant_type == "nf4" and w.quant_state.nested  # QLoRA defaults: nf4, double quant
    model8, _ = load_base_model(tiny_mllama, quantization="8bit")
    assert layer_types(model8, "model.language_model") == {"Linear8bitLt"}
    assert layer_types(model8, "model.vision_model") == {"Linear"}


def test_a_short_skip_name_leaves_the_vision_tower_quantized(tiny_mllama):
    """Why the family writes ``model.vision_model``: transformers matches a prefix or the last parts of a name."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["vision_model", "lm_head"])
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_mllama), quantization_config=q)
    assert layer_types(model, "model.vision_model") == {"Linear4bit"}


def test_a_sharded_8bit_base_is_refused_with_the_reason(tiny_mllama, tmp_path):
    """Sharded 4-bit QLoRA is tested in test_sharded_qlora."""
    cfg = load_config(None, [("model_name", str(tiny_mllama)), ("quantization", "8bit"), ("enable_fsdp", "True"),
                             ("output_dir", str(tmp_path))])  # fmt: skip
    with pytest.raises(ConfigError, match="8-bit base cannot be sharded"):
        finetune(cfg, log=lambda s: None)
    with pytest.raises(ConfigError, match="quantization"):
        load_config(None, [("quantization", "int4")])


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("guarded", [True, False])
def test_validation_in_eval_mode_leaves_training_gradients_exact(tiny_mllama, processor, shapes, guarded):
    """On a CPU with avx512-bf16, an eval-mode forward repacks the 4-bit weights for an inference kernel
    without a backward; cotune's loading turns that off. Unguarded, the test shows the trap it guards."""
    model, family = load_4bit(tiny_mllama)
    if not guarded:
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()
    torch.manual_seed(0)
    peft = add_lora(model, family, load_config(None, [("lora_config.lora_dropout", "0")]).lora_config)
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # gradients reach both factors
    ds = dataset(processor, shapes, n=2)
    batch = collate(processor, [ds[0], ds[1]])
    peft.train()
    before = _lora_grads(peft, batch)
    peft.eval()
    with torch.no_grad():
        peft(**batch)  # a validation pass
    peft.train()
    if guarded or not bnb.functional.has_avx512bf16():
        after = _lora_grads(peft, batch)
        for name, g in before.items():
            torch.testing.assert_close(after[name], g, rtol=1e-5, atol=1e-7)
    else:  # the trap is real on this CPU: wrong gradients, or an error
        try:
            after = _lora_grads(peft, batch)
        except RuntimeError:
            return
        assert any(not torch.allclose(after[n], g, rtol=1e-3, atol=1e-6) for n, g in before.items())


def test_keep_training_kernels_reaches_every_4bit_layer(tiny_mllama):
    model, _ = load_4bit(tiny_mllama)
    assert keep_training_kernels(model) == quantized_layer_counts(model)["Linear4bit"] > 0


def test_qlora_trains_and_its_adapter_loads_with_plain_peft_on_both_bases(tiny_mllama, shapes, tmp_path):
    few = few_records(shapes, tmp_path / "few.jsonl")
    cfg = load_config(
        None,
        [("model_name", str(tiny_mllama)), ("dataset", str(few)), ("test_file", str(few)),
         ("data.image_root", str(shapes["images"].parent)), ("output_dir", str(tmp_path / "run")),
         ("num_epochs", "10"), ("batch_size_training", "3"), ("lr", "5e-3"), ("scheduler", "constant"),
         ("eval_every_steps", "3"), ("gradient_checkpointing", "True"), ("quantization", "4bit"),
         ("lora_config.lora_dropout", "0"), ("keep_last_checkpoints", "0"), ("progress", "False"),
         ("data.max_seq_len", "1024")],
    )  # fmt: skip
    logs: list[str] = []
    result = finetune(cfg, log=logs.append)
    assert any("4bit" in line for line in logs if line.startswith("model:"))
    losses = result.train_losses
    assert len(losses) == 10 and losses[-1] < 0.5 * losses[0], losses  # validation every 3 steps in between
    assert result.eval_losses[-1] < 0.5 * result.eval_losses[0], result.eval_losses

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    ids = torch.tensor([[128000, 128006, 882, 128007, 271, 9906, 128009]])
    plain = AutoModelForImageTextToText.from_pretrained(str(tiny_mllama))
    base_logits = plain(input_ids=ids).logits
    full = PeftModel.from_pretrained(plain, str(result.adapter_dir)).eval()
    full_logits = full(input_ids=ids).logits
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32,
                           llm_int8_skip_modules=["model.vision_model", "model.multi_modal_projector", "lm_head"])  # fmt: skip
    four = AutoModelForImageTextToText.from_pretrained(str(tiny_mllama), quantization_config=q)
    four = PeftModel.from_pretrained(four, str(result.adapter_dir)).train()  # train mode: no CPU repacking
    with torch.no_grad():
        four_logits = four(input_ids=ids).logits
    effect = (full_logits - base_logits).abs().max()
    assert effect > 0.1, "the adapter changes the logits"
    assert (four_logits - full_logits).abs().max() < effect  # same adapter, the base's quantization apart


@pytest.fixture(scope="module")
def random_adapter(tiny_mllama, tmp_path_factory):
    from helpers import make_adapter

    return make_adapter(tiny_mllama, tmp_path_factory.mktemp("qmerge") / "adapter", seed=5, std=0.1)


def test_merge_into_the_dequantized_4bit_base_passes_the_fp32_guard(tiny_mllama, random_adapter, tmp_path):
    import json

    from transformers import AutoModelForImageTextToText

    from cotune.infer.merge import merge_adapter

    out = tmp_path / "merged"
    report = merge_adapter(str(tiny_mllama), random_adapter, str(out), dtype="fp32", quantization="4bit",
                           quantization_config=QuantizationConfig(), log=lambda s: None)  # fmt: skip
    assert report.max_abs_diff <= report.tolerance < 1e-2 < report.adapter_effect
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForImageTextToText.from_pretrained(str(out))  # a plain checkpoint
    assert layer_types(merged, "model.language_model") == {"Linear"}


def test_merge_into_the_original_base_prints_the_quantization_error(
    tiny_mllama, random_adapter, tmp_path, capsys
):
    from cotune.cli import main

    argv = ["merge", "--model_name", str(tiny_mllama), "--adapter", random_adapter, "--output", str(tmp_path / "m"),
            "--torch_dtype", "fp32", "--quantization", "4bit", "--merge.into", "original"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    quant_error = float(out.split("4-bit base + adapter by ")[1].split()[0])
    parity = float(out.split("max |merged - adapter| logits = ")[1].split()[0])
    assert (
        parity < 1e-3 < quant_error
    )  # guarded against the original base + adapter; the 4-bit gap is information


def test_the_guard_catches_a_wrong_qlora_merge(tiny_mllama, random_adapter, tmp_path, monkeypatch):
    from cotune.infer.merge import MergeMismatch, merge_adapter
    from test_merge import corrupt_one_merged_linear

    corrupt_one_merged_linear(monkeypatch, fraction=0.05)
    with pytest.raises(MergeMismatch):
        merge_adapter(str(tiny_mllama), random_adapter, str(tmp_path / "m"), dtype="fp32", quantization="4bit",
                      quantization_config=QuantizationConfig(), log=lambda s: None)  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_generate_and_eval_take_a_4bit_base(tiny_mllama, random_adapter, shapes, tmp_path, capsys):
    from cotune.cli import main

    argv = ["generate", "--model_name", str(tiny_mllama), "--adapter", random_adapter, "--quantization", "4bit",
            "--max_new_tokens", "4", "--device", "cpu", "Hello"]  # fmt: skip
    assert main(argv) == 0
    from cotune.config import load_options

    cfg = load_options("eval", overrides=[("quantization", "4bit"), ("quant_type", "fp4")]).options
    assert (cfg.quantization, cfg.quantization_config.quant_type) == ("4bit", "fp4")


def test_an_8bit_base_trains(tiny_mllama, shapes, tmp_path):
    few = few_records(shapes, tmp_path / "few.jsonl")
    cfg = load_config(
        None,
        [("model_name", str(tiny_mllama)), ("dataset", str(few)), ("test_file", str(few)),
         ("data.image_root", str(shapes["images"].parent)), ("output_dir", str(tmp_path / "run")),
         ("num_epochs", "4"), ("batch_size_training", "3"), ("lr", "5e-3"), ("scheduler", "constant"),
         ("quantization", "8bit"), ("lora_config.lora_dropout", "0"), ("keep_last_checkpoints", "0"),
         ("progress", "False"), ("data.max_seq_len", "1024")],
    )  # fmt: skip
    result = finetune(cfg, log=lambda s: None)
    assert result.train_losses[-1] < result.train_losses[0] and result.adapter_dir is not None
