"""The FLOP counter and the torch profiler around optimizer steps (``flop_counter``, ``use_profiler``).

``StepProfiler.step(n)`` wraps optimizer step ``n``: with ``flop_counter`` the step after
``flop_counter_start`` warm-up steps runs under ``torch.utils.flop_counter.FlopCounterMode`` and is
timed (its FLOPs per step, TFLOP/s and, on a GPU whose peak is known, MFU end up in ``measured``);
with ``use_profiler`` every step advances a ``torch.profiler`` schedule (wait 1, warmup 2, active 3,
as in llama-cookbook) whose trace goes to ``profiler_dir`` for TensorBoard or Perfetto.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peak FLOP/s by the name ``torch.cuda.get_device_name()`` gives (the vendors'
# datasheets, without sparsity), the most specific pattern first: "NVIDIA H100 80GB HBM3" is the
# SXM part, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are not; "H20" and "L4" are names of their own.
PEAK_BF16: list[tuple[str, str, float]] = [
    (r"\bGH200\b", "GH200", 989e12),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 835e12),
    (r"\bH200\b", "H200 SXM", 989e12),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756e12),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835e12),
    (r"\bH100\b", "H100 SXM", 989e12),
    (r"\bH800\b.*\bPCIe\b", "H800 PCIe", 756e12),
    (r"\bH800\b", "H800 SXM", 989e12),
    (r"\bH20\b", "H20", 148e12),
    (r"\bB200\b", "B200", 2250e12),
    (r"\bA100\b", "A100", 312e12),  # SXM4 and PCIe, 40 and 80 GB: the same peak
    (r"\bA800\b", "A800", 312e12),
    (r"\bL40S\b", "L40S", 362e12),
    (r"\bL40\b", "L40", 181e12),
    (r"\bL4\b", "L4", 121e12),
    (r"\bA10G\b", "A10G", 70e12),
    (r"\bA10\b", "A10", 125e12),
]


def peak_bf16(device_name: str) -> tuple[str, float] | None:
    """(the card, its dense bf16 peak FLOP/s) for a ``torch.cuda.get_device_name()`` string; None
    for a card not in ``PEAK_BF16`` (MFU is then not reported)."""
    for pattern, card, peak in PEAK_BF16:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return card, peak
    return None


def device_peak(device: torch.device) -> float | None:
    """The dense bf16 peak FLOP/s of ``device`` (None on CPU or an unknown card)."""
    if device.type != "cuda":
        return None
    found = peak_bf16(torch.cuda.get_device_name(device))
    return found[1] if found else None


class StepProfiler:
    """What ``flop_counter`` and ``use_profiler`` ask for, around each optimizer step."""

    def __init__(self, cfg: Any, out: Path, device: torch.device, world_size: int = 1) -> None:
        self.flop_step = cfg.flop_counter_start + 1 if cfg.flop_counter else None
        self.device, self.world_size = device, world_size
        self.measured: dict[str, float] | None = None
        self.trace_dir: Path | None = None
        self.profiler = None
        if cfg.use_profiler:
            self.trace_dir = Path(cfg.profiler_dir) if cfg.profiler_dir else out / "profiler"
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=1, warmup=2, active=3, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.trace_dir)),
                record_shapes=True,
                profile_memory=True,
                with_flops=True,
            )
            self.profiler.start()

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Wraps optimizer step ``step`` (1-based)."""
        if step != self.flop_step:
            yield
        else:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            self._sync()
            start = time.perf_counter()
            with counter:
                yield
            self._sync()
            seconds = time.perf_counter() - start
            flops = counter.get_total_flops()  # this process's share
            self.measured = {"tflop_per_step": flops * self.world_size / 1e12}
            self.measured["tflops_per_s"] = flops / seconds / 1e12  # per process
            peak = device_peak(self.device)
            if peak:
                self.measured["mfu"] = flops / seconds / peak
        if self.profiler is not None:
            self.profiler.step()

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
