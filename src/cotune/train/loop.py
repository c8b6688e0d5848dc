"""The LoRA fine-tuning recipe: ``setup()`` builds everything, ``train()`` is the loop, top to bottom.

Loss convention: every optimizer step minimises the mean cross-entropy over all label tokens of
the step (all micro-batches, all ranks). Each micro-batch's summed loss is divided by that global
token count before backward, so gradient accumulation and data parallelism give the same update
as one large batch.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cotune.config import TrainConfig, save_config
from cotune.data.batching import to_device
from cotune.data.build import DataBundle, build_data
from cotune.data.chat import IGNORE_INDEX
from cotune.data.cookbook import audit_batch
from cotune.models.families import ModelFamily
from cotune.models.load import add_lora, load_base_model, load_processor, resolve_dtype, trainable_parameters
from cotune.runtime import tune_cpu_allocator
from cotune.train import distributed as D
from cotune.train.checkpoint import cleanup_partial, save_adapter
from cotune.train.loss import ChunkedLossModel
from cotune.train.metrics import MetricsLog, Throughput, perplexity, plot_loss

MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "labels",
    "pixel_values",
    "aspect_ratio_ids",
    "aspect_ratio_mask",
    "cross_attention_mask",
)


@dataclass
class Run:
    """Everything ``setup`` builds for ``train``."""

    cfg: TrainConfig
    dist: D.DistInfo
    processor: Any
    family: ModelFamily
    model: torch.nn.Module  # the PEFT model (what is saved)
    loss_model: torch.nn.Module  # what is called in the loop
    data: DataBundle
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    out: Path
    metrics: MetricsLog
    base_dtype: torch.dtype
    steps_per_epoch: int
    log: Any = print


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    output_dir: Path
    adapter_dir: Path | None
    best_adapter_dir: Path | None
    steps: int
    eval_losses: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int, total_steps: int):
    """constant / linear / cosine (after linear warm-up), or cookbook's per-epoch StepLR ('step')."""
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if cfg.scheduler == "step":
            return cfg.gamma ** (step // max(steps_per_epoch, 1))
        if warm and step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(total_steps - warm, 1)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 (or fp16) autocast on GPUs; on CPU, plain fp32 (bf16 there is slower, not faster)."""
    if cfg.mixed_precision and device.type == "cuda":
        dtype = torch.float16 if cfg.use_fp16 else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def setup(cfg: TrainConfig, log=print) -> Run:
    """Builds processor, model + LoRA, data, optimizer and schedule from ``cfg``."""
    dist = D.init_distributed()
    if dist.device.type == "cpu":
        tune_cpu_allocator()
    quiet = (lambda *a, **k: None) if not dist.is_main else log
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cleanup_partial(out)

    processor = load_processor(cfg.tokenizer_name or cfg.model_name)
    dtype_name = "bf16" if cfg.pure_bf16 else cfg.torch_dtype
    base_dtype = resolve_dtype(dtype_name, dist.device)
    model, family = load_base_model(cfg.model_name, base_dtype, sdpa=cfg.use_fast_kernels, device=dist.device)
    torch.manual_seed(cfg.seed)  # LoRA init does not depend on how much randomness loading used
    peft_model = add_lora(model, family, cfg.lora_config, from_checkpoint=cfg.from_peft_checkpoint)
    if cfg.gradient_checkpointing:
        peft_model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    peft_model.train()
    trainable, total = trainable_parameters(peft_model)
    quiet(
        f"model: {cfg.model_name} ({family.name}, {base_dtype}); LoRA trains {trainable:,} of {total:,} parameters"
    )

    data = build_data(cfg, processor, family, dist.rank, dist.world_size, log=quiet)
    for line in data.report:
        quiet(f"data: {line}")
    steps_per_epoch = max(1, len(data.train) // cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.num_epochs
    if cfg.max_train_step:
        total_steps = min(total_steps, cfg.max_train_step)
    global_batch = cfg.batch_size_training * cfg.gradient_accumulation_steps * dist.world_size
    quiet(
        f"batch: {cfg.batch_size_training} per process x {cfg.gradient_accumulation_steps} accumulation x "
        f"{dist.world_size} processes = {global_batch} samples per step; {total_steps} steps"
    )

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch, total_steps)
    if dist.is_main:
        save_config(cfg, out / "config.yaml")
    metrics = MetricsLog(out / "metrics.jsonl" if (dist.is_main and cfg.save_metrics) else None)
    return Run(
        cfg=cfg,
        dist=dist,
        processor=processor,
        family=family,
        model=peft_model,
        loss_model=ChunkedLossModel(peft_model),
        data=data,
        optimizer=optimizer,
        scheduler=scheduler,
        out=out,
        metrics=metrics,
        base_dtype=base_dtype,
        steps_per_epoch=steps_per_epoch,
        log=quiet,
    )


def _model_inputs(batch: dict, run: Run) -> dict:
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
    return to_device(inputs, run.dist.device, float_dtype=run.base_dtype)


def _label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def evaluate(run: Run) -> float:
    """Token-weighted mean validation loss over the whole validation set (all ranks)."""
    cfg, model = run.cfg, run.loss_model
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=run.dist.device)
    with torch.no_grad():
        for i, batch in enumerate(run.data.val):
            if cfg.max_eval_step and i >= cfg.max_eval_step:
                break
            if batch.get("empty"):
                continue
            with autocast(cfg, run.dist.device):
                loss_sum, n = model(**_model_inputs(batch, run))
            totals += torch.stack([loss_sum.double(), n.double()])
    model.train()
    D.all_reduce_sum(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def _save(run: Run, where: Path) -> Path | None:
    if not run.dist.is_main:
        return None
    return save_adapter(run.model, where, extra=lambda tmp: run.processor.save_pretrained(str(tmp)))


def _accumulation_groups(loader, size: int):
    """Yields lists of ``size`` consecutive batches (the last group may be shorter)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def train(run: Run) -> TrainResult:
    """Runs the epochs; validates, logs and saves as configured. Returns what it produced."""
    cfg, dist, model = run.cfg, run.dist, run.loss_model
    start = time.perf_counter()
    result = TrainResult(output_dir=run.out, adapter_dir=None, best_adapter_dir=None, steps=0)
    best = float("inf")
    total_steps = run.steps_per_epoch * cfg.num_epochs
    if cfg.max_train_step:
        total_steps = min(total_steps, cfg.max_train_step)

    def validate(step: int, epoch: int) -> None:
        nonlocal best
        loss = evaluate(run)
        result.eval_losses.append(loss)
        run.metrics.write(step=step, epoch=epoch, eval_loss=loss, eval_perplexity=perplexity(loss))
        run.log(f"validation at step {step}: loss {loss:.4f}, perplexity {perplexity(loss):.2f}")
        if cfg.save_model and step > 0 and loss < best:
            result.best_adapter_dir = _save(run, run.out / "best_adapter")
        best = min(best, loss) if step > 0 else best

    if cfg.run_validation and run.data.val is not None:
        validate(0, 0)  # the base model's loss: the reference the adapter must beat

    scaler = torch.amp.GradScaler("cuda") if (cfg.use_fp16 and dist.device.type == "cuda") else None
    meter = Throughput()
    bar = tqdm(
        total=total_steps, desc="training", disable=not (dist.is_main and cfg.progress), dynamic_ncols=True
    )
    step, audited, done = 0, not run.data.cookbook, False
    for epoch in range(cfg.num_epochs):
        if hasattr(run.data.train_sampler, "set_epoch"):
            run.data.train_sampler.set_epoch(epoch)
        for group in _accumulation_groups(run.data.train, cfg.gradient_accumulation_steps):
            for batch in group:
                for msg in batch.pop("skipped", []):
                    run.log(f"warning: skipped {msg}")
            group = [b for b in group if not b.get("empty")]
            if not audited and group:
                for w in audit_batch(
                    group[0], run.processor.tokenizer, run.family.image_token_id(run.processor.tokenizer)
                ):
                    run.log(f"warning: dataset file: {w}")
                audited = True
            # the step's loss is the mean over every label token of the step, on every rank
            counts = torch.tensor([float(sum(_label_tokens(b) for b in group))], device=dist.device)
            n_step = float(D.all_reduce_sum(counts)[0])
            if n_step == 0:
                continue
            step_loss = torch.zeros((), dtype=torch.float64, device=dist.device)
            for batch in group:
                inputs = _model_inputs(batch, run)
                meter.add(int(batch["attention_mask"].sum()) * dist.world_size)
                with autocast(cfg, dist.device):
                    loss_sum, _ = model(**inputs)
                loss = loss_sum * dist.world_size / n_step  # data-parallel gradients are averaged over ranks
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += loss_sum.detach().double()
            if scaler:
                scaler.unscale_(run.optimizer)
            grad_norm = None
            if cfg.gradient_clipping:
                params = [p for p in run.model.parameters() if p.requires_grad]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.gradient_clipping_threshold))
            if scaler:
                scaler.step(run.optimizer)
                scaler.update()
            else:
                run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            lr = run.scheduler.get_last_lr()[0]
            run.scheduler.step()
            step += 1
            mean_loss = float(D.all_reduce_sum(step_loss)) / n_step
            result.train_losses.append(mean_loss)
            if step % cfg.log_every_steps == 0:
                tps = meter.rate()
                record = dict(step=step, epoch=epoch, loss=mean_loss, lr=lr, tokens_per_s=round(tps, 1))
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                run.metrics.write(**record)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            bar.update(1)
            if (
                cfg.run_validation
                and run.data.val is not None
                and cfg.eval_every_steps
                and step % cfg.eval_every_steps == 0
            ):
                validate(step, epoch)
            if cfg.max_train_step and step >= cfg.max_train_step:
                done = True
                break
        if (
            cfg.run_validation
            and run.data.val is not None
            and not (cfg.eval_every_steps and step % cfg.eval_every_steps == 0)
        ):
            validate(step, epoch)
        if done:
            break
    bar.close()
    result.steps = step
    if cfg.save_model:
        result.adapter_dir = _save(run, run.out / "adapter")
    if dist.is_main and cfg.save_metrics:
        plot_loss(run.out / "metrics.jsonl", run.out / "loss.png")
    result.seconds = time.perf_counter() - start
    D.barrier()
    return result


def finetune(cfg: TrainConfig, log=print) -> TrainResult:
    """setup + train + cleanup: what ``cotune train`` runs."""
    run = setup(cfg, log=log)
    try:
        result = train(run)
    finally:
        D.cleanup()
    if run.dist.is_main:
        log(f"adapter: {result.adapter_dir}")
        if result.best_adapter_dir:
            log(f"best adapter (lowest validation loss): {result.best_adapter_dir}")
        log(f"metrics: {run.out / 'metrics.jsonl'}; plot: {run.out / 'loss.png'}")
    return result
