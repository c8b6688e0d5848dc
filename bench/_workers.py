"""The two sides of the training benchmark, each meant to run in its own process.

``run_cotune`` trains through cotune's own recipe (``cotune.train.loop.setup`` + ``train``: chunked
loss, its collator, its optimizer step). ``run_hf`` trains the same checkpoint with
``transformers.Trainer`` on a PEFT model, the path TRL users take: full logits and HF's loss. With
``BenchSpec.quantization`` both train QLoRA on the same bitsandbytes 4-bit base. Both
read the same JSONL through cotune's data step and see the same batches in the same order, so only
the training machinery differs.

Each side records, per optimizer step, the non-pad input tokens (a forward pre-hook reads the
``attention_mask`` the model is called with) and the time the step ended (an optimizer post-hook for
cotune, ``on_step_end`` for Trainer), and at the end the process's peak memory.

Run as a script: ``python bench/_workers.py SIDE SPEC_JSON OUT_JSON``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every text layer's attention projections (self- and cross-attention), the same on both sides.
TEXT_ATTENTION_QKVO = r"model\.language_model\.layers\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)_proj"


@dataclass
class BenchSpec:
    """What both sides train: the same model, data, LoRA and optimizer settings."""

    model_dir: str
    train_file: str
    test_file: str
    work_dir: str
    seq_len: int = 1024
    batch_size: int = 2
    warmup_steps: int = 2
    measured_steps: int = 6
    lr: float = 1e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: str = TEXT_ATTENTION_QKVO
    max_grad_norm: float = 1.0
    seed: int = 42
    # cotune's setup() tunes glibc's allocator on CPU (cotune.runtime.tune_cpu_allocator);
    # "cotune": as each side runs by itself, "both": HF's process gets the same tuning, "neither"
    allocator: str = "cotune"
    # "4bit": QLoRA, the same bitsandbytes NF4 base on both sides (cotune's loader: the family's
    # unquantized modules, nf4, double quant, compute in the base dtype); "": the base as it is
    quantization: str = ""

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.measured_steps


@dataclass
class StepClock:
    """Per-step token counts and end times; the measured window excludes the warm-up steps."""

    device: torch.device
    tokens: list[int] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    cpu_ends: list[float] = field(default_factory=list)
    loaded_rss_mb: float = 0.0

    def count_tokens(self, module, args, kwargs) -> None:  # forward pre-hook (with_kwargs=True)
        if module.training and kwargs.get("attention_mask") is not None:
            self.tokens.append(int(kwargs["attention_mask"].sum()))

    def step_end(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())  # all threads: less sensitive to other load

    def mark_loaded(self) -> None:
        """Memory once model, LoRA and data are ready, before the first step."""
        self.loaded_rss_mb = current_rss_mb()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def summary(self, warmup: int, losses: list[float]) -> dict[str, Any]:
        if len(self.ends) <= warmup or len(self.tokens) < len(self.ends):
            raise RuntimeError(f"ran {len(self.ends)} steps, {len(self.tokens)} forwards; need > {warmup}")
        if warmup < 1:
            raise ValueError("need at least one warm-up step (it marks the start of the measured window)")
        seconds = self.ends[-1] - self.ends[warmup - 1]
        cpu_seconds = self.cpu_ends[-1] - self.cpu_ends[warmup - 1]
        tokens = sum(self.tokens[warmup : len(self.ends)])
        out = {
            "steps": len(self.ends),
            "measured_steps": len(self.ends) - warmup,
            "measured_tokens": tokens,
            "measured_seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu_seconds,
            "step_seconds": [b - a for a, b in zip(self.ends, self.ends[1:])],
            "losses": losses,
            "device": str(self.device),
            "loaded_rss_mb": self.loaded_rss_mb,
            "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(),
        }
        if self.device.type == "cuda":
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cotune_config(spec: BenchSpec, output_dir: str) -> Any:
    """The cotune ``TrainConfig`` of the benchmark (also used by the HF side to build the same data)."""
    from cotune.config import LoraConfig, TrainConfig

    cfg = TrainConfig(
        model_name=spec.model_dir,
        dataset=spec.train_file,
        output_dir=output_dir,
        run_validation=False,
        batch_size_training=spec.batch_size,
        num_epochs=1,
        max_train_step=spec.total_steps,
        lr=spec.lr,
        weight_decay=0.0,
        scheduler="constant",
        gradient_clipping=spec.max_grad_norm > 0,
        gradient_clipping_threshold=spec.max_grad_norm or 1.0,
        seed=spec.seed,
        torch_dtype="auto",
        gradient_checkpointing=False,
        save_model=False,
        save_metrics=False,
        progress=False,
        lora_config=LoraConfig(
            r=spec.lora_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=spec.target_modules,
        ),
    )
    cfg.data.test_file = spec.test_file
    cfg.data.max_seq_len = spec.seq_len
    cfg.quantization = spec.quantization
    return cfg


def run_cotune(spec: BenchSpec) -> dict[str, Any]:
    """cotune's real recipe: ``setup`` then ``train`` with ``max_train_step``."""
    from cotune.train.loop import setup, train

    cfg = cotune_config(spec, str(Path(spec.work_dir) / "cotune_run"))
    if spec.allocator == "neither":
        import cotune.train.loop

        cotune.train.loop.tune_cpu_allocator = lambda: False
    run = setup(cfg, log=lambda *a, **k: None)
    clock = StepClock(run.dist.device)
    run.loss_model.register_forward_pre_hook(clock.count_tokens, with_kwargs=True)
    run.optimizer.register_step_post_hook(lambda *_: clock.step_end())
    clock.mark_loaded()
    result = train(run)
    return clock.summary(spec.warmup_steps, result.train_losses)


class _InOrder(torch.utils.data.Dataset):
    """``dataset`` read in a fixed order (cotune's batch order), for Trainer's sequential sampler."""

    def __init__(self, dataset: torch.utils.data.Dataset, order: list[int]) -> None:
        self.dataset, self.order = dataset, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.order[i]]


def run_hf(spec: BenchSpec) -> dict[str, Any]:
    """transformers.Trainer + PEFT on the same checkpoint, batches and LoRA/optimizer settings."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from cotune.data.build import build_data
    from cotune.models.load import load_base_model, load_processor, resolve_dtype
    from cotune.train.distributed import init_distributed

    device = init_distributed().device
    if spec.allocator == "both" and device.type == "cpu":
        from cotune.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    cfg = cotune_config(spec, str(Path(spec.work_dir) / "hf_run"))
    torch.manual_seed(spec.seed)
    processor = load_processor(spec.model_dir)
    dtype = resolve_dtype("auto", device)
    model, family = load_base_model(
        spec.model_dir, dtype, sdpa=True, device=device, quantization=cfg.quantization,
        quantization_config=cfg.quantization_config,
    )  # fmt: skip
    torch.manual_seed(spec.seed)  # as cotune's setup does before adding LoRA: the same initial adapter
    lora = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=spec.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    data = build_data(cfg, processor, family, log=lambda *a, **k: None)
    order = [i for batch in data.train_sampler.global_batches() for i in batch]
    train_ds = _InOrder(data.train.dataset, order)

    clock = StepClock(device)
    model.register_forward_pre_hook(clock.count_tokens, with_kwargs=True)
    losses: list[float] = []

    class Measure(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_end()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=str(Path(spec.work_dir) / "hf_run"),
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1,
        max_steps=spec.total_steps,
        learning_rate=spec.lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        max_grad_norm=spec.max_grad_norm,
        seed=spec.seed,
        bf16=device.type == "cuda" and dtype == torch.bfloat16,
        use_cpu=device.type != "cuda",
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=device.type == "cuda",
        remove_unused_columns=False,
        train_sampling_strategy="sequential",
        label_names=["labels"],
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=data.train.collate_fn,
        callbacks=[Measure()],
    )
    clock.mark_loaded()
    trainer.train()
    return clock.summary(spec.warmup_steps, losses)


SIDES = {"cotune": run_cotune, "hf": run_hf}


def main(argv: list[str]) -> None:
    side, spec_path, out_path = argv
    spec = BenchSpec(**json.loads(Path(spec_path).read_text()))
    result = SIDES[side](spec)
    Path(out_path).write_text(json.dumps(result, indent=1))


def write_spec(spec: BenchSpec, path: Path) -> Path:
    path.write_text(json.dumps(asdict(spec)))
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
