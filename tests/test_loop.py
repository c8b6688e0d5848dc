"""Pieces of the training recipe: schedules, activation checkpointing parity, adapter saving."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from cotune.config import LoraConfig, load_config
from cotune.data.batching import PaddingCollator
from cotune.data.cot import label_stages, stage_loss_totals
from cotune.data.dataset import SFTDataset, encode_samples
from cotune.data.records import load_samples
from cotune.models.families import MLLAMA, layer_modules
from cotune.models.load import add_lora, load_base_model
from cotune.train.distributed import checkpoint_activations
from cotune.train.loop import build_scheduler, finetune, setup
from cotune.train.loss import ChunkedLossModel
from cotune.train.step import STAGE_KEYS, HeldOut, batch_label_stages, validation_loss
from helpers import random_lora


def lrs(name, steps=10, per_epoch=4, **kw):
    cfg = load_config(None, [("scheduler", name), ("lr", "1.0"), *[(k, str(v)) for k, v in kw.items()]])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(cfg, opt, per_epoch, steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules():
    assert lrs("step", gamma=0.5) == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert lrs("constant") == [1.0] * 10
    cos = lrs("cosine", warmup_steps=2)
    assert cos[:2] == [0.5, 1.0] and cos[-1] < 0.05 and all(a >= b for a, b in zip(cos[1:], cos[2:]))
    lin = lrs("linear")
    assert lin[0] == 1.0 and math.isclose(lin[5], 0.5)


@pytest.fixture
def batch(processor, shapes):
    samples, _ = load_samples(shapes["train"])
    enc, _, _ = encode_samples(samples[:2], processor, MLLAMA, 1024)
    ds = SFTDataset(enc, processor, MLLAMA)
    tok = processor.tokenizer
    return PaddingCollator(tok.pad_token_id, MLLAMA, MLLAMA.image_token_id(tok))([ds[0], ds[1]])


def count_forwards(model) -> dict[str, int]:
    """Counts how often the body of each layer of the family's layer classes runs (text decoder and
    vision encoder layers; filled as they run).

    What is counted is the start of the layer's first sub-module, its input norm: a recomputation
    in backward need not pass through a wrapper set on the instance (transformers' mechanism
    checkpoints the class-level forward); and the recomputation stops as soon as it has rebuilt
    the tensors backward needs, so a hook at the end of the body could be skipped.
    """
    counts = {}
    for name, layer in model.named_modules():
        if type(layer).__name__ in MLLAMA.layer_classes:
            counts[name] = 0
            layer.input_layernorm.register_forward_pre_hook(
                lambda *_, _name=name: counts.update({_name: counts[_name] + 1})
            )
    return counts


def loss_and_grads(tiny_mllama, batch, checkpointing: bool):
    peft = random_lora(tiny_mllama, seed=0, std=0.05, targets="all")
    if checkpointing:
        checkpoint_activations(layer_modules(peft, MLLAMA))  # what setup() does without FSDP
    peft.train()
    forwards = count_forwards(peft)
    loss_sum, n = ChunkedLossModel(peft)(**batch)
    (loss_sum / n).backward()
    grads = {k: p.grad.clone() for k, p in peft.named_parameters() if p.requires_grad}
    return loss_sum.detach(), grads, forwards


def test_gradient_checkpointing_recomputes_and_gives_same_loss_and_gradients(tiny_mllama, batch):
    ref_loss, ref_grads, ref_forwards = loss_and_grads(tiny_mllama, batch, checkpointing=False)
    loss, grads, forwards = loss_and_grads(tiny_mllama, batch, checkpointing=True)
    text = [name for name in ref_forwards if "language_model" in name]
    vision = [name for name in ref_forwards if "vision_model" in name]
    assert len(text) == 4 and vision and len(text) + len(vision) == len(ref_forwards), ref_forwards
    assert set(ref_forwards.values()) == {1}, ref_forwards
    # checkpointing is on: every text decoder layer and every vision encoder layer (local and
    # global) runs its forward again in backward (recomputation)
    assert {name: forwards[name] for name in text} == {name: 2 for name in text}, forwards
    assert {name: forwards[name] for name in vision} == {name: 2 for name in vision}, forwards
    torch.testing.assert_close(loss, ref_loss)
    assert any(("vision_model" in k) for k in grads), "the 'all' preset must reach the vision tower"
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-7)


def test_setup_checkpoints_text_and_vision_layers_in_one_process(tiny_mllama, shapes, tmp_path):
    """``gradient_checkpointing`` without FSDP: setup itself recomputes every layer, vision included."""
    data = _first_records(shapes, 2, tmp_path / "two.jsonl")
    cfg = load_config(
        None,
        [("model_name", str(tiny_mllama)), ("dataset", data), ("test_file", data),
         ("data.image_root", str(shapes["images"].parent)), ("output_dir", str(tmp_path / "run")),
         ("batch_size_training", "2"), ("gradient_checkpointing", "True"),
         ("lora_config.target_modules", "all"), ("progress", "False"), ("data.max_seq_len", "512")],
    )  # fmt: skip
    run = setup(cfg, log=lambda s: None)
    forwards = count_forwards(run.model)
    batch = next(iter(run.data.train))
    assert "pixel_values" in batch
    loss_sum, n = run.loss_model(**run.family.model_inputs(batch))
    (loss_sum / n).backward()
    assert any("vision_model" in name for name in forwards)
    assert forwards == {name: 2 for name in forwards}, forwards


def test_setup_tunes_the_cpu_heap_only_after_loading_the_model(tiny_mllama, shapes, tmp_path, monkeypatch):
    """A heap tuned to keep freed memory, tuned before loading, kept a 4-bit load's temporaries for the
    whole run (3.5 GiB for a 1.3 B Mllama, BENCHMARKS.md): setup loads, trims the heap, then tunes it."""
    import cotune.train.loop as loop

    calls, build = [], loop.build_model
    monkeypatch.setattr(loop, "build_model", lambda *a, **k: (calls.append("load"), build(*a, **k))[1])
    monkeypatch.setattr(loop, "trim_cpu_heap", lambda: calls.append("trim"))
    monkeypatch.setattr(loop, "tune_cpu_allocator", lambda: calls.append("tune"))
    data = _first_records(shapes, 2, tmp_path / "two.jsonl")
    cfg = load_config(
        None,
        [("model_name", str(tiny_mllama)), ("dataset", data), ("data.image_root", str(shapes["images"].parent)),
         ("output_dir", str(tmp_path / "run")), ("run_validation", "False"), ("progress", "False")],
    )  # fmt: skip
    setup(cfg, log=lambda s: None)
    assert calls == ["load", "trim", "tune"]


def test_lora_presets_select_the_right_layers(tiny_mllama):
    model, family = load_base_model(tiny_mllama)
    cross = set(model.config.text_config.cross_attention_layers)

    def targeted(preset):
        peft = add_lora(load_base_model(tiny_mllama)[0], family, LoraConfig(r=2, target_modules=preset))
        return {
            n.split(".lora_A")[0].removeprefix("base_model.model.")
            for n, _ in peft.named_parameters()
            if "lora_A" in n
        }

    language = targeted("language")
    assert language and all("language_model" in n for n in language)
    assert not any(f"layers.{i}." in n for n in language for i in cross)
    with_cross = targeted("language+cross_attention")
    assert any("cross_attn.q_proj" in n for n in with_cross) and language < with_cross
    everything = targeted("all")
    assert any("vision_model" in n for n in everything) and with_cross < everything
    assert targeted("q_proj,v_proj") == {n for n in everything if n.endswith(("q_proj", "v_proj"))}


def _first_records(shapes, n: int, path) -> str:
    """The first ``n`` records of the synthetic training set, as a file of their own."""
    path.write_text("".join(line + "\n" for line in shapes["train"].read_text().splitlines()[:n]))
    return str(path)


@pytest.mark.parametrize(
    "schedule, epochs, want",
    [
        # 7 batches in groups of 3: 3 optimizer steps, the last one a group of 1; the schedule
        # ends on that step, not one step early (which left it at lr 0)
        ([("scheduler", "linear")], 1, [1.0, 2 / 3, 1 / 3]),
        ([("scheduler", "cosine")], 1, [1.0, 0.75, 0.25]),
        # StepLR decays once per epoch, i.e. every 3 steps, not every 7 // 3 = 2
        ([("scheduler", "step"), ("gamma", "0.5")], 2, [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]),
    ],
)
def test_schedule_ends_on_the_last_optimizer_step_with_accumulation(
    tiny_mllama, shapes, tmp_path, schedule, epochs, want
):
    data = _first_records(shapes, 7, tmp_path / "seven.jsonl")
    cfg = load_config(
        None,
        [("model_name", str(tiny_mllama)), ("dataset", data), ("test_file", data),
         ("data.image_root", str(shapes["images"].parent)), ("output_dir", str(tmp_path / "run")),
         ("batch_size_training", "1"), ("gradient_accumulation_steps", "3"), ("num_epochs", str(epochs)),
         ("lr", "1.0"), *schedule, ("run_validation", "False"), ("save_model", "False"),
         ("keep_last_checkpoints", "0"), ("progress", "False"), ("data.max_seq_len", "512")],
    )  # fmt: skip
    result = finetune(cfg, log=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert result.steps == len(want)
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx(want)


def test_validation_loss_per_stage_is_eval_s_per_stage_loss(tiny_mllama, processor, batch):
    """Validation's per-stage losses are those ``cotune eval`` computes (label_token_losses grouped by
    label_stages) and its loss is the summed path's; the stages are decoded once (cached)."""
    peft = random_lora(tiny_mllama, seed=0, std=0.05, targets="all")
    loss_model, cfg = ChunkedLossModel(peft), load_config(None, [])
    inputs = MLLAMA.model_inputs
    held = HeldOut(loss_model, [batch], inputs, cfg, torch.device("cpu"))
    plain, none = validation_loss(held)
    cache = {}
    stages_of = functools.partial(batch_label_stages, processor.tokenizer, cache)
    loss, by_stage = validation_loss(held, stages_of)
    assert none == {} and loss == pytest.approx(plain, rel=1e-6)
    with torch.no_grad():
        losses, _ = loss_model(**inputs(batch), per_token=True)
    totals = {s: [0.0, 0] for s in STAGE_KEYS}
    for row, (ids, labels) in enumerate(zip(batch["input_ids"].tolist(), batch["labels"].tolist())):
        stages = label_stages(processor.tokenizer, ids, labels)
        positions = [j for j in range(1, len(labels)) if labels[j] != -100]
        part = stage_loss_totals([float(losses[row, j]) for j in positions], [stages[j] for j in positions])
        for s, (v, n) in part.items():
            totals[s][0] += v
            totals[s][1] += n
    assert {"SUMMARY", "CAPTION", "REASONING", "CONCLUSION"} <= set(by_stage)
    assert by_stage == pytest.approx({s: v / n for s, (v, n) in totals.items() if n}, rel=1e-5)
    assert len(cache) == 2
    cache_copy = dict(cache)
    validation_loss(held, stages_of)
    assert cache == cache_copy and loss_model.training  # back in training mode after the pass
