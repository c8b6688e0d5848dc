"""End to end on the tiny models: the CLI, plain-PEFT reload, a cookbook dataset file, LLaVA, overfitting."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from cotune.config import load_config
from cotune.data.records import load_samples
from cotune.infer.generate import generate, prompt_messages
from cotune.models.load import load_base_model, load_processor
from cotune.train.loop import finetune

FAST = [
    ("max_train_step", "2"),
    ("batch_size_training", "2"),
    ("progress", "False"),
    ("data.max_seq_len", "512"),
]


def test_cli_end_to_end_and_plain_peft_reload(tiny_mllama, shapes, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cotune", "train", "--model_name", str(tiny_mllama), "--dataset", str(shapes["train"]),
           "--test_file", str(shapes["test"]), "--output_dir", str(out), "--max_train_step", "3",
           "--batch_size_training", "2", "--eval_every_steps", "2", "--progress", "False", "--lr", "1e-2",
           "--lora_config.r", "4"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "config.yaml",
        "loss.png",
    ):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(k in steps[0] for k in ("epoch", "lr", "tokens_per_s"))
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 3] and all("eval_perplexity" in r for r in evals)
    assert load_config(out / "config.yaml").lora_config.r == 4  # the saved config is complete and loadable

    # a fresh process with no cotune import: plain transformers + PEFT reproduce cotune's logits
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForImageTextToText
        from peft import PeftModel
        assert not any(m.startswith("cotune") for m in sys.modules)
        base = AutoModelForImageTextToText.from_pretrained("{tiny_mllama}")
        model = PeftModel.from_pretrained(base, "{out / "adapter"}").eval()
        ids = torch.tensor([[128000, 128006, 882, 128007, 271, 9906, 128009]])
        torch.save(model(input_ids=ids).logits, "{tmp_path / "plain.pt"}")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    from peft import PeftModel

    base, _ = load_base_model(tiny_mllama)
    ours = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ids = torch.tensor([[128000, 128006, 882, 128007, 271, 9906, 128009]])
    plain = torch.load(tmp_path / "plain.pt")
    torch.testing.assert_close(ours(input_ids=ids).logits, plain)
    base2, _ = load_base_model(tiny_mllama)
    assert not torch.allclose(base2(input_ids=ids).logits, plain), "the adapter must change the logits"


def test_unknown_flag_is_an_error_before_loading(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cotune", "train", "--num_epoch", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown option 'num_epoch'" in proc.stderr and "--num_epochs" in proc.stderr


COOKBOOK_FILE = """
import copy
import json
from datasets import Dataset
from PIL import Image

def get_custom_dataset(dataset_config, processor, split, split_ratio=0.75):
    rows = [json.loads(l) for l in open(dataset_config.data_path)]
    ds = Dataset.from_list([{"image": r["image"], "q": r["conversations"][0]["value"].replace("<image>", "").strip(),
                             "a": r["conversations"][1]["value"]} for r in rows])
    return ds.train_test_split(test_size=1 - split_ratio, shuffle=True, seed=42)[split]

class Collator:
    def __init__(self, processor):
        self.processor = processor
        self.processor.tokenizer.padding_side = "right"
    def __call__(self, samples):
        import os
        root = os.path.dirname(DATA_PATH)
        dialogs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["q"]}]},
                    {"role": "assistant", "content": [{"type": "text", "text": s["a"]}]}] for s in samples]
        images = [[Image.open(os.path.join(root, s["image"])).convert("RGB")] for s in samples]
        text = [self.processor.apply_chat_template(d) for d in dialogs]
        text = [t.replace("<|begin_of_text|>", "") for t in text]
        batch = self.processor(images=images, text=text, padding=True, return_tensors="pt")
        labels = batch["input_ids"].clone()
        labels[labels == self.processor.tokenizer.pad_token_id] = -100
        labels[labels == 128256] = -100
        for i, row in enumerate(batch["input_ids"].tolist()):
            # mask up to and including the assistant header, cookbook style (hard-coded ids)
            for j in range(len(row) - 2):
                if row[j:j + 3] == [128006, 78191, 128007]:
                    labels[i, : j + 3] = -100
        batch["labels"] = labels
        return batch

def get_data_collator(processor):
    return Collator(processor)
"""


def test_cookbook_dataset_file_unchanged(tiny_mllama, shapes, tmp_path):
    file = tmp_path / "my_ds.py"
    file.write_text(COOKBOOK_FILE.replace("DATA_PATH", repr(str(shapes["train"]))))
    logs = []
    cfg = load_config(
        None,
        [("model_name", str(tiny_mllama)), ("dataset", "custom_dataset"), ("custom_dataset.file", str(file)),
         ("custom_dataset.data_path", str(shapes["train"])), ("output_dir", str(tmp_path / "run")), *FAST],
    )  # fmt: skip
    result = finetune(cfg, log=logs.append)
    assert result.steps == 2 and (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
    assert any("train: 18 records" in line for line in logs)  # 24 * 0.75: the file's own split_ratio default
    assert any("validation: 6 records (split 'test')" in line for line in logs)
    # the cookbook recipe strips <|begin_of_text|> from the template's text, then the processor adds it back
    # twice (as text and as the tokenizer's special token): cotune trains anyway and says so
    assert any("hold 2 BOS tokens" in line for line in logs), logs


def few_records(shapes, path, n: int = 3):
    """The first ``n`` single-exchange records of the training set, in a file of their own."""
    chosen = [
        json.loads(line) for line in shapes["train"].read_text().splitlines() if "conversations" in line
    ][:n]
    for r in chosen:
        r["conversations"] = r["conversations"][:2]
    path.write_text("\n".join(json.dumps(r) for r in chosen) + "\n")
    return path


def test_llava_family_end_to_end_learns(tiny_llava, shapes, tmp_path):
    """LLaVA trains through the same code as Mllama: on three samples seen again and again, the training
    and validation losses fall well below where they started."""
    few = few_records(shapes, tmp_path / "few.jsonl")
    cfg = load_config(
        None,
        [("model_name", str(tiny_llava)), ("dataset", str(few)), ("test_file", str(few)),
         ("data.image_root", str(shapes["images"].parent)), ("output_dir", str(tmp_path / "run")),
         ("num_epochs", "12"), ("batch_size_training", "3"), ("lr", "5e-3"), ("scheduler", "constant"),
         ("lora_config.lora_dropout", "0"), ("keep_last_checkpoints", "0"), ("progress", "False"),
         ("data.max_seq_len", "1024")],
    )  # fmt: skip
    result = finetune(cfg, log=lambda s: None)
    losses = result.train_losses
    assert result.steps == 12 and len(losses) == 12 and len(result.eval_losses) == 13
    assert all(torch.isfinite(torch.tensor(losses + result.eval_losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.eval_losses[-1] < 0.5 * result.eval_losses[0], result.eval_losses


@pytest.mark.slow
def test_overfit_then_greedy_reproduces_answers(tiny_mllama, shapes, tmp_path):
    """A handful of samples: the loss goes to ~0 and greedy decoding gives back the training answers."""
    few = few_records(shapes, tmp_path / "few.jsonl")
    cfg = load_config(
        None,
        [("model_name", str(tiny_mllama)), ("dataset", str(few)), ("test_file", str(few)),
         ("data.image_root", str(shapes["images"].parent)),
         ("output_dir", str(tmp_path / "run")), ("num_epochs", "100"), ("batch_size_training", "3"),
         ("lr", "5e-3"), ("scheduler", "cosine"), ("lora_config.r", "16"), ("lora_config.lora_dropout", "0"),
         ("lora_config.target_modules", "all"), ("run_validation", "False"), ("progress", "False"),
         ("keep_last_checkpoints", "0")],
    )  # fmt: skip
    result = finetune(cfg, log=lambda s: None)
    assert result.train_losses[-1] < 0.05, result.train_losses[-5:]
    processor = load_processor(tiny_mllama)
    from peft import PeftModel

    base, family = load_base_model(tiny_mllama)
    model = PeftModel.from_pretrained(base, str(result.adapter_dir))
    few_samples, _ = load_samples(few, image_root=str(shapes["images"].parent))
    replies = generate(model, processor, family, [(prompt_messages(s), s.images) for s in few_samples], 200)
    for s, reply in zip(few_samples, replies):
        assert reply.strip() == s.messages[-1]["content"][0]["text"].strip()
