"""Config: defaults, YAML, llama-cookbook style flags, one option system for every verb, and errors
that say what to do."""

from __future__ import annotations

import dataclasses
import pickle
import re

import pytest

from cotune.cli import main
from cotune.config import (
    CATALOG,
    CONFIG_CLASSES,
    VERBS,
    ConfigError,
    TrainConfig,
    load_config,
    parse_args,
    parse_flags,
    save_config,
)


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
        ("freeze_layers", "True", "--use_peft False"),  # it chooses what a full fine-tune trains
    ],
)
def test_bad_values(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [(key, value)])


def test_equals_form_and_bare_flags():
    positional, pairs = flags("configs/demo.yaml", "--lr=3e-4", "--gradient_checkpointing", "--seed", "7")
    assert positional == ["configs/demo.yaml"]
    assert pairs == [("lr", "3e-4"), ("gradient_checkpointing", True), ("seed", "7")]


# ----------------------------------------------------------------------------- one system for every verb


def test_an_option_has_one_name_default_and_help_in_every_verb_that_takes_it():
    seen: dict[str, tuple] = {}
    for verb, options in CATALOG.options.items():
        instance = CONFIG_CLASSES[verb]()
        for path, option in options.items():
            entry = (option.default, option.help, option.type)
            assert seen.setdefault(path, entry) == entry, f"{verb}: {path} differs from another verb's"
            obj = instance
            for part in path.split("."):
                obj = getattr(obj, part)
            assert obj == option.default, f"{verb}: {path} default {obj!r} != {option.default!r}"
    # one last part in several paths, on purpose only: the folder each verb writes (train's run,
    # eval's report, merge's checkpoint: their old flags), and two the cookbook itself repeats in
    # train_config and fsdp_config / custom_dataset; the address each server binds (serve's, studio's)
    by_leaf: dict[str, set[str]] = {}
    for path in seen:
        by_leaf.setdefault(path.rsplit(".", 1)[-1], set()).add(path)
    assert {leaf for leaf, paths in by_leaf.items() if len(paths) > 1} == {
        "output_dir",
        "dataset",
        "mixed_precision",
        "host",
        "port",
    }
    assert seen["data.max_seq_len"][0] == 2048 and "data.max_seq_len" in CATALOG.options["eval"]


def test_every_verb_takes_its_sections_from_the_registry():
    for verb, spec in VERBS.items():
        assert [s.name for s in CATALOG.sections[verb]] == list(spec.sections)
    assert set(VERBS) == {
        "train",
        "demo",
        "data",
        "generate",
        "chat",
        "eval",
        "merge",
        "serve",
        "plan",
        "studio",
        "tiny-model",
        "synth-data",
        "data-pairs",
    }
    assert VERBS["plan"].sections == (
        *VERBS["train"].sections,
        "plan",
    )  # exactly train's options, plus its own
    cfg = TrainConfig()  # the training loop's view is unchanged
    assert (cfg.lr, cfg.lora_config.r, cfg.data.max_seq_len, cfg.fsdp_config.sharding_strategy) == (
        1e-4,
        8,
        2048,
        "full_shard",
    )
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # composed classes pickle (dataloader workers, spawn)


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_help_lists_its_options_and_no_other(verb, capsys):
    assert main([verb, "--help"]) == 0
    text = capsys.readouterr().out
    listed = set(re.findall(r"^  --([\w.]+)", text, flags=re.M))  # each entry's first name: the full path
    assert listed == set(CATALOG.options[verb])
    if verb == "eval":
        assert "--data.max_seq_len, --max_seq_len (default: 2048)" in text and "--lr " not in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--lr", "1e-5"], "cotune eval does not take --lr (taken by: train, demo, plan)"),
        (["train", "--max_new_tokens", "8"], "cotune train does not take --max_new_tokens (taken by: generate, chat, eval, studio, data-pairs)"),
        (["merge", "--image_ablation"], "cotune merge does not take --image_ablation (taken by: eval)"),
        (["generate", "--data.max_seq_len", "9", "hi"], "cotune generate does not take --data.max_seq_len (taken by: train, demo, data, eval, merge, plan, data-pairs)"),
        (["chat", "--lora_config.r", "4"], "cotune chat does not take --lora_config.r (taken by: train, demo, plan)"),
        (["train", "--batch_size", "2"], "(taken by: eval). Did you mean --val_batch_size, --batch_size_training?"),
        (["data", "check", "train.jsonl", "--lr", "1"], "cotune data does not take --lr (taken by: train, demo, plan)"),
        (["eval", "--max_new_token", "8"], "unknown option 'max_new_token'. Did you mean --max_new_tokens"),
    ],
)  # fmt: skip
def test_an_option_of_another_verb_is_refused_naming_the_verbs_that_take_it(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_flag_forms_reach_the_verbs_own_options():
    cfg = parse_args(
        "generate",
        ["--model", "m", "--beam-size", "3", "--max_new_tokens=5", "--system_prompt", "Be brief.",
         "--adapter", "a", "--adapter", "b=c", "--seed", "-1", "--verbose", "How many?"],
    )  # fmt: skip
    g = cfg.options.generation
    assert cfg.options.model_name == "m" and g.beam_size == 3 and g.max_new_tokens == 5 and g.verbose
    assert cfg.options.data.system_prompt == "Be brief." and cfg.options.adapter == ["a", "b=c"]
    assert cfg.words == ["How many?"] and cfg.options.seed == -1  # a bare bool before the prompt
    merge = parse_args("merge", ["--output", "out", "--dtype", "bf16", "--data", "t.jsonl"]).options
    assert (merge.merge.output_dir, merge.torch_dtype, merge.data.test_file) == ("out", "bf16", "t.jsonl")
    evaluation = parse_args("eval", ["--output_dir", "e", "--data.max_seq_len", "99", "--image_root", "r"])
    assert evaluation.options.eval.output_dir == "e" and evaluation.options.data.max_seq_len == 99
    assert evaluation.options.data.image_root == "r"
    with pytest.raises(ConfigError, match="generation.search' must be one of none, stage, best-of-n"):
        parse_args("chat", ["--search", "beam"])


def test_a_run_config_serves_every_verb_and_other_verbs_options_in_it_are_skipped(tmp_path):
    cfg = load_config(None, [("lr", "0.01"), ("data.system_prompt", "S"), ("max_seq_len", "300")])
    cfg.data.test_file, cfg.tokenizer_name = "t.jsonl", "proc"
    run = tmp_path / "config.yaml"
    save_config(cfg, run)
    assert load_config(run) == cfg
    evaluation = parse_args("eval", [str(run), "--adapter", "a"]).options
    read = dataclasses.asdict(evaluation.data)  # eval's data options: the run's own values
    assert read == {k: v for k, v in dataclasses.asdict(cfg.data).items() if k in read}
    assert (read["max_seq_len"], read["system_prompt"], read["test_file"]) == (300, "S", "t.jsonl")
    assert evaluation.tokenizer_name == "proc"
    assert evaluation.eval.output_dir == ""  # the run's output_dir is training's, not eval's
    generate = parse_args("generate", [str(run), "--adapter", "a", "hello"])
    assert generate.words == ["hello"] and generate.options.data.system_prompt == "S"
    shared = tmp_path / "shared.yaml"
    shared.write_text("model_name: m\nlr: 0.1\neval:\n  batch_size: 2\ngeneration:\n  max_new_tokens: 7\n")
    assert load_config(shared).lr == 0.1 and parse_args("eval", [str(shared)]).options.eval.batch_size == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval:\n  batch_sise: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown option 'eval.batch_sise'.*--eval.batch_size"):
        parse_args("generate", [str(bad)])


def test_a_flag_replaces_a_yaml_list_then_appends(tmp_path):
    path = tmp_path / "use.yaml"
    path.write_text("adapter: [x, y]\n")
    assert parse_args("chat", [str(path)]).options.adapter == ["x", "y"]
    assert parse_args("chat", [str(path), "--adapter", "a", "--adapter", "b"]).options.adapter == ["a", "b"]


def test_demo_passes_training_options_over_its_recipe(monkeypatch, tmp_path):
    import cotune.run_demo

    calls = []
    monkeypatch.setattr(
        cotune.run_demo, "run_demo", lambda workdir, overrides, n_eval: calls.append((workdir, overrides, n_eval)) or {"misses": []}
    )  # fmt: skip
    recipe = tmp_path / "more.yaml"
    recipe.write_text("lr: 0.01\ndata:\n  max_seq_len: 99\neval:\n  batch_size: 3\n")
    assert main(["demo", str(recipe), "--workdir", "w", "--n_eval", "5", "--num_epochs", "1"]) == 0
    assert calls == [("w", [("lr", 0.01), ("data.max_seq_len", 99), ("num_epochs", 1)], 5)]
    assert main(["demo", "--max_new_tokens", "3"]) == 2


def test_a_verb_with_a_path_argument_takes_a_yaml_before_it(tmp_path):
    recipe = tmp_path / "small.yaml"
    recipe.write_text("seed: 3\nsynth_data:\n  n_train: 4\n  n_test: 2\n")
    assert main(["synth-data", str(recipe), str(tmp_path / "d"), "--n_test", "3"]) == 0
    assert len((tmp_path / "d" / "train.jsonl").read_text().splitlines()) == 4
    assert len((tmp_path / "d" / "test.jsonl").read_text().splitlines()) == 3
