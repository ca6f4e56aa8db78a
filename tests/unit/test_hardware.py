"""The one table of cards (planner memory, MFU peaks, native bf16) against real device names, and the
precision a run and a plan choose from the card's compute capability."""

import json
from types import SimpleNamespace

import pytest
import torch

from llm_ds import hardware
from llm_ds.cli import main
from llm_ds.ds_config import resolve_precision
from llm_ds.hardware import device_precisions

MiB = 2**20

# What torch.cuda.get_device_name() returns on these cards, the entry each must find, and the memory
# torch.cuda.get_device_properties().total_memory reports there (MiB; seen on real machines).
REAL_NAMES = [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 81_089),
    ("NVIDIA H100 PCIe", "H100 PCIe", 81_008),
    ("NVIDIA H100 NVL", "H100 NVL", None),
    ("NVIDIA H200", "H200", 143_156),
    ("NVIDIA H200 NVL", "H200 NVL", None),
    ("NVIDIA GH200 480GB", "GH200 96GB", None),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB", None),
    ("NVIDIA A100 80GB PCIe", "A100 80GB", None),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB", 40_536),
    ("NVIDIA A100-PCIE-40GB", "A100 40GB", None),
    ("NVIDIA L40S", "L40S", 45_589),
    ("NVIDIA L40", "L40", None),
    ("NVIDIA L4", "L4", None),
    ("NVIDIA A10G", "A10G", 22_587),
    ("NVIDIA A10", "A10", None),
    ("Tesla V100-SXM2-16GB", "V100 16GB", 16_160),
    ("Tesla V100-SXM2-32GB", "V100 32GB", None),
    ("Tesla V100S-PCIE-32GB", "V100 32GB", None),
    ("Tesla T4", "T4", 15_109),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", None),
    # What users type for `llm-ds plan --gpu`.
    ("H100", "H100 SXM", None),
    ("A100-40GB", "A100 40GB", None),
    ("a100 40gb", "A100 40GB", None),
]


@pytest.mark.parametrize("name, label, seen_mib", REAL_NAMES)
def test_real_device_names_find_their_card(name, label, seen_mib):
    card = hardware.find_card(name)
    assert card is not None and card.label == label
    if seen_mib is not None:
        assert card.memory_mib == seen_mib
    # Reported memory is below the marketing figure in GiB (an "80GB" H100 holds 79.2 GiB).
    nominal = int(label.split()[-1].removesuffix("GB")) if label.endswith("GB") else None
    if nominal:
        assert card.memory_bytes < nominal * 2**30


def test_names_that_used_to_match_a_longer_or_larger_card():
    assert hardware.find_card("NVIDIA A100-SXM4-40GB").memory_bytes < 40 * 2**30  # not 80 GiB
    assert hardware.find_card("NVIDIA A100-PCIE-40GB").memory_bytes < 40 * 2**30
    assert hardware.find_card("NVIDIA L40").label == "L40"  # not L4
    assert hardware.peak_tflops("NVIDIA L40", "bf16") == 181.0
    assert hardware.find_card("Tesla V100-SXM2-16GB").memory_bytes < 16 * 2**30  # not 32 GiB
    assert hardware.peak_tflops("NVIDIA H100 NVL", "bf16") == 835.0  # not the SXM peak
    assert hardware.peak_tflops("NVIDIA H200 NVL", "bf16") == 835.0
    assert hardware.find_card("cpu") is None and hardware.find_card("NVIDIA B100-Future") is None


def test_every_card_reports_less_than_it_is_sold_as_and_has_consistent_peaks():
    for card in hardware.CARDS:
        assert card.memory_bytes < 200 * 2**30, card.label
        assert card.has_bf16 == (card.bf16 is not None), card.label
        assert (card.tf32 is not None) == (card.capability >= (8, 0)), card.label


def pretend_gpu(monkeypatch, name: str, total_memory: int, capability: tuple[int, int]) -> None:
    """torch sees one CUDA device with these properties (the device itself is not used)."""
    props = SimpleNamespace(name=name, total_memory=total_memory, major=capability[0], minor=capability[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)


@pytest.mark.parametrize(
    "capability, dtype_support, expected",
    [
        ((9, 0), True, "bf16"),  # H100
        ((8, 0), True, "bf16"),  # A100
        ((7, 5), True, "fp16"),  # T4: torch calls its emulated bf16 supported
        ((7, 0), True, "fp16"),  # V100
    ],
)
def test_auto_precision_needs_compute_capability_8(monkeypatch, capability, dtype_support, expected):
    """DeepSpeed's is_bf16_supported says yes on V100 and T4 (emulation); auto must pick fp16 there."""
    import deepspeed.accelerator

    accel = SimpleNamespace(
        device_name=lambda *a: "cuda", is_bf16_supported=lambda: dtype_support, is_fp16_supported=lambda: True
    )
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accel)
    pretend_gpu(monkeypatch, "GPU", 16 * 2**30, capability)
    assert resolve_precision("auto", {}, *device_precisions()) == expected


def test_plan_without_gpu_flag_takes_this_machines_gpu_before_choosing_precision(monkeypatch, capsys):
    pretend_gpu(monkeypatch, "Tesla V100-SXM2-16GB", 16_160 * MiB, (7, 0))
    code = main(["plan", "--config", "llm_ds/configs/gpt2-124m.yaml", "--num_gpus", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code in (0, 1)
    assert result["precision"] == "fp16"  # a V100 has no bf16
    assert result["cluster"]["device"] == "Tesla V100-SXM2-16GB"
    assert result["cluster"]["device_mem"] == 16_160 * MiB  # what the device reports, not the name's 16 GB


def test_tf32_is_set_on_gpus_only_and_follows_the_config():
    from llm_ds.hardware import set_matmul_precision

    before = torch.get_float32_matmul_precision()
    try:
        set_matmul_precision("cpu", True)
        assert torch.get_float32_matmul_precision() == before
        set_matmul_precision("cuda", True)
        assert torch.get_float32_matmul_precision() == "high"  # TF32 tensor cores for fp32 matmuls
        set_matmul_precision("cuda", False)
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
