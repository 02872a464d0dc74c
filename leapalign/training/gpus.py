"""GPUs the planner answers for: dense bf16 tensor FLOP/s, memory bandwidth and memory size.

FLOP/s are the datasheets' *dense* bf16 tensor-core figures (the "with sparsity" figures are twice
these). ``memory_bytes`` is what the driver reports as total (nvidia-smi), not the marketing GB.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GPU", "GPUS", "gpu_named", "usable_bytes", "MIB", "GIB"]

MIB = 2**20
GIB = 2**30
#: Reserved on every GPU before the trainer allocates: CUDA context, cuBLAS/NCCL workspaces.
CONTEXT_BYTES = GIB
#: Share of the rest the caching allocator can hand out before fragmentation bites.
ALLOCATOR_SHARE = 0.95


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense bf16 tensor FLOP/s
    bandwidth: float  # memory bandwidth, bytes/s
    memory_bytes: int  # total device memory as the driver reports it


GPUS: dict[str, GPU] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity -> 989.4 dense;
    # 80 GB HBM3 at 3.35 TB/s. nvidia-smi total: 81,559 MiB.
    "H100-SXM": GPU("H100-SXM", 989.4e12, 3.35e12, 81559 * MIB),
    # Same datasheet (PCIe): BF16 1,513 TFLOPS sparse -> 756.5 dense; 80 GB HBM2e at 2.0 TB/s.
    "H100-PCIe": GPU("H100-PCIe", 756.5e12, 2.0e12, 81559 * MIB),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS sparse -> 989.4 dense;
    # 141 GB HBM3e at 4.8 TB/s. nvidia-smi total: 143,771 MiB.
    "H200": GPU("H200", 989.4e12, 4.8e12, 143771 * MIB),
    # NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): BF16 312 TFLOPS dense (624 sparse);
    # HBM2e at 2,039 GB/s. nvidia-smi total: 81,920 MiB.
    "A100-80GB": GPU("A100-80GB", 312e12, 2.039e12, 81920 * MIB),
    # NVIDIA L40S datasheet: BF16 362.05 TFLOPS dense (733 with sparsity); 48 GB GDDR6 at 864 GB/s.
    # nvidia-smi total: 46,068 MiB.
    "L40S": GPU("L40S", 362.05e12, 864e9, 46068 * MIB),
    # NVIDIA Ada Lovelace GPU architecture whitepaper, appendix table (GeForce RTX 4090): peak BF16
    # tensor TFLOPS with FP32 accumulate 165.2 dense (330.4 sparse); 24 GB GDDR6X at 1,008 GB/s.
    # nvidia-smi total: 24,564 MiB.
    "RTX-4090": GPU("RTX-4090", 165.2e12, 1.008e12, 24564 * MIB),
}

_ALIASES = {"h100": "H100-SXM", "h100sxm": "H100-SXM", "h100pcie": "H100-PCIe", "h200": "H200",
            "a100": "A100-80GB", "a10080gb": "A100-80GB", "l40s": "L40S", "4090": "RTX-4090", "rtx4090": "RTX-4090"}


def gpu_named(name: str) -> GPU:
    """The GPU called ``name`` (case, spaces, dashes and underscores ignored); unknown names raise."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    for gpu_name in GPUS:
        if key == "".join(ch for ch in gpu_name.lower() if ch.isalnum()):
            return GPUS[gpu_name]
    if key in _ALIASES:
        return GPUS[_ALIASES[key]]
    raise ValueError(f"unknown GPU name={name!r}; expected one of {list(GPUS)}")


def usable_bytes(memory_bytes: int) -> int:
    """What a training process can count on of ``memory_bytes``: minus the context, times the allocator share."""
    return int((memory_bytes - CONTEXT_BYTES) * ALLOCATOR_SHARE)
