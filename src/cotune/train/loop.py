"""The LoRA fine-tuning recipe: ``setup()`` builds everything, ``train()`` is the loop, top to bottom.

``setup`` returns a ``Run``: what the loop reads (configuration, model, data, optimizer, ...).
``train`` keeps what it changes in a ``LoopState`` (step, epoch, position in the epoch, best
validation loss, the losses so far) and calls named steps, each a function of the run and the
state: ``train_step`` (one optimizer step over an accumulation group), ``log_step``, ``validate``
and ``checkpoint``. No step keeps state of its own.

Loss convention: every optimizer step minimises the mean of the objective (``train/objectives.py``,
``cfg.method``: SFT's cross-entropy per label token, DPO's loss per pair) over all its units in the
step (all micro-batches, all ranks). Each micro-batch's summed loss is divided by that global
count of units before backward, so gradient accumulation and data parallelism give the same update
as one large batch.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from cotune.config import ConfigError, TrainConfig, save_config, to_dict
from cotune.data.batching import count_tokens, to_device
from cotune.data.build import DataBundle, build_data
from cotune.data.cookbook import audit_batch
from cotune.files import cleanup_partial
from cotune.models.families import ModelFamily, layer_modules, trained_in_full_finetune
from cotune.models.load import add_lora, load_base_model, load_processor, resolve_dtype, trainable_parameters
from cotune.models.quant import sharded_quantization
from cotune.runtime import trim_cpu_heap, tune_cpu_allocator
from cotune.train import distributed, resume, task_metrics
from cotune.train.anyprecision import AnyPrecisionAdamW
from cotune.train.checkpoint import save_adapter, save_model
from cotune.train.loss import ChunkedLossModel
from cotune.train.metrics import (
    MetricsLog,
    Throughput,
    perplexity,
    plot_loss,
    read_metrics,
    write_cookbook_metrics,
)
from cotune.train.objectives import REFERENCE, attach_reference, build_objective
from cotune.train.profiling import StepProfiler
from cotune.train.step import (
    HeldOut,
    accumulation_groups,
    autocast,
    batch_label_stages,
    build_scheduler,
    fused_adamw,
    keeps_master_weights,
    optimizer_step,
    optimizer_steps_per_epoch,
    stand_in_batch,
    usable_batches,
)
from cotune.train.trackers import Trackers, open_trackers


@dataclass
class Run:
    """Everything ``setup`` builds for ``train``. The loop sets none of its fields: what it changes is
    in ``LoopState`` (and in the model, optimizer, scheduler and scaler themselves)."""

    cfg: TrainConfig
    dist: distributed.DistInfo
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
    steps_per_epoch: int  # optimizer steps in an epoch
    total_steps: int  # optimizer steps of the whole run (``max_train_step`` taken into account)
    scaler: torch.amp.GradScaler | None = None  # fp16 on a GPU
    stand_in: dict | None = None  # several processes: runs in place of a batch whose items all failed
    log: Callable[[str], None] = print  # the first process's lines; silent on the others
    warn: Callable[[str], None] = print  # every process's warnings (records skipped there), with the rank
    sharded: bool = False  # FSDP2: parameters are DTensors, the adapter is gathered to save it
    resumed: resume.TrainerState | None = None  # the checkpoint this run continues, if any
    resumed_from: Path | None = None
    trackers: Trackers = field(default_factory=Trackers)
    task: task_metrics.TaskSubset | None = None  # eval_generate_samples: questions answered at validation
    started: str = field(
        default_factory=lambda: time.strftime("%Y-%m-%d_%H-%M-%S")
    )  # names save_metrics' JSON  # report_to (first process; none elsewhere)
    objective: Any = None  # what a step minimises: objectives.SFT or objectives.DPO (cfg.method)

    @property
    def global_batch(self) -> int:
        """Samples per loader batch over all processes (the data's global batch; checkpoints record it)."""
        return self.cfg.batch_size_training * self.dist.world_size

    @property
    def validates(self) -> bool:
        """Validation is on and there is a validation set."""
        return bool(self.cfg.run_validation and self.data.val is not None)


@dataclass
class LoopState:
    """What ``train`` changes as it runs.

    Attributes:
        step: optimizer steps done.
        epoch: the epoch being run.
        batches_done: loader batches of ``epoch`` consumed (the same count on every rank), those a
            resumed run skipped included.
        best_eval_loss: lowest validation loss after a step (decides ``best_adapter``).
        train_losses: each optimizer step's mean loss (a resumed run's earlier ones first).
        eval_losses: each validation's loss (likewise).
        best_adapter_dir: where ``best_adapter`` was written (first process), once it was.
        audited: the first batch of a cookbook dataset file was checked (or needs no check).
        val_stages: the LLaVA-CoT stages of the validation rows' label tokens, decoded once
            (``batch_label_stages``).
    """

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    best_eval_loss: float = math.inf
    train_losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    best_adapter_dir: Path | None = None
    best_eval_accuracy: float = -math.inf  # highest task accuracy after a step (best_adapter_metric accuracy)
    audited: bool = False
    val_stages: dict = field(default_factory=dict)


class StepStats(NamedTuple):
    """What one optimizer step measured."""

    loss: float  # mean over the step's label tokens, all ranks
    lr: float  # the learning rate the update used
    grad_norm: float | None  # before clipping; None without clipping
    tokens: int  # real tokens of the step, all ranks
    extra: dict = {}  # the objective's statistics (DPO: rewards, margins, log-probs), means over the step


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


# ----------------------------------------------------------------------------- setup


def setup(cfg: TrainConfig, log=print) -> Run:
    """Builds processor, model + LoRA, data, optimizer and schedule from ``cfg``.

    Args:
        cfg: the run's configuration.
        log: where lines go: the first process's, and every process's warnings (with the rank).
    """
    dist = distributed.init_distributed(fsdp=cfg.enable_fsdp)
    # several processes always shard: without it their gradients would never be combined
    sharded = cfg.enable_fsdp or dist.enabled
    main_log = log if dist.is_main else _silent
    resume.seed_everything(cfg.seed)
    out = _prepare_output_dir(cfg, dist)
    resume_from = resume.checkpoint_to_resume(out, cfg.resume, dist.is_main)

    processor = load_processor(cfg.tokenizer_name or cfg.model_name, cfg.data.date_string)
    model, family, base_dtype, from_rank0 = build_model(cfg, dist, sharded, main_log)
    if dist.device.type == "cpu":  # tuned for the steps only: loading (4-bit quantization above all)
        trim_cpu_heap()  # frees temporaries that a tuned heap would keep for the whole run (GiBs)
        tune_cpu_allocator()
    data, steps_per_epoch, total_steps = build_training_data(cfg, processor, family, dist, main_log)
    loss_model = ChunkedLossModel(model, family=family)
    if sharded:  # after add_lora (LoRA weights fp32, the same on every rank), before the optimizer
        shard_model(cfg, dist, loss_model, model, family, from_rank0, main_log, base_dtype)
    optimizer, scheduler, scaler = build_optimizer(cfg, dist, model, steps_per_epoch, total_steps)
    resumed = _resume_training(cfg, out, resume_from, loss_model, optimizer, scheduler, scaler, main_log)
    if dist.is_main:
        _record_start(cfg, out, resumed, main_log)
    metrics_file = out / "metrics.jsonl" if (dist.is_main and cfg.save_metrics) else None
    trackers = open_trackers(cfg, to_dict(cfg), out, dist.is_main, resumed.step if resumed else None)
    return Run(
        cfg=cfg,
        dist=dist,
        processor=processor,
        family=family,
        model=model,
        loss_model=loss_model,
        data=data,
        optimizer=optimizer,
        scheduler=scheduler,
        out=out,
        metrics=MetricsLog(metrics_file, resume=resumed is not None),
        base_dtype=base_dtype,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        scaler=scaler,
        # several processes: a batch whose items all failed to load is replaced, never skipped alone
        stand_in=stand_in_batch(processor.tokenizer.bos_token_id) if dist.enabled else None,
        log=main_log,
        warn=log if dist.is_main else functools.partial(_warn_with_rank, log, dist.rank),
        sharded=sharded,
        resumed=resumed,
        resumed_from=resume_from,
        trackers=trackers,
        task=task_metrics.task_subset(data.val_samples, cfg.eval_generate_samples, cfg.seed)
        if cfg.run_validation
        else None,
        objective=build_objective(cfg, model),
    )


def build_model(
    cfg: TrainConfig, dist: distributed.DistInfo, sharded: bool, log: Callable[[str], None]
) -> tuple[torch.nn.Module, ModelFamily, torch.dtype, bool]:
    """The base model with LoRA, in training mode; one process: activations checkpointed if asked.

    Returns:
        The PEFT model, its family, the base weights' dtype, and whether only the first process
        read the weights (``low_cpu_fsdp``: the others' models are on the meta device until sharded).
    """
    base_dtype = resolve_dtype("bf16" if cfg.pure_bf16 else cfg.torch_dtype, dist.device)
    # low_cpu_fsdp: one copy of the base in host memory, not one per process
    from_rank0 = sharded and dist.enabled and cfg.low_cpu_fsdp
    if from_rank0 and cfg.fsdp_config.cpu_offload:  # offloaded shards are not allocated on the device
        log(
            "warning: low_cpu_fsdp is not combined with fsdp_config.cpu_offload: every process reads the checkpoint"
        )
        from_rank0 = False
    qopts = cfg.quantization_config
    if cfg.quantization and sharded:
        mixed = cfg.fsdp_config.mixed_precision and dist.device.type == "cuda"  # as wrap_fsdp decides
        qopts = sharded_quantization(cfg.quantization, qopts, base_dtype, torch.bfloat16 if mixed else None)
        log(f"quantization: 4-bit weights packed in {qopts.quant_storage} to be sharded")
        if from_rank0:  # a model built on the meta device from config.json is not quantized
            log(
                "warning: low_cpu_fsdp is not combined with --quantization: every process reads the checkpoint"
            )
            from_rank0 = False
    model, family = load_base_model(
        cfg.model_name,
        base_dtype,
        sdpa=cfg.use_fast_kernels,
        device=dist.device,
        on_meta=from_rank0 and not dist.is_main,
        quantization=cfg.quantization,
        quantization_config=qopts,
    )
    torch.manual_seed(cfg.seed)  # LoRA init does not depend on how much randomness loading used
    if cfg.use_peft:
        peft_model = add_lora(model, family, cfg.lora_config, from_checkpoint=cfg.from_peft_checkpoint)
        if getattr(cfg, "ref_adapter", ""):  # DPO's frozen reference, beside the trained adapter
            attach_reference(peft_model, cfg.ref_adapter)
    else:  # a full fine-tune: the model's own weights, those the freeze options leave
        peft_model = choose_trainable(model, cfg)
        set_master_weights(peft_model, cfg, base_dtype, log)
    if cfg.gradient_checkpointing and not sharded:  # under FSDP: wrap_fsdp checkpoints the same layers
        distributed.checkpoint_activations(layer_modules(peft_model, family))  # text and vision layers
    peft_model.train()
    trainable, total = trainable_parameters(peft_model)
    what = "LoRA trains" if cfg.use_peft else "full fine-tune: trains"
    log(
        f"model: {cfg.model_name} ({family.name}, {base_dtype}{', ' + cfg.quantization if cfg.quantization else ''}); {what} {trainable:,} of {total:,} parameters"
    )
    return peft_model, family, base_dtype, from_rank0


def set_master_weights(
    model: torch.nn.Module, cfg: TrainConfig, base_dtype: torch.dtype, log: Callable[[str], None]
) -> None:
    """A full fine-tune of a bf16 base: its trainable weights become fp32 master weights (the compute
    stays in ``base_dtype``: autocast, or FSDP's mixed precision); ``pure_bf16`` with AdamW is warned of."""
    if keeps_master_weights(cfg, base_dtype):
        for p in model.parameters():
            p.data = p.data.float() if p.requires_grad else p.data
        log(
            f"full fine-tune in {base_dtype}: trainable weights kept in fp32 (master weights), compute in {base_dtype}"
        )
    elif cfg.pure_bf16 and cfg.fsdp_config.optimizer != "anyprecision":
        log(
            "warning: pure_bf16 full fine-tune with AdamW: updates smaller than half a bf16 step are lost; add "
            "--fsdp_config.optimizer anyprecision (Kahan-compensated) or drop --pure_bf16 (fp32 master weights)"
        )


def choose_trainable(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """A full fine-tune's trainable weights: all, or the vision side (``freeze_LLM_only``), less the
    first ``num_freeze_layers`` decoder layers (``freeze_layers``)."""
    for name, p in model.named_parameters():
        p.requires_grad_(trained_in_full_finetune(model.config, name, cfg))
    return model


def build_training_data(
    cfg: TrainConfig,
    processor: Any,
    family: ModelFamily,
    dist: distributed.DistInfo,
    log: Callable[[str], None],
) -> tuple[DataBundle, int, int]:
    """The data (its report logged) and the optimizer steps it makes.

    Returns:
        The data, the optimizer steps of an epoch, and those of the run (``max_train_step`` included).
    """
    if getattr(cfg, "method", "sft") == "dpo":  # preference pairs: chosen and rejected rows together
        from cotune.data.pair_batches import build_pair_data

        data = build_pair_data(cfg, processor, family, dist.rank, dist.world_size, log, dist.device.type)
    else:
        data = build_data(
            cfg, processor, family, dist.rank, dist.world_size, log=log, device_type=dist.device.type
        )
    for line in data.report:
        log(f"data: {line}")
    steps_per_epoch = optimizer_steps_per_epoch(len(data.train), cfg.gradient_accumulation_steps)
    total_steps, left = 0, cfg.max_train_step or math.inf  # max_train_step counts micro-batches
    for _ in range(cfg.num_epochs):
        batches = min(len(data.train), left)
        total_steps += optimizer_steps_per_epoch(batches, cfg.gradient_accumulation_steps) if batches else 0
        left -= batches
    samples_per_step = cfg.batch_size_training * cfg.gradient_accumulation_steps * dist.world_size
    log(
        f"batch: {cfg.batch_size_training} per process x {cfg.gradient_accumulation_steps} accumulation x "
        f"{dist.world_size} processes = {samples_per_step} samples per step; {total_steps} steps"
    )
    return data, steps_per_epoch, total_steps


def shard_model(
    cfg: TrainConfig,
    dist: distributed.DistInfo,
    loss_model: torch.nn.Module,
    model: torch.nn.Module,
    family: ModelFamily,
    from_rank0: bool,
    log: Callable[[str], None],
    base_dtype: torch.dtype = torch.float32,
) -> None:
    """FSDP2: each of the family's layers of ``model`` one unit, ``loss_model`` the root; over fp32
    master weights (``keeps_master_weights``) parameters are all-gathered and computed in ``base_dtype``."""
    layers = layer_modules(model, family)
    compute = base_dtype if keeps_master_weights(cfg, base_dtype) else None
    log(
        distributed.shard_for_training(
            loss_model, layers, cfg.fsdp_config, dist, cfg.gradient_checkpointing, from_rank0, compute
        )
    )
    if dist.enabled:
        torch.manual_seed(cfg.seed + dist.rank)  # dropout masks differ between ranks
    if dist.enabled and family.dummy_image_inputs is None:
        log(f"warning: {family.name}: a batch with images on some processes and none on others would hang")


def build_optimizer(
    cfg: TrainConfig,
    dist: distributed.DistInfo,
    model: torch.nn.Module,
    steps_per_epoch: int,
    total_steps: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler | None]:
    """AdamW (fused on a GPU; or the cookbook's anyprecision AdamW) over the trainable parameters, its
    schedule, and fp16's GradScaler on a GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.fsdp_config.optimizer == "anyprecision":
        optimizer = AnyPrecisionAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        fused = fused_adamw(params) or None  # None: torch's default (for-each)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch, total_steps)
    scaler = torch.amp.GradScaler("cuda") if (cfg.use_fp16 and dist.device.type == "cuda") else None
    return optimizer, scheduler, scaler


def _resume_training(
    cfg: TrainConfig,
    out: Path,
    resume_from: Path | None,
    loss_model: ChunkedLossModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    log: Callable[[str], None],
) -> resume.TrainerState | None:
    """Loads the checkpoint to resume from, if there is one, into the freshly built run.

    Args:
        cfg: the run's configuration (``cfg.resume`` says whether a missing checkpoint is expected).
        out: the run's output directory, where ``resume='auto'`` looks for checkpoints.
        resume_from: the checkpoint ``resume.checkpoint_to_resume`` chose, or None.
        loss_model: the (possibly sharded) model the weights load into.
        optimizer: the optimizer whose state is restored.
        scheduler: the learning-rate schedule whose position is restored.
        scaler: the gradient scaler whose state is restored (None without one).
        log: where the first process's lines go.

    Returns:
        Where the checkpoint left off (step, epoch, ...), or None when starting from the beginning.
    """
    if resume_from is not None:  # the weights, optimizer, schedule and scaler where the checkpoint was
        resumed = resume.load_checkpoint(resume_from, loss_model, optimizer, scheduler, scaler)
        log(f"resuming from {resume_from}: step {resumed.step}, epoch {resumed.epoch}")
        return resumed
    if cfg.resume == "auto":
        log(f"resume: no checkpoint in {out / resume.CHECKPOINTS} yet; starting from the beginning")
    return None


def _prepare_output_dir(cfg: TrainConfig, dist: distributed.DistInfo) -> Path:
    """The run directory, created, without what a crash left half-written (first process)."""
    out = Path(cfg.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cleanup_partial(out)
        cleanup_partial(out / resume.CHECKPOINTS)
    return out


def _record_start(
    cfg: TrainConfig, out: Path, resumed: resume.TrainerState | None, log: Callable[[str], None]
) -> None:
    """config.yaml; a resumed run also cuts metrics.jsonl back and drops checkpoints after its own."""
    save_config(cfg, out / "config.yaml")
    if resumed is None:
        return
    if cfg.save_metrics:
        resume.truncate_metrics(out / "metrics.jsonl", resumed.metrics_bytes)
    for newer in resume.drop_newer_checkpoints(out, resumed.step):
        log(f"removed {newer}: it continued the run from a later point than the one resumed")


def _silent(*args, **kwargs) -> None:
    """The log of the processes other than the first."""


def _warn_with_rank(log: Callable[[str], None], rank: int, message: str) -> None:
    log(f"[rank {rank}] {message}")


# ----------------------------------------------------------------------------- the loop


def train(run: Run) -> TrainResult:
    """Runs the epochs; validates, logs and saves as configured. Returns what it produced."""
    cfg = run.cfg
    start = time.perf_counter()
    state = initial_state(run)
    if run.resumed is None and run.validates:
        validate(run, state)  # the base model's loss: the reference the adapter must beat
    meter = Throughput()
    profiler = open_profiler(run)
    bar = tqdm(
        total=run.total_steps,
        initial=state.step,
        desc="training",
        disable=not (run.dist.is_main and cfg.progress),
        dynamic_ncols=True,
    )
    for epoch in range(state.epoch, cfg.num_epochs):
        if max_steps_reached(run, state):
            break
        batches = begin_epoch(run, state, epoch)
        for group in accumulation_groups(batches, cfg.gradient_accumulation_steps):
            if cfg.max_train_step:  # the cookbook's limit: micro-batches over all epochs
                group = group[: cfg.max_train_step - micro_batches_done(run, state)]
            state.batches_done += len(group)
            group = usable_batches(group, run.stand_in, run.warn)
            audit_once(run, state, group)
            with profiler.step(state.step + 1):
                stats = train_step(run, state, group)
            if stats is None:  # no rank has a label token in this group: no step
                continue
            log_step(run, state, stats, meter, bar)
            report_flops(run, state, profiler)
            if run.validates and on_eval_step(cfg, state.step):
                validate(run, state)
            if max_steps_reached(run, state):
                break
            if cfg.save_every_steps and state.step % cfg.save_every_steps == 0:
                if state.batches_done < len(run.data.train):  # the epoch's end writes one anyway
                    checkpoint(run, state, epoch_complete=False)
        if run.validates and not on_eval_step(cfg, state.step):
            validate(run, state)  # at the epoch's end, unless its last step just did
        # after the epoch's validation, so that a resumed run neither repeats nor skips it
        checkpoint(run, state, epoch_complete=state.batches_done >= len(run.data.train))
        save_cookbook_metrics(run)
    bar.close()
    profiler.close()
    return finish(run, state, start)


def initial_state(run: Run) -> LoopState:
    """A fresh run's state, or where the resumed checkpoint stood (``setup`` loaded its weights)."""
    state = LoopState(audited=not run.data.cookbook)
    saved = run.resumed
    if saved is None:
        return state
    state.step, state.best_eval_loss = saved.step, saved.best_eval_loss
    state.best_eval_accuracy = saved.best_eval_accuracy
    state.epoch, state.batches_done, warning = resume.resume_position(saved, run.global_batch)
    if warning:
        run.log(f"warning: {warning}")
    if run.metrics.path is not None:  # the losses so far, from the metrics cut back to the checkpoint
        rows = read_metrics(run.metrics.path)
        state.train_losses = [r["loss"] for r in rows if "loss" in r]
        state.eval_losses = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return state


def begin_epoch(run: Run, state: LoopState, epoch: int) -> Iterator[dict]:
    """Moves ``state`` to ``epoch`` and returns the epoch's loader batches from where it stands.

    The epoch the run starts in (``state.epoch``) continues after the ``state.batches_done`` batches a
    resumed run already trained on, with the checkpoint's RNG states restored; later ones start at 0.
    """
    starting = epoch == state.epoch
    if not starting:
        state.epoch, state.batches_done = epoch, 0
    if hasattr(run.data.train_sampler, "set_epoch"):
        run.data.train_sampler.set_epoch(epoch)
    checkpoint_dir = run.resumed_from if starting else None
    rank, seed = run.dist.rank, run.cfg.seed + run.dist.rank
    return resume.epoch_batches(run.data.train, state.batches_done, checkpoint_dir, run.resumed, rank, seed)


def open_profiler(run: Run) -> StepProfiler:
    """The FLOP counter or the torch profiler, when asked for and the run has the steps they need."""
    cfg = run.cfg
    if cfg.flop_counter and run.total_steps <= cfg.flop_counter_start:
        raise ConfigError(
            f"flop_counter: the run has {run.total_steps} optimizer steps, none after flop_counter_start "
            f"{cfg.flop_counter_start} warm-up steps to count; lower --flop_counter_start or train longer"
        )
    if cfg.use_profiler and run.total_steps < 6:
        raise ConfigError(
            f"use_profiler: the trace needs 6 optimizer steps (wait 1, warmup 2, active 3); the run has "
            f"{run.total_steps}: raise --max_train_step"
        )
    return StepProfiler(cfg, run.out, run.dist.device, run.dist.world_size)


def report_flops(run: Run, state: LoopState, profiler: StepProfiler) -> None:
    """The FLOP counter's result, once, in the log, metrics.jsonl and the trackers."""
    measured = profiler.measured
    if measured is None:
        return
    profiler.measured = None
    run.metrics.write(step=state.step, **measured)
    run.trackers.log({f"perf/{k}": v for k, v in measured.items()}, state.step)
    mfu = f", MFU {measured['mfu']:.1%}" if "mfu" in measured else ""
    run.log(
        f"flop counter at step {state.step}: {measured['tflop_per_step']:.4g} TFLOP per step, "
        f"{measured['tflops_per_s']:.4g} TFLOP/s per process{mfu}"
    )


def audit_once(run: Run, state: LoopState, group: list[dict]) -> None:
    """Checks the first real batch of a cookbook dataset file (labels, image tokens), once."""
    real = [b for b in group if not b.get("stand_in")]
    if state.audited or not real:
        return
    tokenizer = run.processor.tokenizer
    for warning in audit_batch(real[0], tokenizer, run.family.image_token_id(tokenizer)):
        run.log(f"warning: dataset file: {warning}")
    state.audited = True


def train_step(run: Run, state: LoopState, group: list[dict]) -> StepStats | None:
    """One optimizer step over an accumulation group: forward and backward of each batch, the update.

    Returns what the step measured, or None (and no step) when the group has no label token on
    any rank.
    """
    cfg, dist, objective = run.cfg, run.dist, run.objective
    # the step's loss is the mean over every unit of the step (label tokens; DPO: pairs), on every rank
    counts = torch.tensor([float(sum(objective.units(b) for b in group))], device=dist.device)
    n_step = float(distributed.all_reduce_sum(counts)[0])
    if n_step == 0:
        return None
    step_loss = torch.zeros((), dtype=torch.float64, device=dist.device)
    sums: dict[str, torch.Tensor] = {}
    for batch in group:
        with autocast(cfg, dist.device, run.base_dtype):
            loss_sum, stats = objective.loss_sum(run.loss_model, model_inputs(run, batch), batch)
        loss = loss_sum * dist.world_size / n_step  # data-parallel gradients are averaged over ranks
        (run.scaler.scale(loss) if run.scaler else loss).backward()
        step_loss += loss_sum.detach().double()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + v
    extra = _mean_stats(sums, n_step, dist.device)
    clip = cfg.gradient_clipping_threshold if cfg.gradient_clipping else None
    lr, grad_norm = optimizer_step(run.model, run.optimizer, run.scheduler, run.scaler, clip)
    state.step += 1
    mean_loss = float(distributed.all_reduce_sum(step_loss)) / n_step
    state.train_losses.append(mean_loss)
    tokens = sum(count_tokens(b) for b in group) * dist.world_size
    return StepStats(loss=mean_loss, lr=lr, grad_norm=grad_norm, tokens=tokens, extra=extra)


def _mean_stats(sums: dict[str, torch.Tensor], n_step: float, device: torch.device) -> dict[str, float]:
    """The objective's summed statistics as means over the step's units, all ranks (collective when
    there are any: every rank has the same keys, the objective's)."""
    if not sums:
        return {}
    keys = sorted(sums)
    total = distributed.all_reduce_sum(torch.stack([sums[k].to(device) for k in keys]))
    return {k: float(v) / n_step for k, v in zip(keys, total.tolist())}


def log_step(run: Run, state: LoopState, stats: StepStats, meter: Throughput, bar: tqdm) -> None:
    """A metrics.jsonl line every ``log_every_steps`` steps; the progress bar moves on every step."""
    meter.add(stats.tokens)
    if state.step % run.cfg.log_every_steps == 0:
        tps = meter.rate()
        record = dict(
            step=state.step, epoch=state.epoch, loss=stats.loss, lr=stats.lr, tokens_per_s=round(tps, 1)
        )
        if stats.grad_norm is not None:
            record["grad_norm"] = stats.grad_norm
        record.update(stats.extra)
        memory = torch.cuda.max_memory_allocated() / 2**30 if run.dist.device.type == "cuda" else None
        if memory is not None:
            record["max_memory_gib"] = round(memory, 3)
        run.metrics.write(**record)
        run.trackers.log(
            {"train/loss": stats.loss, "train/lr": stats.lr, "train/grad_norm": stats.grad_norm,
             "train/tokens_per_s": tps, "train/epoch": state.epoch, "train/max_memory_gib": memory}
            | {f"train/{k}": v for k, v in stats.extra.items()},
            state.step,
        )  # fmt: skip
        bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}", tok_s=f"{tps:.0f}")
    bar.update(1)


def validate(run: Run, state: LoopState) -> None:
    """The validation loss at ``state.step``, logged and recorded; a new lowest one after a step is
    saved as ``best_adapter`` (the loss at step 0 is the base model's: a reference, never the best)."""
    inputs = functools.partial(model_inputs, run)
    stages_of = functools.partial(batch_label_stages, run.processor.tokenizer, state.val_stages)
    held = HeldOut(run.loss_model, run.data.val, inputs, run.cfg, run.dist.device, run.stand_in, run.warn,
                   run.base_dtype)  # fmt: skip
    loss, by_stage, extra = run.objective.validate(held, stages_of)
    state.eval_losses.append(loss)
    stage_losses = {f"eval_loss_{s.lower()}": v for s, v in by_stage.items()}  # LLaVA-CoT data only
    task = validate_task(run)  # eval_generate_samples: {} when off
    stage_losses |= {f"eval_{k}": v for k, v in extra.items()}  # DPO: reward accuracy, margins, ...
    run.metrics.write(
        step=state.step,
        epoch=state.epoch,
        eval_loss=loss,
        eval_perplexity=perplexity(loss),
        **stage_losses,
        **task,
    )
    run.trackers.log(
        {"eval/loss": loss, "eval/perplexity": perplexity(loss)}
        | {f"eval/loss_{s.lower()}": v for s, v in by_stage.items()}
        | {f"eval/{k.removeprefix('eval_')}": v for k, v in task.items()}
        | {f"eval/{k}": v for k, v in extra.items()},
        state.step,
    )
    per_stage = ", ".join(f"{s.lower()} {v:.4f}" for s, v in by_stage.items())
    run.log(
        f"validation at step {state.step}: loss {loss:.4f}, perplexity {perplexity(loss):.2f}"
        + (f" ({per_stage})" if per_stage else "")
        + "".join(f", {k} {v:.4f}" for k, v in extra.items())
    )
    by_accuracy = run.cfg.best_adapter_metric == "accuracy"
    better = task["eval_accuracy"] > state.best_eval_accuracy if by_accuracy else loss < state.best_eval_loss
    if state.step > 0 and better and run.cfg.save_model:
        state.best_adapter_dir = export_adapter(run, run.out / saved_name(run.cfg, "best_"))
    if state.step > 0:
        state.best_eval_loss = min(state.best_eval_loss, loss)
        state.best_eval_accuracy = max(state.best_eval_accuracy, task.get("eval_accuracy", -math.inf))


def validate_task(run: Run) -> dict:
    """Task metrics (``eval_generate_samples``): the subset answered and scored, the line logged."""
    if run.task is None:
        return {}
    inputs = functools.partial(model_inputs, run)
    with distributed.root_unsharded(run.loss_model):  # generate calls the model, not the FSDP root
        figures = task_metrics.measure_task(
            run.model, run.processor, run.family, run.task, run.cfg.eval_generate_max_new_tokens, inputs,
            run.dist.rank, run.dist.world_size,
        )  # fmt: skip
    run.log(task_metrics.describe(figures))
    return figures


def checkpoint(run: Run, state: LoopState, epoch_complete: bool) -> None:
    """A resumable checkpoint of the run at ``state``, the adapter inside it (collective: every rank
    calls it). ``epoch_complete``: the resumed run continues with the next epoch."""
    if run.cfg.keep_last_checkpoints <= 0:
        return
    metrics = run.metrics.path
    saved = resume.TrainerState(
        step=state.step,
        epoch=state.epoch,
        batches_done=state.batches_done,
        epoch_complete=epoch_complete,
        best_eval_loss=state.best_eval_loss,
        best_eval_accuracy=state.best_eval_accuracy,
        metrics_bytes=metrics.stat().st_size if metrics and metrics.exists() else None,
        world_size=run.dist.world_size,
        global_batch=run.global_batch,
        scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict() if run.scaler else None,
    )
    where = resume.save_checkpoint(
        run.loss_model,
        run.optimizer,
        saved,
        run.out,
        run.cfg.keep_last_checkpoints,
        run.dist.rank,
        # a full fine-tune's weights are in the checkpoint itself: no second copy
        write_adapter=functools.partial(export_adapter, run, with_processor=False)
        if run.cfg.use_peft
        else None,
    )
    run.log(f"checkpoint: {where} (step {state.step})")


def finish(run: Run, state: LoopState, start: float) -> TrainResult:
    """Saves the final adapter and the loss plot; what the run produced (``start``: its start time)."""
    adapter_dir = export_adapter(run, run.out / saved_name(run.cfg)) if run.cfg.save_model else None
    if run.dist.is_main and run.cfg.save_metrics:
        plot_loss(run.out / "metrics.jsonl", run.out / "loss.png")
    save_cookbook_metrics(run)
    summary = {"adapter_dir": str(adapter_dir)} if adapter_dir else {}
    if state.best_adapter_dir:
        summary["best_adapter_dir"] = str(state.best_adapter_dir)
    run.trackers.finish(summary)
    result = TrainResult(
        output_dir=run.out,
        adapter_dir=adapter_dir,
        best_adapter_dir=state.best_adapter_dir,
        steps=state.step,
        eval_losses=state.eval_losses,
        train_losses=state.train_losses,
        seconds=time.perf_counter() - start,
    )
    distributed.barrier()
    return result


def save_cookbook_metrics(run: Run) -> None:
    """save_metrics: the cookbook's metrics_data_<rank>-<start time>.json beside metrics.jsonl (first process)."""
    if run.dist.is_main and run.cfg.save_metrics:
        name = f"metrics_data_{run.dist.rank}-{run.started}.json"
        write_cookbook_metrics(run.out / "metrics.jsonl", run.out / name)


def on_eval_step(cfg: TrainConfig, step: int) -> bool:
    """``step`` is one that validates (every ``eval_every_steps``)."""
    return bool(cfg.eval_every_steps and step % cfg.eval_every_steps == 0)


def micro_batches_done(run: Run, state: LoopState) -> int:
    """Loader batches trained on over all epochs (every epoch before ``state.epoch`` ran in full)."""
    return state.epoch * len(run.data.train) + state.batches_done


def max_steps_reached(run: Run, state: LoopState) -> bool:
    """``max_train_step`` micro-batches are done (the cookbook's count, not optimizer steps)."""
    return bool(run.cfg.max_train_step and micro_batches_done(run, state) >= run.cfg.max_train_step)


def model_inputs(run: Run, batch: dict) -> dict:
    """The batch's inputs for the forward (the family's keys), on the device.

    Several processes: every rank must run the vision layers' FSDP collectives, so a batch without
    images gets the family's dummy image inputs.
    """
    base = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
    config = base.config if run.dist.enabled else None
    inputs = run.family.model_inputs(batch, dummy_images_for=config)
    return to_device(inputs, run.dist.device, float_dtype=run.base_dtype)


def saved_name(cfg: TrainConfig, prefix: str = "") -> str:
    """``adapter`` (LoRA) or ``model`` (a full fine-tune's HF checkpoint), with ``prefix``."""
    return prefix + ("adapter" if cfg.use_peft else "model")


def export_adapter(run: Run, where: Path, with_processor: bool = True) -> Path | None:
    """Writes the adapter (PEFT format), or a full fine-tune's model (HF format), on rank 0; under FSDP
    every rank takes part in gathering it."""
    extra = functools.partial(_save_processor, run.processor) if with_processor else None
    if not run.cfg.use_peft:
        state = distributed.gather_full_state(run.model) if run.sharded else None
        if run.dist.is_main and keeps_master_weights(run.cfg, run.base_dtype):  # saved in the base's dtype
            full = state or run.model.state_dict()
            state = {k: v.to(run.base_dtype) if v.is_floating_point() else v for k, v in full.items()}
        return save_model(run.model, where, state_dict=state, extra=extra) if run.dist.is_main else None
    state = distributed.gather_trainable_state(run.model) if run.sharded else None
    if not run.dist.is_main:
        return None
    trained = [a for a in run.model.peft_config if a != REFERENCE]  # never DPO's frozen reference
    return save_adapter(run.model, where, state_dict=state, extra=extra, adapters=trained)


def _save_processor(processor: Any, directory: Path) -> None:
    processor.save_pretrained(str(directory))


def finetune(cfg: TrainConfig, log=print) -> TrainResult:
    """setup + train + cleanup: what ``cotune train`` runs."""
    run = setup(cfg, log=log)
    try:
        result = train(run)
    finally:
        distributed.cleanup()
    if run.dist.is_main:
        what = "adapter" if cfg.use_peft else "model (Hugging Face checkpoint)"
        log(f"{what}: {result.adapter_dir}")
        if result.best_adapter_dir:
            how = (
                "highest task accuracy" if cfg.best_adapter_metric == "accuracy" else "lowest validation loss"
            )
            log(f"best {what.split()[0]} ({how}): {result.best_adapter_dir}")
        log(f"metrics: {run.out / 'metrics.jsonl'}; plot: {run.out / 'loss.png'}")
    return result
