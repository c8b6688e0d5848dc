"""Config: defaults, YAML, llama-cookbook style flags, and errors that say what to do."""

from __future__ import annotations

import pytest

from cotune.config import ConfigError, TrainConfig, load_config, parse_flags


def flags(*argv):
    positional, pairs = parse_flags(list(argv))
    return positional, pairs


def test_llava_cot_command_line_carries_over():
    _, pairs = flags(
        "--enable_fsdp", "--lr", "1e-5", "--num_epochs", "3", "--batch_size_training", "4",
        "--model_name", "/ckpt/Llama-3.2V-11B-cot", "--dist_checkpoint_root_folder", "./finetuned_model",
        "--dist_checkpoint_folder", "LLaVA-o1", "--use_fast_kernels", "--dataset", "custom_dataset",
        "--custom_dataset.test_split", "test", "--custom_dataset.file", "datasets/cot_dataset.py",
        "--run_validation", "False", "--batching_strategy", "padding",
        "--use_peft", "--peft_method", "lora", "--lora_config.r=16",
    )  # fmt: skip
    cfg = load_config(None, pairs)
    assert cfg.enable_fsdp is True and cfg.use_fast_kernels is True and cfg.use_peft is True
    assert cfg.lr == 1e-5 and cfg.num_epochs == 3 and cfg.batch_size_training == 4
    assert cfg.run_validation is False
    assert cfg.custom_dataset.file == "datasets/cot_dataset.py" and cfg.custom_dataset.test_split == "test"
    assert cfg.lora_config.r == 16
    assert cfg.output_dir == "finetuned_model/LLaVA-o1"


def test_yaml_then_flags_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "lr: 0.001\nnum_epochs: 2\nlora_config:\n  r: 4\n  target_modules: [q_proj, v_proj]\ndata:\n  max_seq_len: 99\n"
    )
    cfg = load_config(path, [("num_epochs", "5"), ("test_file", "t.jsonl")])
    assert cfg.lr == 0.001 and cfg.num_epochs == 5
    assert cfg.lora_config.r == 4 and cfg.lora_config.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.max_seq_len == 99 and cfg.data.test_file == "t.jsonl"
    assert TrainConfig().num_epochs == 3  # defaults untouched


def test_unknown_option_names_close_matches():
    with pytest.raises(ConfigError, match="unknown option 'num_epoch'.*--num_epochs"):
        load_config(None, [("num_epoch", "3")])
    with pytest.raises(ConfigError, match="lora_config.lora_alpha"):
        load_config(None, [("lora_config.lora_alpa", "8")])


def test_unknown_option_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown option 'learning_rate'"):
        load_config(path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", "fast", "expects float"),
        ("run_validation", "maybe", "expects True or False"),
        ("batch_size_training", "2.5", "expects int"),
        ("batching_strategy", "bucket", "must be one of padding, packing"),
        ("data.on_error", "ignore", "must be one of skip, raise"),
        ("num_epochs", "0", "must be positive"),
        ("use_peft", "False", "LoRA adapters only"),
    ],
)
def test_bad_values(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [(key, value)])


def test_equals_form_and_bare_flags():
    positional, pairs = flags("configs/demo.yaml", "--lr=3e-4", "--gradient_checkpointing", "--seed", "7")
    assert positional == ["configs/demo.yaml"]
    assert pairs == [("lr", "3e-4"), ("gradient_checkpointing", True), ("seed", "7")]
