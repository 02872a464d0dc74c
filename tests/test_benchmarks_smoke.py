"""Smoke test of ``python -m benchmarks``: tiny sizes, every method runs, result files have the shape
the README and the plot suite rely on. Timings are never asserted (DESIGN §4); memory is, because
saved-for-backward bytes are exact.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks.__main__ import main as bench_main
from benchmarks.workload import METHODS

TINY = ["--model", "test", "--steps", "2", "3", "--methods", "all"]
TINY_THROUGHPUT = ["--model", "test", "--steps", "3", "--methods", "all", "--repeats", "1", "--warmup", "0"]
RESULT_KEYS = {"suite", "machine", "config", "records", "summary"}
MACHINE_KEYS = {"command", "cpu", "gpu", "torch", "triton", "diffusers", "utc"}


def _load(path) -> dict:
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    assert set(doc) == RESULT_KEYS
    assert MACHINE_KEYS <= set(doc["machine"])
    assert doc["machine"]["command"].startswith("python -m benchmarks ")
    return doc


def _by_point(doc: dict) -> dict[tuple[str, int], dict]:
    return {(r["method"], r["steps"]): r for r in doc["records"]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run the three measuring suites once at tiny sizes (one torch thread, reference kernels).

    The reference backend keeps "LeapAlign + leapkernels" out of the Triton interpreter: the
    harness is under test here, the kernels have their own tests.
    """
    out = tmp_path_factory.mktemp("bench")
    paths = {s: out / f"{s}.json" for s in ("memory", "throughput", "kernels")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LEAPKERNELS_BACKEND", "reference")
            assert bench_main(["memory", *TINY, "--in-process", "--json", str(paths["memory"])]) == 0
            assert bench_main(["throughput", *TINY_THROUGHPUT, "--json", str(paths["throughput"])]) == 0
            assert bench_main(["kernels", "--shape", "tiny", "--no-compile", "--min-run-time", "0.001",
                               "--json", str(paths["kernels"])]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, paths


def test_memory_every_method_ran_and_saved_bytes_behave(results):
    """Every method x T finished; naive BPTT's saved bytes grow with T, LeapAlign's do not."""
    _, paths = results
    doc = _load(paths["memory"])
    points = _by_point(doc)
    assert set(points) == {(m, t) for m in METHODS for t in (2, 3)}
    for rec in doc["records"]:
        assert rec["status"] == "ok", rec
        for key in ("saved_bytes", "peak_bytes", "seconds"):
            assert key in rec
        assert rec["saved_bytes"] > 0 and rec["seconds"] > 0
    assert points["bptt", 3]["saved_bytes"] > points["bptt", 2]["saved_bytes"]
    assert points["leapalign", 3]["saved_bytes"] == points["leapalign", 2]["saved_bytes"]
    assert points["leapalign", 3]["saved_bytes"] < points["bptt", 3]["saved_bytes"]
    assert doc["summary"]["leapalign_saved_T3_over_T2"] == pytest.approx(1.0)
    assert os.path.exists(paths["memory"].with_suffix(".md"))


def test_throughput_split_matches_each_methods_structure(results):
    """Every method timed; the rollout/gradient split counts the velocity calls each method makes."""
    _, paths = results
    doc = _load(paths["throughput"])
    points = _by_point(doc)
    assert set(points) == {(m, 3) for m in METHODS}
    for rec in doc["records"]:
        assert rec["status"] == "ok", rec
        assert rec["seconds"] > 0 and rec["images_per_s"] > 0
        assert rec["rollout_s"] >= 0 and rec["gradient_s"] > 0
    # naive BPTT: every step with grad, none without; LeapAlign: exactly two grad forwards.
    assert (points["bptt", 3]["rollout_calls"], points["bptt", 3]["grad_calls"]) == (0, 3)
    assert (points["leapalign", 3]["rollout_calls"], points["leapalign", 3]["grad_calls"]) == (1, 2)
    assert (points["draft_k", 3]["rollout_calls"], points["draft_k", 3]["grad_calls"]) == (2, 1)


def test_kernels_every_op_timed_against_eager(results):
    _, paths = results
    doc = _load(paths["kernels"])
    ops = {r["op"] for r in doc["records"]}
    assert {"leap_connector", "grad_scale", "modulated_layernorm", "gated_residual", "qk_norm_rope",
            "gelu_tanh", "gelu_linear"} <= ops
    for op in ops:
        impls = {r["impl"]: r for r in doc["records"] if r["op"] == op}
        assert impls["eager"]["status"] == "ok" and impls["eager"]["seconds"] > 0
        fused = [r for name, r in impls.items() if name.startswith("fused[")]
        assert fused and all(r["status"] == "ok" for r in fused), impls


def test_plot_writes_pngs(results):
    out, paths = results
    assert bench_main(["plot", str(paths["memory"]), str(paths["throughput"]), str(paths["kernels"])]) == 0
    for path in paths.values():
        png = path.with_suffix(".png")
        assert png.exists() and png.stat().st_size > 1000
        with open(png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_dispatcher_rejects_unknown_suite(capsys):
    assert bench_main(["nonsense"]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_gpu_suite_plan_runs_cuda_tests_first_and_flux_dev_as_specified(tmp_path):
    """The one-call GPU suite: CUDA tests compiled (not interpreted), FLUX.1-dev at bf16/LoRA/T=25, < 10 min."""
    from benchmarks.gpu_suite import DEFAULT_BUDGET_S, stages

    plan = stages(str(tmp_path))
    assert plan[0].name == "cuda_tests" and plan[0].env == {"TRITON_INTERPRET": "0"} and "cuda" in plan[0].argv
    flux = [s for s in plan if "flux-dev" in s.argv and "--model" in s.argv]
    assert {s.name for s in flux} == {"memory_flux_dev", "throughput_flux_dev"}
    for stage in flux:
        args = " ".join(stage.argv)
        assert "--dtype bfloat16" in args and "--lora-rank 16" in args and "--steps 25" in args
    assert all(str(tmp_path) in " ".join(s.argv) for s in plan)
    assert DEFAULT_BUDGET_S < 600


def test_flux_dev_config_is_the_published_architecture():
    """Built on the meta device (no memory): FLUX.1-dev has 11.90 B transformer parameters."""
    from diffusers import FluxTransformer2DModel

    from benchmarks.flux_dev import FLUX_DEV

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV.transformer)
    assert sum(p.numel() for p in model.parameters()) == 11_901_408_320
    assert len(model.transformer_blocks) == 19 and len(model.single_transformer_blocks) == 38
