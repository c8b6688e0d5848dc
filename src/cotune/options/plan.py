"""``cotune plan``: train's options plus the memory of the GPU the run is planned for."""

from __future__ import annotations

from dataclasses import dataclass

from cotune.options.fields import opt


@dataclass
class PlanOptions:
    """What ``cotune plan`` adds to ``cotune train``'s options."""

    gpu_memory: str = opt("24GB", "Memory of one GPU: 16GB, 24GB, 80GB (GB and GiB both read as GiB).")
    plan_device: str = opt(
        "cuda",
        "The device planned for: cuda (bf16 where torch_dtype is auto, a CUDA context) or cpu (fp32, no context).",
        choices=("cuda", "cpu"),
    )
