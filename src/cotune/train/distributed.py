"""Process group set-up, FSDP2 wrapping and the collectives the training loop needs.

Every helper is a no-op (or the plain single-process operation) when there is no process group,
so the loop has one code path for one process, one node and several nodes.

The FSDP wrap policy lives here and only here: each repeated block that the model family lists
(``cotune.models.families.layer_modules``) becomes one FSDP unit (and one activation-checkpointing
unit); the root unit is the ``ChunkedLossModel``, so embeddings, ``lm_head`` and the vision patch
embedding are all-gathered once per step by the root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(self.local_world_size, 1))


def under_torchrun() -> bool:
    """True inside a process started by torchrun (or another launcher that sets the env:// variables)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def init_distributed(fsdp: bool = False) -> DistInfo:
    """Joins the process group when launched by torchrun: nccl for GPU tensors, gloo for CPU ones.

    On a GPU the group has both backends ("cpu:gloo,cuda:nccl"): with ``fsdp_config.cpu_offload`` the
    sharded parameters and gradients live in CPU memory, and gradient clipping and the adapter
    gather run collectives on them.

    Args:
        fsdp: FSDP needs a process group even in one process; with ``fsdp`` and a world of one, a
            single-member group is created in memory (no ports, no launcher).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    backend = process_group_backend(device)
    if not dist.is_initialized():
        if world > 1:
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        elif fsdp:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(
        rank=rank, world_size=world, local_rank=local, device=device, local_world_size=local_world
    )


def process_group_backend(device: torch.device) -> str:
    """gloo on CPU; on a GPU nccl for GPU tensors and gloo for the CPU tensors of ``cpu_offload``."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def launch_torchrun(argv: list[str], nproc_per_node: int) -> int:
    """Re-runs ``cotune train ARGV`` under ``torchrun --standalone --nproc_per_node N``; returns its exit code.

    This is the ``cotune train ... --enable_fsdp --nproc_per_node N`` convenience for one node; for
    several nodes call torchrun yourself (see the README).
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
    ]
    cmd += ["-m", "cotune", "train", *argv]
    print("launching: " + " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd)


# ----------------------------------------------------------------------------- FSDP2


def device_mesh(strategy: str, info: DistInfo, replicate_degree: int = 0):
    """1-D mesh (full_shard, shard_grad_op) or 2-D (replicate, shard) mesh (hybrid_shard).

    For hybrid_shard the default replica count is the number of nodes, so parameters are sharded
    inside a node (fast links) and replicated across nodes.

    Raises:
        ValueError: when ``replicate_degree`` does not divide the world size.
    """
    from torch.distributed.device_mesh import init_device_mesh

    kind = info.device.type
    if strategy != "hybrid_shard":
        return init_device_mesh(kind, (info.world_size,), mesh_dim_names=("shard",))
    replicas = replicate_degree or info.num_nodes
    if replicas <= 0 or info.world_size % replicas:
        raise ValueError(
            f"fsdp_config.replicate_degree={replicas} must divide the world size {info.world_size}"
        )
    return init_device_mesh(
        kind, (replicas, info.world_size // replicas), mesh_dim_names=("replicate", "shard")
    )


def wrap_fsdp(
    root: torch.nn.Module,
    layers: list[torch.nn.Module],
    fsdp_cfg: Any,
    info: DistInfo,
    param_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Shards ``root`` with FSDP2: each of ``layers`` is one unit, then the root.

    Args:
        root: the module the loop calls (a ``ChunkedLossModel`` around the PEFT model); LoRA weights
            must already be added and be fp32.
        layers: the repeated blocks, from ``layer_modules(model, family)``.
        fsdp_cfg: a ``cotune.config.FsdpConfig``.
        info: this process's ``DistInfo``.
        param_dtype: all-gather and compute in this dtype on any device, gradients reduced in fp32
            (a full fine-tune's fp32 master weights over a bf16 base); None: as ``mixed_precision`` says.

    Returns:
        ``root``, now an FSDP module (its parameters are DTensors).

    Mixed precision (GPU only): parameters are all-gathered and computed in bf16, gradients are
    reduced in fp32 and kept in the parameters' own dtype, so LoRA weights and optimizer state stay
    fp32 while the frozen base may be stored in bf16. FSDP2 requires one dtype among the trainable
    parameters of a unit (true: all LoRA weights are fp32), not among frozen and trainable ones.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = device_mesh(fsdp_cfg.sharding_strategy, info, fsdp_cfg.replicate_degree)
    compute = compute_dtype(fsdp_cfg, info, param_dtype)
    mp = (
        MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        if compute
        else MixedPrecisionPolicy()
    )
    offload = (
        CPUOffloadPolicy(pin_memory=info.device.type == "cuda") if fsdp_cfg.cpu_offload else OffloadPolicy()
    )
    reshard = fsdp_cfg.sharding_strategy != "shard_grad_op"
    if fsdp_cfg.fsdp_activation_checkpointing:
        checkpoint_activations(layers)  # the same layers, before they are sharded
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)
    return root


def shard_for_training(
    root: torch.nn.Module,
    layers: list[torch.nn.Module],
    fsdp_cfg: Any,
    info: DistInfo,
    activation_checkpointing: bool = False,
    from_rank0: bool = False,
    param_dtype: torch.dtype | None = None,
) -> str:
    """``wrap_fsdp``, then, with ``from_rank0`` (``low_cpu_fsdp``), ``load_from_rank0``.

    Args:
        root, layers, fsdp_cfg, info: as for ``wrap_fsdp``.
        activation_checkpointing: the top-level ``gradient_checkpointing``: recompute every unit.
        from_rank0: the processes other than the first built ``root`` on the meta device.
        param_dtype: as for ``wrap_fsdp``.

    Returns:
        A line that says how the model is sharded, for the log.
    """
    if activation_checkpointing:
        fsdp_cfg = dataclasses.replace(fsdp_cfg, fsdp_activation_checkpointing=True)
    full_state = root.state_dict() if (from_rank0 and info.is_main) else None
    wrap_fsdp(root, layers, fsdp_cfg, info, param_dtype)
    if from_rank0:
        load_from_rank0(root, full_state, info)
    on = {True: "on", False: "off"}
    compute = compute_dtype(fsdp_cfg, info, param_dtype)
    mixed = f"{str(compute).removeprefix('torch.')} compute, fp32 reduction" if compute else "off"
    return (
        f"fsdp: {fsdp_cfg.sharding_strategy} over {info.world_size} process(es) on {info.num_nodes} node(s), "
        f"{len(layers)} layer units + root; mixed precision {mixed}, "
        f"activation checkpointing {on[bool(fsdp_cfg.fsdp_activation_checkpointing)]}, "
        f"cpu offload {on[bool(fsdp_cfg.cpu_offload)]}; base weights read by "
        f"{'process 0 only' if from_rank0 else 'every process'}"
    )


def compute_dtype(
    fsdp_cfg: Any, info: DistInfo, param_dtype: torch.dtype | None = None
) -> torch.dtype | None:
    """The dtype FSDP all-gathers and computes in: ``param_dtype`` when given, bf16 on a GPU with
    ``fsdp_config.mixed_precision``, else None (the parameters' own)."""
    if param_dtype is not None:
        return param_dtype
    return torch.bfloat16 if fsdp_cfg.mixed_precision and info.device.type == "cuda" else None


def load_from_rank0(root: torch.nn.Module, full_state: dict | None, info: DistInfo) -> None:
    """Fills a sharded ``root`` whose other processes built it on the meta device (``low_cpu_fsdp``).

    The first process loaded the checkpoint and added LoRA as usual; ``full_state`` is its
    ``root.state_dict()`` taken before ``wrap_fsdp``. The others allocate their shards, receive
    them from it, and copy its buffers (rotary frequencies and other tensors no checkpoint holds).

    Args:
        root: the module ``wrap_fsdp`` returned.
        full_state: the first process's full state dict; None on the others.
        info: this process's ``DistInfo``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not info.is_main:
        root.to_empty(device=info.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(root, full_state if info.is_main else {}, options=options)
    for buffer in root.buffers():
        dist.broadcast(buffer, src=0)


def checkpoint_activations(layers: list[torch.nn.Module]) -> None:
    """Recomputes each of ``layers``' activations in backward: the one mechanism for one process and FSDP.

    Args:
        layers: the repeated blocks, from ``layer_modules(model, family)``: text decoder layers and
            vision encoder layers alike (transformers' ``gradient_checkpointing_enable`` covers only
            the layers its model classes mark, and some families' vision encoder layers are not marked).

    The composable (hook-based) form keeps parameter names unchanged, so PEFT keys and checkpoint
    keys are the same with and without it, and FSDP2 knows to skip its own hooks while recomputing.
    It needs no process group. Under FSDP it is applied before ``fully_shard`` (``wrap_fsdp``).
    """
    from torch.distributed._composable import checkpoint

    for layer in layers:
        checkpoint(layer)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gather_trainable_state(model: torch.nn.Module, to_rank0: bool = True) -> dict[str, torch.Tensor] | None:
    """The trainable (LoRA) parameters of ``model`` as full CPU tensors, keyed by parameter name.

    Only the trainable parameters are gathered, one at a time (collective: every rank must call
    this), never the frozen base, so saving an adapter of an 11B model needs a few hundred MB.

    Returns:
        The state dict on rank 0 (on every rank when ``to_rank0`` is False); None on other ranks.
    """
    keep = not to_rank0 or not dist.is_initialized() or dist.get_rank() == 0
    state = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        full = p.full_tensor() if _is_dtensor(p) else p
        if keep:
            state[name] = full.detach().to("cpu", copy=True)
    return state if keep else None


def gather_full_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Every entry of ``model.state_dict()`` as a full CPU tensor on rank 0 (None elsewhere): a full
    fine-tune's checkpoint. Collective; one tensor at a time."""
    keep = not dist.is_initialized() or dist.get_rank() == 0
    state = {}
    for name, t in model.state_dict().items():
        full = t.full_tensor() if _is_dtensor(t) else t
        if keep:
            state[name] = full.detach().to("cpu", copy=True)
    return state if keep else None


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clips the global gradient norm (over every rank's shards) and returns it as a float."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if _is_dtensor(norm):
        norm = norm.full_tensor()
    return float(norm)


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place; returns ``t``)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


@contextlib.contextmanager
def root_unsharded(root: torch.nn.Module) -> Iterator[None]:
    """The FSDP root's own parameters (those outside the layer units: embeddings, the vision
    tower's patch embedding, norms, the head) gathered for calls that do not go through the root's
    forward, such as ``generate`` on the model it wraps; the layer units gather themselves as
    they run. Nothing to do for a module that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(root, FSDPModule):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order ([obj] in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def initialized() -> bool:
    """True when this process is in a process group."""
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
