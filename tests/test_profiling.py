"""The peak-FLOP table that MFU divides by (``cotune.train.profiling.peak_bf16``), on the names that
``torch.cuda.get_device_name()`` gives, and the choice of AdamW's fused kernel."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cotune.train.profiling import peak_bf16
from cotune.train.step import fused_adamw


@pytest.mark.parametrize(
    "name, card, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756),
        ("NVIDIA H100 NVL", "H100 NVL", 835),
        ("NVIDIA H200", "H200 SXM", 989),
        ("NVIDIA H200 NVL", "H200 NVL", 835),
        ("NVIDIA GH200 480GB", "GH200", 989),
        ("NVIDIA H20", "H20", 148),
        ("NVIDIA A100-SXM4-80GB", "A100", 312),
        ("NVIDIA A100-SXM4-40GB", "A100", 312),
        ("NVIDIA A100-PCIE-40GB", "A100", 312),
        ("NVIDIA A100 80GB PCIe", "A100", 312),
        ("NVIDIA L40S", "L40S", 362),
        ("NVIDIA L40", "L40", 181),
        ("NVIDIA L4", "L4", 121),
        ("NVIDIA A10G", "A10G", 70),
    ],
)
def test_peak_by_device_name(name, card, tflops):
    assert peak_bf16(name) == (card, tflops * 1e12)


def test_unknown_cards_have_no_peak():
    assert peak_bf16("NVIDIA GeForce RTX 4090") is None
    assert peak_bf16("Tesla T4") is None


def test_adamw_is_fused_when_every_parameter_is_on_a_gpu():
    gpu = SimpleNamespace(device=torch.device("cuda", 0))  # no GPU here: the choice reads .device only
    cpu = torch.zeros(2)
    assert fused_adamw([gpu, gpu])
    assert not fused_adamw([gpu, cpu])  # cpu_offload: the parameters are in host memory
    assert not fused_adamw([cpu])
    assert not fused_adamw([])
