"""GPUs by name: memory, compute capability and peak throughput; one table for the planner and MFU.

Names are matched against what ``torch.cuda.get_device_name()`` returns ("NVIDIA H100 80GB HBM3",
"NVIDIA A100-SXM4-40GB", "Tesla V100-SXM2-16GB", "NVIDIA L40S") and against what a user types
for ``llm-ds plan --gpu`` ("H100", "A100-40GB"). Each pattern is a regular expression tried in
order, so the specific forms (H100 NVL, A100 40GB, L40S) come before the general ones, and a
name never matches a longer one (L4 is not L40).

Memory is what the device reports to torch (``total_memory``, bytes; shown in GiB), not the
marketing gigabytes: an "80GB" H100 reports 79.2 GiB. Figures marked ``seen`` were read from
real ``torch.cuda.get_device_properties`` output; the others are the nominal size scaled by the
ratio the seen cards of the same memory type show (HBM 0.99, GDDR 0.92-0.985). On a live GPU the
device's own figure is used instead of the table.

Peak TFLOP/s are dense (no sparsity), from the vendors' datasheets: 16-bit tensor cores, TF32
tensor cores for fp32 matmuls where TF32 is on, plain fp32 otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MiB = 2**20


@dataclass(frozen=True)
class Card:
    pattern: str  # regular expression, case-insensitive, searched in the device name
    label: str
    memory_mib: int  # as torch's total_memory reports it
    capability: tuple[int, int]
    bf16: float | None  # dense peak TFLOP/s; None: the card has no such tensor cores
    fp16: float
    tf32: float | None
    fp32: float
    nvls: bool = False  # sold on NVSwitch boards with NVLink SHARP, for which NCCL allocates NVLS buffers

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MiB

    @property
    def has_bf16(self) -> bool:
        return has_native_bf16(self.capability)


HOPPER = {"capability": (9, 0), "bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}
HOPPER_NVL = {"capability": (9, 0), "bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}
A100 = {"capability": (8, 0), "bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}
V100 = {"capability": (7, 0), "bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7}

CARDS: list[Card] = [
    Card(r"\bB200\b", "B200", 182_477, (10, 0), 2250.0, 2250.0, 1100.0, 75.0, nvls=True),
    Card(r"\bGH200\b.*\b144", "GH200 144GB", 145_981, **HOPPER),
    Card(r"\bGH200\b", "GH200 96GB", 97_320, **HOPPER),
    Card(r"\bH200 NVL\b", "H200 NVL", 143_156, **HOPPER_NVL),
    Card(r"\bH200\b", "H200", 143_156, **HOPPER, nvls=True),  # seen
    Card(r"\bH100 NVL\b", "H100 NVL", 95_293, **HOPPER_NVL),
    Card(r"\bH100 PCIe\b", "H100 PCIe", 81_008, (9, 0), 756.0, 756.0, 378.0, 51.0),  # seen
    Card(r"\bH100\b", "H100 SXM", 81_089, **HOPPER, nvls=True),  # seen
    Card(r"\bA100\b.*\b40 ?GB\b", "A100 40GB", 40_536, **A100),  # seen
    Card(r"\bA100\b", "A100 80GB", 81_069, **A100),
    Card(r"\bL40S\b", "L40S", 45_589, (8, 9), 362.0, 362.0, 183.0, 91.6),  # seen
    Card(r"\bL40\b", "L40", 45_589, (8, 9), 181.0, 181.0, 90.5, 90.5),
    Card(r"\bL4\b", "L4", 22_587, (8, 9), 121.0, 121.0, 60.0, 30.3),
    Card(r"\bA10G\b", "A10G", 22_587, (8, 6), 70.0, 70.0, 35.0, 31.2),  # seen
    Card(r"\bA10\b", "A10", 22_587, (8, 6), 125.0, 125.0, 62.5, 31.2),
    Card(r"\bV100S?\b.*\b32 ?GB\b", "V100 32GB", 32_510, **V100),
    Card(r"\bV100S?\b", "V100 16GB", 16_160, **V100),  # seen
    Card(r"\bT4\b", "T4", 15_109, (7, 5), None, 65.0, None, 8.1),  # seen
    Card(r"\bRTX 4090\b", "RTX 4090", 24_210, (8, 9), 165.0, 165.0, 82.6, 82.6),
    Card(r"\bRTX 3090\b", "RTX 3090", 24_210, (8, 6), 71.0, 71.0, 35.6, 35.6),
]


def find_card(device_name: str) -> Card | None:
    """The table's entry for a device name, or None for a device it does not know."""
    for card in CARDS:
        if re.search(card.pattern, device_name, re.IGNORECASE):
            return card
    return None


def peak_tflops(device_name: str, precision: str, override: float | None = None, tf32: bool = True) -> float | None:
    """A device's dense peak TFLOP/s for ``precision`` (bf16, fp16, fp32), or ``override``; None when unknown.

    fp32 runs count against the TF32 tensor cores where ``tf32`` is on and the card has them, else
    against plain fp32. A card without bf16 tensor cores is given its fp16 figure for bf16.
    """
    if override:
        return override
    card = find_card(device_name)
    if card is None:
        return None
    if precision == "fp32":
        return card.tf32 if tf32 and card.tf32 else card.fp32
    if precision == "bf16":
        return card.bf16 or card.fp16
    return card.fp16


def has_native_bf16(capability: tuple[int, int] | None) -> bool:
    """bf16 tensor cores: compute capability 8.0 (Ampere) and newer.

    ``torch.cuda.is_bf16_supported()`` (what DeepSpeed asks) also says yes on V100 and T4, where
    bf16 is emulated and slower than fp16.
    """
    return capability is not None and tuple(capability) >= (8, 0)


def local_gpu() -> tuple[str, int, tuple[int, int]] | None:
    """This machine's first CUDA device: name, memory in bytes as it reports it, compute capability."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.name, int(props.total_memory), (props.major, props.minor)


def device_precisions() -> tuple[str, bool, bool]:
    """The accelerator's name, and whether it has native bf16 and fp16: what ``precision: auto`` picks from.

    On CUDA, bf16 needs compute capability 8.0 (Ampere) or newer: DeepSpeed's ``is_bf16_supported``
    also says yes on V100 and T4, whose bf16 is emulated and slower than fp16.
    """
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    device, has_bf16 = accel.device_name(), accel.is_bf16_supported()
    if device == "cuda":
        gpu = local_gpu()
        has_bf16 = has_bf16 and gpu is not None and has_native_bf16(gpu[2])
    return device, has_bf16, accel.is_fp16_supported()


def set_matmul_precision(device: str, tf32: bool) -> None:
    """On a GPU, let fp32 matmuls use TF32 tensor cores (``train.tf32``), or keep them full fp32."""
    import torch

    if device == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
