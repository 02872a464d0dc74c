"""The SwiGLU kernels compiled ahead of time (`leapkernels.aot`, family ``swiglu``) for sm_90 at the
widths of FLUX.1-dev, FLUX.2-dev and beyond, and for sm_80: what the interpreter cannot show
(registers, spills, vector access, loop counter widths), contiguous and as the strided MLP half of
FLUX.2's single-block projection. (tests/kernels/test_aot.py checks the whole default matrix.)"""
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
SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from dataclasses import asdict
from leapkernels import aot
out = [asdict(v) for v in aot.run_matrix((90,), ("bf16", "fp32"), (3072, 6144, 12288), families=("swiglu",))]
out += [asdict(v) for v in aot.run_matrix((80,), ("bf16",), (3072,), families=("swiglu",))]
json.dump(out, open({path!r}, "w"))
"""


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("aot-swiglu") / "variants.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT), path=str(path))], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(path.read_text())


def test_swiglu_kernels_compile_for_sm90_and_sm80_contiguous_and_strided(variants):
    failed = [f"sm_{v['arch']} {v['dtype']} w={v['width']} {v['kernel']} [{v['case']}]: {v['error']}" for v in variants if not v["ok"]]
    assert not failed, "\n".join(failed)
    assert {(v["kernel"], v["arch"]) for v in variants} == {
        (k, a) for k in ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel") for a in (90, 80)}
    assert {v["case"] for v in variants} == {"swiglu.fwd", "swiglu.bwd", "swiglu.fwd strided", "swiglu.bwd strided"}


def test_swiglu_kernels_neither_spill_nor_exceed_the_register_budget(variants):
    bad = [f"{v['kernel']} {v['dtype']} w={v['width']}: {v['registers']} regs, {v['spill_bytes']} B spilled"
           for v in variants if v["spill_bytes"] or v["registers"] > backend.REGISTER_BUDGET]
    assert not bad, "\n".join(bad)


def test_swiglu_kernels_move_memory_with_vector_instructions_and_64_bit_row_counters(variants):
    """Every global load and store a v2/v4 (the strided view too: its row stride is a multiple of
    16 elements); the row loop closes on a 64-bit compare; contraction chosen explicitly."""
    from leapkernels.ops._common import FP_CONTRACTION

    for v in variants:
        assert v["loads"] == v["vector_loads"] and v["stores"] == v["vector_stores"], v
        assert 64 in v["loop_compare_bits"], v
        assert v["fp_fusion"] is FP_CONTRACTION
