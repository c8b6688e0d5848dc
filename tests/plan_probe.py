"""Measures what one training step adds to a loaded model's memory on CPU (run as a script by test_plan.py).

Method: glibc serves every allocation above 64 KiB with its own mmap and unmaps it on free
(MALLOC_MMAP_THRESHOLD_ fixed by the caller, and cotune's tune_cpu_allocator not called), so the
process's resident set follows the live tensors. After loading the model, attaching LoRA (or, with
``use_peft: False``, choosing a full fine-tune's weights) and building the batch, the resident set is
read; two steps (forward, backward, AdamW step) run, the kernel's peak-RSS mark reset
(``/proc/self/clear_refs`` = 5) before each; the step's memory is the second step's peak (VmHWM)
minus the resident set before the first: a later step also holds the AdamW moments the first made.

usage: python plan_probe.py CONFIG.yaml BATCH SEQ  -> prints the bytes
"""

from __future__ import annotations

import gc
import sys

import torch

from cotune.config import load_config
from cotune.models.families import layer_modules
from cotune.models.load import add_lora, load_base_model
from cotune.train.distributed import checkpoint_activations
from cotune.train.loss import ChunkedLossModel


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(config: str, batch: int, seq: int) -> int:
    torch.set_num_threads(1)
    cfg = load_config(config)
    model, family = load_base_model(
        cfg.model_name,
        torch.float32,
        quantization=cfg.quantization,
        quantization_config=cfg.quantization_config,
    )
    if cfg.use_peft:
        peft = add_lora(model, family, cfg.lora_config)
    else:  # a full fine-tune: the base's own weights train (fp32 here: no master weights on top)
        from cotune.train.loop import choose_trainable

        peft = choose_trainable(model, cfg)
    if cfg.gradient_checkpointing:
        checkpoint_activations(layer_modules(peft, family))
    peft.train()
    loss_model = ChunkedLossModel(peft, family=family)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    gc.collect()
    before = status("VmRSS")
    for _ in range(2):  # the second step is every later one's: AdamW's moments exist from the first on
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        loss_sum, n = loss_model(**inputs)
        (loss_sum / n).backward()
        optimizer.step()
    return status("VmHWM") - before


if __name__ == "__main__":
    print(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
