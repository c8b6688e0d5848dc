"""Shared fixtures: one tiny Mllama checkpoint and one small synthetic dataset per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_mllama(tmp_path_factory):
    from cotune.demo.tiny import build_tiny_mllama

    return build_tiny_mllama(tmp_path_factory.mktemp("models") / "tiny-mllama", seed=0)


@pytest.fixture(scope="session")
def tiny_real(tiny_mllama, tmp_path_factory):
    """The tiny Mllama (same weights) with Llama-3.2-11B-Vision-Instruct's file layout: no pad token that
    transformers reads, an eos list in generation_config.json, Meta's template quirks
    (``build_tiny_mllama(..., real_layout=True)``, made by copying instead of rebuilding)."""
    import shutil

    from cotune.demo.real_layout import write_real_layout

    return write_real_layout(shutil.copytree(tiny_mllama, tmp_path_factory.mktemp("models") / "tiny-real"))


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    from cotune.demo.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava", seed=0)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small synthetic LLaVA-CoT dataset: {"train", "test", "images"} paths."""
    from cotune.demo.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "shapes", n_train=24, n_test=8, seed=0)


@pytest.fixture(scope="session")
def processor(tiny_mllama):
    from cotune.models.load import load_processor

    return load_processor(tiny_mllama)


@pytest.fixture(scope="module")
def base(tiny_mllama):
    """The tiny Mllama and its family, loaded once per test module (tests attach adapters to it)."""
    from cotune.models.load import load_base_model

    return load_base_model(tiny_mllama)


@pytest.fixture(scope="module")
def prompt(shapes):
    """(messages, images) of one question about the first test image."""
    from cotune.data.records import load_samples
    from cotune.infer.generate import user_message

    sample = load_samples(shapes["test"])[0][0]
    return [user_message("How many shapes are there?", n_images=1)], sample.images[:1]


@pytest.fixture(scope="session")
def colour_run(tiny_mllama, tmp_path_factory):
    """An adapter trained 200 steps on 'what colour is the shape?' with one shape per picture (the
    demo's pictures): the answer is in the pixels and nowhere else (six colours, chance is 1 in 6).
    Returns (finetune's result, the data's paths). Used by test_vision.py and, as a teacher, by
    test_reason_e2e.py."""
    from cotune.config import load_config
    from cotune.demo.synthetic import write_synthetic_dataset
    from cotune.run_demo import DEMO_CONFIG, DEMO_DATA
    from cotune.train.loop import finetune

    colour_only = {
        **{k: v for k, v in DEMO_DATA.items() if k != "n_train"},
        "tasks": ("colour",),
        "follow_up_rate": 0.0,
    }
    root = tmp_path_factory.mktemp("colour")
    data = write_synthetic_dataset(root / "data", n_train=400, n_test=48, seed=1, **colour_only)
    overrides = [
        ("model_name", str(tiny_mllama)), ("dataset", str(data["train"])),
        ("data.test_file", str(data["test"])), ("output_dir", str(root / "run")),
        ("run_validation", "False"), ("progress", "False"), ("keep_last_checkpoints", "0"),
    ]  # fmt: skip
    result = finetune(load_config(DEMO_CONFIG, overrides), log=lambda *_: None)
    return result, data
