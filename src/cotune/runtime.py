"""Process-level tuning that makes CPU training fast on small machines."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_done = False


def tune_cpu_allocator() -> bool:
    """Keeps freed memory in the process instead of returning it to the OS (glibc only).

    A LoRA step allocates and frees tensors of hundreds of MB (logits over a 128k vocabulary).
    By default glibc serves each with a fresh mmap and gives it back on free, so every step
    page-faults the same memory in again; on small VMs that doubled the step time. Serving them
    from the heap and never trimming it makes the memory reusable. The cost: the process keeps
    its high-water mark as RSS (with the chunked loss's reused buffer this adds nothing measurable;
    with full-logits code it can add gigabytes).

    Returns:
        True when the allocator was tuned (Linux with glibc), False otherwise.
    """
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        libc.mallopt(_M_TOP_PAD, 256 * 2**20)
    except (OSError, AttributeError):
        return False
    _done = bool(ok)
    return _done


def trim_cpu_heap() -> bool:
    """Gives the heap's free memory back to the OS now (glibc ``malloc_trim``), whatever the tuning.

    ``cotune.train.loop.setup`` calls it once the model is loaded, then ``tune_cpu_allocator``: a heap
    tuned before loading kept the loader's freed temporaries for the whole run. Quantizing a 1.3 B
    Mllama to 4 bits on a CPU that way left 3.5 GiB of anonymous memory resident where the 4-bit
    weights are 0.4 GiB (measured, see BENCHMARKS.md), more than the 4-bit base saved.

    Returns:
        True when glibc trimmed (or had nothing to trim), False where there is no glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return False
    return True


def cpus_per_process() -> int:
    """The CPUs this process may use (its affinity), shared evenly by the processes of a job on
    this node (``LOCAL_WORLD_SIZE``, set by torchrun); at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
