"""llama-cookbook's vision fine-tuning command lines, and LLaVA-CoT's, run through ``torchrun
--nproc_per_node 2`` on CPU on the tiny Mllama with a cookbook-style dataset file. Each changes only
the model path and the dataset file and adds ``--max_train_step`` (and, for the lines that are a full
fine-tune in the cookbook, ``--use_peft False``); each leaves what the cookbook would (an adapter for
LoRA, a Hugging Face checkpoint otherwise) and a validation loss that fell."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import cotune
from test_train_e2e import COOKBOOK_FILE

FULL = (
    "--enable_fsdp --lr 1e-5  --num_epochs 3 --batch_size_training 2 --model_name MODEL "
    "--dist_checkpoint_root_folder ./finetuned_model --dist_checkpoint_folder fine-tuned  --use_fast_kernels "
    '--dataset "custom_dataset" --custom_dataset.test_split "test" --custom_dataset.file "DATASET"  '
    "--run_validation True --batching_strategy padding"
)
LINES = {
    "full": FULL + " --use_peft False",
    "lora": FULL + "  --use_peft --peft_method lora",
    "llm_frozen": FULL + " --freeze_LLM_only True --use_peft False",
    "llava_cot": (
        "--enable_fsdp --lr 1e-5  --num_epochs 3 --batch_size_training 4 --model_name MODEL "
        "--dist_checkpoint_root_folder ./finetuned_model --dist_checkpoint_folder LLaVA-CoT --use_fast_kernels "
        '--dataset "custom_dataset" --custom_dataset.test_split "test" --custom_dataset.file "DATASET"  '
        "--run_validation False --batching_strategy padding --use_peft False"
    ),
}
SAVED = {"full": "model", "lora": "adapter", "llm_frozen": "model", "llava_cot": "model"}


@pytest.mark.parametrize("line", list(LINES))
def test_cookbook_line_under_torchrun(line, tiny_mllama, shapes, tmp_path):
    dataset = tmp_path / "datasets" / "ocrvqa_dataset.py"
    dataset.parent.mkdir()
    dataset.write_text(
        COOKBOOK_FILE.replace("DATA_PATH", repr(str(shapes["train"]))).replace(
            "open(dataset_config.data_path)", f"open({str(shapes['train'])!r})"
        )
    )
    args = shlex.split(
        LINES[line].replace("MODEL", str(tiny_mllama)).replace("DATASET", "datasets/ocrvqa_dataset.py")
    )
    args += ["--max_train_step", "6", "--progress", "False"]
    if line == "llava_cot":
        args += ["--test_file", str(shapes["test"])]  # the run doesn't validate: the loss is checked after
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd += ["--master_port", str(port), "-m", "cotune", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cotune.__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = tmp_path / "finetuned_model" / ("LLaVA-CoT" if line == "llava_cot" else "fine-tuned")
    saved = out / SAVED[line]
    assert any(saved.glob("*.safetensors")), sorted(p.name for p in out.iterdir())
    assert "note: without --use_peft" not in done.stdout  # every line here says what it means
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6  # max_train_step counts each process's micro-batches, one per step here
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    if evals:
        assert evals[-1] < evals[0], evals
