"""Kernels written the way leapkernels' were before issue 13, for tests/kernels/test_aot.py to
show that its PTX checks catch each finding (imported only where the interpreter is off)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _int32_counter_kernel(x_ptr, out_ptr, N, n_progs, BLOCK: tl.constexpr):
    """Finding 1: a 32-bit program id drives the loop, so its counter is 32-bit and wraps past 2**31."""
    p = tl.program_id(0)
    for start in range(p * BLOCK, N, n_progs * BLOCK):
        offs = tl.arange(0, BLOCK) + start
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < N) * 2.0, mask=offs < N)


@triton.jit
def _stride2_kernel(x_ptr, out_ptr, HALF: tl.constexpr):
    """Finding 2: even/odd elements split by stride-2 loads: no vector instruction can serve them."""
    ev = tl.arange(0, HALF) * 2
    even = tl.load(x_ptr + ev)
    odd = tl.load(x_ptr + ev + 1)
    tl.store(out_ptr + ev, -odd)
    tl.store(out_ptr + ev + 1, even)


def launch(x, out):
    """Launch both canaries on ``x`` (recorded, not run, under `leapkernels.aot.recording`)."""
    n = x.numel()
    _int32_counter_kernel[(132,)](x, out, n, 132, BLOCK=2048, num_warps=8, enable_fp_fusion=True)
    _stride2_kernel[(1,)](x, out, HALF=64, num_warps=1, enable_fp_fusion=True)
