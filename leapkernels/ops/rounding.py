"""Rounding of fp32 results into the output dtype, identical in compiled Triton and the interpreter.

Triton 3.9's interpreter truncates fp32 -> bf16 (it ignores round-to-nearest-even), which
doubles the bf16 error of every kernel under test and would hide real bugs behind a looser
tolerance. Kernels store through `rounded`, which, when asked, rounds to nearest even by
integer arithmetic first (after that the truncating cast is exact); compiled kernels skip it.
"""
from __future__ import annotations

import torch

from leapkernels.ops._common import device_fn, tl, triton

rounded = None  # without triton (set below otherwise)


def emulate_bf16_rtne(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a kernel storing ``dtype`` on ``device`` must round bf16 by hand (interpreter only)."""
    return dtype == torch.bfloat16 and device.type == "cpu"


if triton is not None:

    def _rounded(x, out_dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
        """``x`` (fp32/fp64) converted to ``out_dtype`` with round-to-nearest-even."""
        if EMULATE_RTNE:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
        return x.to(out_dtype)

    rounded = device_fn(_rounded)
