"""The LoRA fine-tuning recipe: ``setup()`` builds everything, ``train()`` is the loop, top to bottom.

Loss convention: every optimizer step minimises the mean cross-entropy over all label tokens of
the step (all micro-batches, all ranks). Each micro-batch's summed loss is divided by that global
token count before backward, so gradient accumulation and data parallelism give the same update
as one large batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cotune.config import TrainConfig, save_config
from cotune.data.batching import count_tokens, to_device
from cotune.data.build import DataBundle, build_data
from cotune.data.cookbook import audit_batch
from cotune.files import cleanup_partial
from cotune.models.families import ModelFamily, layer_modules
from cotune.models.load import (
    add_lora,
    load_base_model,
    load_processor,
    resolve_dtype,
    trainable_parameters,
)
from cotune.runtime import tune_cpu_allocator
from cotune.train import distributed as D
from cotune.train import resume as R
from cotune.train.checkpoint import save_adapter
from cotune.train.loss import ChunkedLossModel
from cotune.train.metrics import MetricsLog, Throughput, perplexity, plot_loss, read_metrics
from cotune.train.step import (
    accumulation_groups,
    autocast,
    build_scheduler,
    label_tokens,
    optimizer_step,
    optimizer_steps_per_epoch,
    stand_in_batch,
    usable_batches,
    validation_loss,
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
    log: Any = print  # the first process's lines; silent on the others
    warn: Any = print  # every process's warnings (records skipped there), prefixed with the rank
    sharded: bool = False  # FSDP2: parameters are DTensors, the adapter is gathered to save it
    resumed: R.TrainerState | None = None  # the checkpoint this run continues, if any
    resumed_from: Path | None = None


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


def setup(cfg: TrainConfig, log=print) -> Run:
    """Builds processor, model + LoRA, data, optimizer and schedule from ``cfg``."""
    dist = D.init_distributed(fsdp=cfg.enable_fsdp)
    # several processes always shard: without it their gradients would never be combined
    sharded = cfg.enable_fsdp or dist.enabled
    if dist.device.type == "cpu":
        tune_cpu_allocator()
    quiet = (lambda *a, **k: None) if not dist.is_main else log
    R.seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cleanup_partial(out)
        cleanup_partial(out / R.CHECKPOINTS)
    resume_from = R.checkpoint_to_resume(out, cfg.resume, dist.is_main)

    processor = load_processor(cfg.tokenizer_name or cfg.model_name)
    dtype_name = "bf16" if cfg.pure_bf16 else cfg.torch_dtype
    base_dtype = resolve_dtype(dtype_name, dist.device)
    # low_cpu_fsdp: one copy of the base in host memory, not one per process
    from_rank0 = sharded and dist.enabled and cfg.low_cpu_fsdp
    if from_rank0 and cfg.fsdp_config.cpu_offload:  # offloaded shards are not allocated on the device
        quiet(
            "warning: low_cpu_fsdp is not combined with fsdp_config.cpu_offload: every process reads the checkpoint"
        )
        from_rank0 = False
    model, family = load_base_model(
        cfg.model_name,
        base_dtype,
        sdpa=cfg.use_fast_kernels,
        device=dist.device,
        on_meta=from_rank0 and not dist.is_main,
    )
    torch.manual_seed(cfg.seed)  # LoRA init does not depend on how much randomness loading used
    peft_model = add_lora(model, family, cfg.lora_config, from_checkpoint=cfg.from_peft_checkpoint)
    layers = layer_modules(peft_model, family)  # text decoder and vision encoder layers
    if cfg.gradient_checkpointing and not sharded:  # under FSDP: wrap_fsdp checkpoints the same layers
        D.checkpoint_activations(layers)
    peft_model.train()
    trainable, total = trainable_parameters(peft_model)
    quiet(
        f"model: {cfg.model_name} ({family.name}, {base_dtype}); LoRA trains {trainable:,} of {total:,} parameters"
    )

    data = build_data(cfg, processor, family, dist.rank, dist.world_size, log=quiet)
    for line in data.report:
        quiet(f"data: {line}")
    steps_per_epoch = optimizer_steps_per_epoch(len(data.train), cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.num_epochs
    if cfg.max_train_step:
        total_steps = min(total_steps, cfg.max_train_step)
    global_batch = cfg.batch_size_training * cfg.gradient_accumulation_steps * dist.world_size
    quiet(
        f"batch: {cfg.batch_size_training} per process x {cfg.gradient_accumulation_steps} accumulation x "
        f"{dist.world_size} processes = {global_batch} samples per step; {total_steps} steps"
    )

    loss_model = ChunkedLossModel(peft_model, family=family)
    if sharded:  # after add_lora (LoRA weights fp32, the same on every rank), before the optimizer
        quiet(
            D.shard_for_training(
                loss_model, layers, cfg.fsdp_config, dist, cfg.gradient_checkpointing, from_rank0
            )
        )
        if dist.enabled:
            torch.manual_seed(cfg.seed + dist.rank)  # dropout masks differ between ranks
        if dist.enabled and family.dummy_image_inputs is None:
            quiet(
                f"warning: {family.name}: a batch with images on some processes and none on others would hang"
            )
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch, total_steps)
    resumed = None
    if resume_from is not None:
        resumed = R.load_checkpoint(resume_from, loss_model, optimizer, scheduler)
        quiet(f"resuming from {resume_from}: step {resumed.step}, epoch {resumed.epoch}")
    elif cfg.resume == "auto":
        quiet(f"resume: no checkpoint in {out / R.CHECKPOINTS} yet; starting from the beginning")
    if dist.is_main:
        save_config(cfg, out / "config.yaml")
        if resumed is not None and cfg.save_metrics:
            R.truncate_metrics(out / "metrics.jsonl", resumed.metrics_bytes)
        for newer in R.drop_newer_checkpoints(out, resumed.step) if resumed is not None else []:
            quiet(f"removed {newer}: it continued the run from a later point than the one resumed")
    metrics = MetricsLog(
        out / "metrics.jsonl" if (dist.is_main and cfg.save_metrics) else None, resume=resumed is not None
    )
    return Run(
        cfg=cfg,
        dist=dist,
        processor=processor,
        family=family,
        model=peft_model,
        loss_model=loss_model,
        data=data,
        optimizer=optimizer,
        scheduler=scheduler,
        out=out,
        metrics=metrics,
        base_dtype=base_dtype,
        steps_per_epoch=steps_per_epoch,
        log=quiet,
        warn=log if dist.is_main else (lambda msg: log(f"[rank {dist.rank}] {msg}")),
        sharded=sharded,
        resumed=resumed,
        resumed_from=resume_from,
    )


def _model_inputs(batch: dict, run: Run) -> dict:
    """The batch's inputs for the forward (the family's keys), on the device.

    Several processes: every rank must run the vision layers' FSDP collectives, so a batch without
    images gets the family's dummy image inputs.
    """
    config = run.model.get_base_model().config if run.dist.enabled else None
    inputs = run.family.model_inputs(batch, dummy_images_for=config)
    return to_device(inputs, run.dist.device, float_dtype=run.base_dtype)


def _save(run: Run, where: Path, with_processor: bool = True) -> Path | None:
    """Writes the adapter (PEFT format) on rank 0; under FSDP every rank takes part in gathering it."""
    state = D.gather_trainable_state(run.model) if run.sharded else None
    if not run.dist.is_main:
        return None
    extra = (lambda tmp: run.processor.save_pretrained(str(tmp))) if with_processor else None
    return save_adapter(run.model, where, state_dict=state, extra=extra)


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
        loss = validation_loss(
            model, run.data.val, lambda b: _model_inputs(b, run), cfg, dist.device, stand_in, run.warn
        )
        result.eval_losses.append(loss)
        run.metrics.write(step=step, epoch=epoch, eval_loss=loss, eval_perplexity=perplexity(loss))
        run.log(f"validation at step {step}: loss {loss:.4f}, perplexity {perplexity(loss):.2f}")
        if cfg.save_model and step > 0 and loss < best:
            result.best_adapter_dir = _save(run, run.out / "best_adapter")
        best = min(best, loss) if step > 0 else best

    # several processes: a batch whose items all failed to load is replaced, never skipped alone
    stand_in = stand_in_batch(run.processor.tokenizer.bos_token_id) if dist.enabled else None
    scaler = torch.amp.GradScaler("cuda") if (cfg.use_fp16 and dist.device.type == "cuda") else None
    global_batch = cfg.batch_size_training * dist.world_size  # samples per loader batch, all ranks
    step, start_epoch, skip, resumed = 0, 0, 0, run.resumed
    if resumed is not None:  # continue where the checkpoint was written (setup loaded the weights)
        step, best = resumed.step, resumed.best_eval_loss
        start_epoch, skip, warning = R.resume_position(resumed, global_batch)
        if warning:
            run.log(f"warning: {warning}")
        if scaler is not None and resumed.scaler:
            scaler.load_state_dict(resumed.scaler)
        if run.metrics.path is not None:
            rows = read_metrics(run.metrics.path)
            result.train_losses = [r["loss"] for r in rows if "loss" in r]
            result.eval_losses = [r["eval_loss"] for r in rows if "eval_loss" in r]
    elif cfg.run_validation and run.data.val is not None:
        validate(0, 0)  # the base model's loss: the reference the adapter must beat

    def checkpoint(epoch: int, batches_done: int, epoch_complete: bool) -> None:
        """A resumable checkpoint, with the adapter inside it (collective: every rank calls it)."""
        if cfg.keep_last_checkpoints <= 0:
            return
        size = run.metrics.path.stat().st_size if run.metrics.path and run.metrics.path.exists() else None
        state = R.TrainerState(
            step=step,
            epoch=epoch,
            batches_done=batches_done,
            epoch_complete=epoch_complete,
            best_eval_loss=best,
            metrics_bytes=size,
            world_size=dist.world_size,
            global_batch=global_batch,
            scheduler=run.scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler else None,
        )
        where = R.save_checkpoint(
            model,
            run.optimizer,
            state,
            run.out,
            cfg.keep_last_checkpoints,
            dist.rank,
            write_adapter=lambda d: _save(run, d, with_processor=False),
        )
        run.log(f"checkpoint: {where} (step {step})")

    meter = Throughput()
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="training",
        disable=not (dist.is_main and cfg.progress),
        dynamic_ncols=True,
    )
    audited, done = not run.data.cookbook, bool(cfg.max_train_step and step >= cfg.max_train_step)
    epoch_batches = len(run.data.train)
    for epoch in range(start_epoch, cfg.num_epochs):
        if done:
            break
        if hasattr(run.data.train_sampler, "set_epoch"):
            run.data.train_sampler.set_epoch(epoch)
        resuming = resumed is not None and epoch == start_epoch  # the epoch the checkpoint stopped in
        checkpoint_dir = run.resumed_from if resuming else None
        batches = R.epoch_batches(
            run.data.train, skip, checkpoint_dir, resumed, dist.rank, cfg.seed + dist.rank
        )
        batches_done, skip = skip, 0
        for group in accumulation_groups(batches, cfg.gradient_accumulation_steps):
            batches_done += len(group)
            group = usable_batches(group, stand_in, run.warn)
            real = [b for b in group if not b.get("stand_in")]
            if not audited and real:
                for w in audit_batch(
                    real[0], run.processor.tokenizer, run.family.image_token_id(run.processor.tokenizer)
                ):
                    run.log(f"warning: dataset file: {w}")
                audited = True
            # the step's loss is the mean over every label token of the step, on every rank
            counts = torch.tensor([float(sum(label_tokens(b) for b in group))], device=dist.device)
            n_step = float(D.all_reduce_sum(counts)[0])
            if n_step == 0:
                continue
            step_loss = torch.zeros((), dtype=torch.float64, device=dist.device)
            for batch in group:
                inputs = _model_inputs(batch, run)
                meter.add(count_tokens(batch) * dist.world_size)
                with autocast(cfg, dist.device):
                    loss_sum, _ = model(**inputs)
                loss = loss_sum * dist.world_size / n_step  # data-parallel gradients are averaged over ranks
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += loss_sum.detach().double()
            clip = cfg.gradient_clipping_threshold if cfg.gradient_clipping else None
            lr, grad_norm = optimizer_step(run.model, run.optimizer, run.scheduler, scaler, clip)
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
            done = bool(cfg.max_train_step and step >= cfg.max_train_step)
            if done:
                break
            if cfg.save_every_steps and step % cfg.save_every_steps == 0 and batches_done < epoch_batches:
                checkpoint(epoch, batches_done, epoch_complete=False)
        if (
            cfg.run_validation
            and run.data.val is not None
            and not (cfg.eval_every_steps and step % cfg.eval_every_steps == 0)
        ):
            validate(step, epoch)
        # after the epoch's validation, so that a resumed run neither repeats nor skips it
        checkpoint(epoch, batches_done, epoch_complete=batches_done >= epoch_batches)
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
