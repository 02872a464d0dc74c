"""What the op modules share: the optional triton import, launch shapes, registration, small helpers.

Launch shapes (CUDA; the interpreter ignores ``num_warps``):
    row kernels     one program per (sample, slice of rows); a tile of ``BLOCK_R`` rows x
                    ``BLOCK_D`` columns (``BLOCK_D`` = the row width rounded up to a power of two);
    stream kernels  one program per (sample, slice of a flat ``[B, N]`` row); ``BLOCK`` elements a step.
Both loop over their slice, so the program count (`backend.program_budget`) is independent of
the tensor size.
"""
from __future__ import annotations

from typing import Callable

import torch

from leapkernels import backend

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only platforms without triton: the reference backend still works
    triton = None
    tl = None


def acc_tl(dtype: torch.dtype):
    """The Triton accumulation dtype for inputs of ``dtype``: fp64 stays fp64 (gradcheck), else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def no_forward(op: str) -> Callable:
    """The forward kernel of an op whose forward is a view (never called)."""

    def forward(*args):
        raise AssertionError(f"{op} has no forward kernel: its forward is a view")

    return forward


def row_launch(batch: int, rows: int, d: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_D, n_progs)`` of a row kernel over ``batch`` samples of ``rows`` x ``d``."""
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(backend.tile_elements(device) // block_d, triton.next_power_of_2(rows)))
    n_progs = max(1, min(triton.cdiv(rows, block_r), backend.program_budget(device) // batch or 1))
    return block_r, block_d, n_progs


def stream_launch(batch: int, n: int, device: torch.device) -> tuple[int, int]:
    """``(BLOCK, n_progs)`` of a stream kernel over ``batch`` flat rows of ``n`` elements."""
    block = min(triton.next_power_of_2(max(n, 1)), backend.tile_elements(device))
    n_progs = max(1, min(triton.cdiv(n, block), backend.program_budget(device) // batch or 1))
    return block, n_progs


def register_op(op: str, reference: tuple[Callable, Callable], compiled: tuple[Callable, Callable] | None) -> None:
    """Register an op's ``reference`` (forward, backward) kernels, and its Triton ones where triton imports."""
    backend.register(op, "reference", backend.KernelSet(*reference))
    if triton is not None and compiled is not None:
        backend.register(op, "triton", backend.KernelSet(*compiled))
