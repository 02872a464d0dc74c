"""What the op modules share: the optional triton import, launch shapes, registration, small helpers.

Launch shapes (GPU; the interpreter ignores ``num_warps`` and the contraction choice):
    row kernels     one program per (sample, slice of rows); a tile of ``BLOCK_R`` rows x
                    ``BLOCK_D`` columns, ``BLOCK_D`` the row width rounded up to a power of two
                    but at most `MAX_BLOCK_D`: wider rows (FLUX.2, other DiTs) are walked in
                    column chunks, so registers do not grow with the model width;
    stream kernels  one program per (sample, slice of a flat ``[B, N]`` row), `STREAM_BLOCK`
                    elements a step (8 per thread with 8 warps).
Both loop over their slice with 64-bit counters (a 32-bit one wraps past 2**31 elements and
writes out of bounds); the program count is one resident wave (`backend.program_budget`).
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

MAX_BLOCK_D = 1024
"""Widest column chunk of a row kernel (FLUX.1's 3,072 and 12,288 are whole multiples of it)."""

STREAM_BLOCK = 2048
"""Elements a stream-kernel program handles per step on a GPU (8 warps x 32 threads x 8)."""

FP_CONTRACTION = True
"""Floating-point contraction (``a * b + c`` -> one FMA) in every compiled kernel, chosen here
rather than left to Triton's default (which changes across releases): one rounding instead of
two, as the C++ kernels get from the compiler. Passed as ``enable_fp_fusion`` at every launch."""


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether an op call must go through its ``autograd.Function``: grad mode is on and an input
    requires grad. Otherwise the public op runs its forward kernel directly -- no ``ctx``, nothing
    saved, no ``Function.apply`` dispatch -- which is what every no-grad rollout step calls."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the call: the ops then lower to their plain-PyTorch
    references (dynamo cannot trace the native/Triton launchers; inductor fuses the references
    itself, and AOTAutograd decides what a compiled backward saves)."""
    return torch.compiler.is_compiling()


def launch_options(num_warps: int) -> dict:
    """Compile options every launch passes: its warps and the explicit contraction choice."""
    return {"num_warps": num_warps, "enable_fp_fusion": FP_CONTRACTION}


def device_fn(fn: Callable) -> Callable:
    """A helper kernels call: jit-compiled for GPUs; plain Python under the interpreter (a nested
    jit call costs the interpreter a full re-patch of triton.language, ~1 ms a call)."""
    if triton is None or backend.interpreter_enabled():
        return fn
    return triton.jit(fn)


def acc_tl(dtype: torch.dtype):
    """The Triton accumulation dtype for inputs of ``dtype``: fp64 stays fp64 (gradcheck), else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def no_forward(op: str) -> Callable:
    """The forward kernel of an op whose forward is a view (never called)."""

    def forward(*args):
        raise AssertionError(f"{op} has no forward kernel: its forward is a view")

    return forward


def row_launch(
    batch: int, rows: int, d: int, device: torch.device, *, cap: bool = True, tile_fraction: int = 1
) -> tuple[int, int, int, int]:
    """``(BLOCK_R, BLOCK_D, n_progs, num_warps)`` of a row kernel over ``batch`` samples of
    ``rows`` x ``d``; ``cap=False`` for kernels that hold a whole row (QK norm: head dims);
    ``tile_fraction`` shrinks the tile for kernels that hold many operands at once."""
    block_d = triton.next_power_of_2(d)
    if cap:
        block_d = min(block_d, MAX_BLOCK_D)
    tile = backend.tile_elements(device) // tile_fraction
    block_r = max(1, min(tile // block_d, triton.next_power_of_2(rows)))
    warps = backend.num_warps(block_r * block_d)
    n_progs = max(1, min(triton.cdiv(rows, block_r), backend.program_budget(device, warps) // batch or 1))
    return block_r, block_d, n_progs, warps


def stream_launch(batch: int, n: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK, n_progs, num_warps)`` of a stream kernel over ``batch`` flat rows of ``n`` elements."""
    tile = STREAM_BLOCK if backend.gpu_target(device) is not None else backend.tile_elements(device)
    block = min(triton.next_power_of_2(max(n, 1)), tile)
    warps = backend.num_warps(block)
    n_progs = max(1, min(triton.cdiv(n, block), backend.program_budget(device, warps) // batch or 1))
    return block, n_progs, warps


def register_op(op: str, reference: tuple[Callable, Callable], compiled: tuple[Callable, Callable] | None) -> None:
    """Register an op's ``reference`` (forward, backward) kernels, and its Triton ones where triton imports."""
    backend.register(op, "reference", backend.KernelSet(*reference))
    if triton is not None and compiled is not None:
        backend.register(op, "triton", backend.KernelSet(*compiled))
