"""Ahead-of-time compilation of every kernel through its launcher (`leapkernels.aot`), for GPUs
this machine does not have: what the interpreter cannot show (registers, spills, vector access,
integer widths) asserted at FLUX.1-dev shapes and at the widths of wider DiTs.

The compiles run in one subprocess (the kernels must be imported with the interpreter off):
sm_90 in bf16 and fp32 at widths 3,072, 6,144 and 12,288, plus sm_80 in bf16 at 3,072 (the two
ptxas binaries of the wheel). The full matrix (sm_80/90/100 x fp32/bf16/fp16 x three widths) is
``python -m benchmarks aot``. Checks of the checks: kernels written as before issue 13
(`aot_canaries`) must be flagged.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leapkernels import backend

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"_mln_fwd_kernel", "_mln_bwd_kernel", "_gr_fwd_kernel", "_gr_bwd_kernel", "_qkr_fwd_kernel", "_qkr_bwd_kernel",
           "_gelu_fwd_kernel", "_gelu_bwd_kernel", "_sumsq_kernel", "_scale_kernel", "_leap_fwd_kernel", "_leap_bwd_kernel",
           "_swiglu_fwd_kernel", "_swiglu_bwd_kernel"}
STREAMING = {"_gelu_fwd_kernel", "_gelu_bwd_kernel", "_sumsq_kernel", "_scale_kernel", "_leap_fwd_kernel", "_leap_bwd_kernel"}
SCALAR_LOADS = {"_leap_fwd_kernel": 1, "_leap_bwd_kernel": 1, "_scale_kernel": 2}
"""Loads that are scalar by nature: the per-sample coefficient (c, alpha), and the capped scale's
per-program partial sums (n_progs values at an offset of b * n_progs)."""
SCALAR_STORES = {"_leap_fwd_kernel": 1, "_leap_bwd_kernel": 1, "_sumsq_kernel": 1, "_qkr_bwd_kernel": 1}
"""One store per program after its loop: its partial sum (a value, or a d-weight row)."""

SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import torch
from dataclasses import asdict
from leapkernels import aot
out = [asdict(v) for v in aot.run_matrix((90,), ("bf16", "fp32"), (3072, 6144, 12288), jobs=2)]
out += [asdict(v) for v in aot.run_matrix((80,), ("bf16",), (3072,), jobs=2)]
from tests.kernels import aot_canaries
with aot.recording() as launches:
    x = torch.empty(3 * 2**20, device="meta")
    aot_canaries.launch(x, x)
for launch in launches:
    v = aot.compile_launch(launch, 90, aot.Variant(launch.kernel.__name__, 90, "fp32", 0, "canary"))
    out.append(asdict(v))
json.dump(out, open({path!r}, "w"))
"""


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> list[dict]:
    """The compiled variants, compiled once per session (shared by pytest-xdist's workers)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()  # this session's; under xdist its parent is the session's
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "leapkernels-aot-variants.json"
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            proc = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT), path=str(path))], env=env,
                                  capture_output=True, text=True, timeout=600, cwd=ROOT)
            assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(path.read_text())


def _ours(variants):
    return [v for v in variants if v["case"] != "canary"]


def test_every_kernel_compiles_for_sm90_and_sm80(variants):
    ours = _ours(variants)
    failed = [f"sm_{v['arch']} {v['dtype']} w={v['width']} {v['kernel']} [{v['case']}]: {v['error']}" for v in ours if not v["ok"]]
    assert not failed, "\n".join(failed)
    for arch in (90, 80):
        assert {v["kernel"] for v in ours if v["arch"] == arch} == KERNELS, arch


def test_no_register_spills_at_any_width_up_to_12288(variants):
    spills = [f"{v['kernel']} {v['dtype']} w={v['width']} [{v['case']}]: {v['spill_bytes']} B" for v in _ours(variants)
              if v["spill_bytes"]]
    assert not spills, "\n".join(spills)
    assert {v["width"] for v in _ours(variants)} == {3072, 6144, 12288}


def test_registers_within_budget_at_widths_3072_and_6144(variants):
    """<= 128 registers a thread (backend.REGISTER_BUDGET, what the program budget assumes): row
    kernels cap their column chunk, so width does not raise it (finding 3: 251 at 5,120 before)."""
    over = [f"{v['kernel']} {v['dtype']} w={v['width']} [{v['case']}]: {v['registers']}" for v in _ours(variants)
            if v["width"] in (3072, 6144) and v["registers"] > backend.REGISTER_BUDGET]
    assert not over, "\n".join(over)


def test_contiguous_memory_is_read_and_written_with_vector_instructions(variants):
    """Every global load/store is a v2/v4 instruction except the scalar-by-nature ones listed
    (finding 2: qk_norm_rope's stride-2 loads gave 0 of 18-66)."""
    bad = []
    for v in _ours(variants):
        if v["loads"] - v["vector_loads"] > SCALAR_LOADS.get(v["kernel"], 0):
            bad.append(f"{v['kernel']} {v['dtype']} [{v['case']}]: {v['vector_loads']}/{v['loads']} vector loads")
        if v["stores"] - v["vector_stores"] > SCALAR_STORES.get(v["kernel"], 0):
            bad.append(f"{v['kernel']} {v['dtype']} [{v['case']}]: {v['vector_stores']}/{v['stores']} vector stores")
    assert not bad, "\n".join(bad)


def test_streaming_kernels_count_with_64_bit_loop_counters(variants):
    """Finding 1: a 32-bit counter wraps for tensors within n_progs x BLOCK of 2**31 and writes out
    of bounds. Every loop of a streaming kernel closes on a 64-bit compare; every row kernel's
    row loop too (its column loops, bounded by the width, may stay 32-bit)."""
    for v in _ours(variants):
        bits = v["loop_compare_bits"]
        assert bits, f"{v['kernel']}: no loop found in its PTX"
        if v["kernel"] in STREAMING:
            assert set(bits) == {64}, f"{v['kernel']} {v['dtype']} [{v['case']}]: {bits}"
        else:
            assert 64 in bits, f"{v['kernel']} {v['dtype']} [{v['case']}]: {bits}"


def test_stream_launches_are_occupancy_aware(variants):
    """Finding 4: 8 values a thread (BLOCK = 8 x 32 x num_warps), registers within the budget, and
    at most one resident wave of programs on an H100 (132 SMs; threads and registers per SM) —
    exactly one where the tensor has the work for it (GELU over the MLP activations)."""
    for v in _ours(variants):
        if v["kernel"] not in STREAMING:
            continue
        block = int(dict(kv.split("=") for kv in v["constexprs"].split(", "))["BLOCK"])
        assert block == 8 * 32 * v["num_warps"], (v["kernel"], block, v["num_warps"])
        threads = 32 * v["num_warps"]
        wave = 132 * min(2048 // threads, 65536 // (threads * backend.REGISTER_BUDGET))
        assert v["programs"] <= wave and v["registers"] <= backend.REGISTER_BUDGET, (v["kernel"], v["programs"], wave)
        if v["kernel"].startswith("_gelu"):
            assert v["programs"] == wave, (v["kernel"], v["programs"], wave)


def test_floating_point_contraction_is_chosen_explicitly(variants):
    """Finding 5: every launch passes enable_fp_fusion (leapkernels.ops._common.FP_CONTRACTION), not
    triton's default; it is on, so the arithmetic kernels' PTX holds FMAs."""
    from leapkernels.ops._common import FP_CONTRACTION

    assert all(v["fp_fusion"] is FP_CONTRACTION for v in _ours(variants))
    assert all(v["fma"] > 0 for v in _ours(variants) if v["kernel"] in ("_mln_fwd_kernel", "_gelu_fwd_kernel", "_qkr_fwd_kernel"))


def test_the_checks_flag_kernels_written_as_before(variants):
    """The canaries: a 32-bit loop counter and stride-2 loads are each caught."""
    canary = {v["kernel"]: v for v in variants if v["case"] == "canary"}
    assert canary["_int32_counter_kernel"]["ok"] and 32 in canary["_int32_counter_kernel"]["loop_compare_bits"]
    assert canary["_stride2_kernel"]["ok"] and canary["_stride2_kernel"]["vector_loads"] == 0
