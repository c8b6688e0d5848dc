"""Task metrics during training (train/task_metrics.py and the validation hook in train/loop.py)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cotune.config import load_config
from cotune.data.answers import first_turn
from cotune.data.records import load_samples
from cotune.infer.generate import generate
from cotune.train import task_metrics
from cotune.train.loop import finetune


def test_subset_is_fixed_by_the_seed_and_has_gold_answers(shapes):
    samples = load_samples(shapes["test"])[0]
    samples[0].meta.pop("answer", None)
    samples[0].messages = samples[0].messages[:1]  # no answer, no reference: never picked
    a = task_metrics.task_subset(samples, 4, seed=7)
    b = task_metrics.task_subset(samples, 4, seed=7)
    assert [s.id for s in a.samples] == [s.id for s in b.samples] and len(a.samples) == 4
    assert samples[0].id not in {s.id for s in a.samples}
    assert task_metrics.task_subset(samples, 0, seed=7) is None
    assert len(task_metrics.task_subset(samples, 100, seed=7).samples) == len(samples) - 1


def test_greedy_reply_is_what_generate_answers(base, processor, shapes):
    model, family = base
    sample = load_samples(shapes["test"])[0][0]
    reply, tokens = task_metrics.greedy_reply(model, processor, family, sample, 6, lambda batch: batch)
    (expected,) = generate(
        model, processor, family, [(first_turn(sample)[0], sample.images)], max_new_tokens=6
    )
    assert reply == expected and tokens > 6


@pytest.mark.slow
def test_training_logs_accuracy_at_each_validation_and_keeps_the_most_accurate(
    tiny_mllama, shapes, tmp_path, monkeypatch
):
    """Accuracy (and recall per gold class) is logged at every validation; with best_adapter_metric
    accuracy, best_adapter is the adapter of the most accurate validation after a step (here the
    real answers' accuracy is replaced by a scripted one so that the choice differs from the loss's)."""
    scripted = iter([0.9, 0.75, 0.25])  # step 0 (the base: a reference, never the best), 1, 2
    real = task_metrics.measure_task
    seen = []

    def measure(*args, **kwargs):
        figures = real(*args, **kwargs)
        seen.append(dict(figures))
        return figures | {"eval_accuracy": next(scripted)}  # the current ``scripted``

    monkeypatch.setattr(task_metrics, "measure_task", measure)
    run = tmp_path / "run"
    cfg = load_config(
        None,
        [("model_name", str(tiny_mllama)), ("dataset", str(shapes["train"])), ("test_file", str(shapes["test"])),
         ("output_dir", str(run)), ("max_train_step", "2"), ("batch_size_training", "2"), ("lr", "1e-2"),
         ("eval_every_steps", "1"), ("max_eval_step", "1"), ("eval_generate_samples", "2"),
         ("eval_generate_max_new_tokens", "3"), ("best_adapter_metric", "accuracy"),
         ("save_every_steps", "1"), ("keep_last_checkpoints", "5"), ("progress", "False"),
         ("data.max_seq_len", "1024")],
    )  # fmt: skip
    lines = []
    result = finetune(cfg, log=lines.append)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert [r["eval_accuracy"] for r in evals] == [0.9, 0.75, 0.25]
    assert all(r["eval_generate_n"] == 2 and r["eval_generate_tokens"] > 0 for r in evals)
    assert all(any(k.startswith("eval_recall_") for k in r) for r in evals)
    assert sum("task metrics: accuracy" in line and "forward tokens" in line for line in lines) == 3
    assert len(seen) == 3 and all(0.0 <= f["eval_accuracy"] <= 1.0 for f in seen)
    best = load_file(str(result.best_adapter_dir / "adapter_model.safetensors"))
    step1 = load_file(str(run / "checkpoints" / "step_00000001" / "adapter" / "adapter_model.safetensors"))
    assert best.keys() == step1.keys() and all(torch.equal(best[k], step1[k]) for k in best)

    # resumed from step 1, a less accurate step 2 does not replace best_adapter: the best accuracy
    # is in the checkpoint
    state = json.loads((run / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["best_eval_accuracy"] == 0.75
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    scripted = iter([0.5])
    finetune(cfg.__class__(**{**vars(cfg), "resume": "auto"}), log=lambda s: None)
    best = load_file(str(run / "best_adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(best[k], step1[k]) for k in best)


@pytest.mark.slow
def test_two_processes_answer_the_subset_as_one_does(tiny_mllama, shapes, tmp_path):
    """Under torchrun (FSDP, 2 ranks) the ranks share the questions (3: one rank answers one again
    and drops it) and log the figures one process logs with the same global batch."""
    import sys

    from cotune.train.metrics import read_metrics
    from test_distributed import _in_process, _run

    def flags(out, batch):
        return [f"--{k}={v}" for k, v in {
            "model_name": tiny_mllama, "dataset": shapes["train"], "test_file": shapes["test"], "output_dir": out,
            "max_train_step": 1, "batch_size_training": batch, "lr": 1e-2, "max_eval_step": 1,
            "eval_generate_samples": 3, "eval_generate_max_new_tokens": 4, "save_model": False,
            "keep_last_checkpoints": 0, "progress": False, "data.max_seq_len": 1024,
            "lora_config.lora_dropout": 0.0}.items()]  # fmt: skip

    cmd = [sys.executable, "-m", "cotune", "train", "--enable_fsdp", "--nproc_per_node=2"]
    done = _run(cmd + flags(tmp_path / "two", 1), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    _in_process(flags(tmp_path / "one", 2))
    two, one = (
        [r for r in read_metrics(tmp_path / n / "metrics.jsonl") if "eval_accuracy" in r]
        for n in ("two", "one")
    )
    assert len(two) == len(one) == 2  # step 0 and the end
    for a, b in zip(two, one):
        assert a["eval_generate_n"] == b["eval_generate_n"] == 3
        for k in a:
            if (
                k.startswith(("eval_accuracy", "eval_answered", "eval_recall_"))
                or k == "eval_generate_tokens"
            ):
                assert a[k] == b[k], (k, a, b)
