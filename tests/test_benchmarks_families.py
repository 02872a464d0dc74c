"""``python -m benchmarks memory --model-family flux2|sd3`` on each family's tiny model (issue 17 item 4).

Saved-for-backward bytes are exact, so they are asserted: LeapAlign's are the same at every T,
naive BPTT's grow with T. Timings are not (DESIGN §4).
"""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.__main__ import main as bench_main


@pytest.mark.parametrize("family", ["flux2", "sd3"])
def test_memory_suite_runs_each_family(tmp_path, family, monkeypatch):
    from benchmarks.families import kernels_available

    monkeypatch.setenv("LEAPKERNELS_BACKEND", "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench_main(["memory", "--model-family", family, "--steps", "2", "3", "--methods", "leapalign", "bptt",
                           "leapalign+kernels", "--in-process", "--json", str(tmp_path / "m.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads((tmp_path / "m.json").read_text())
    points = {(r["method"], r["steps"]): r for r in doc["records"]}
    assert all(r["status"] == "ok" and r["model_family"] == family and r["cfg"] for r in doc["records"])
    assert points["leapalign", 2]["saved_bytes"] == points["leapalign", 3]["saved_bytes"] > 0
    assert points["bptt", 3]["saved_bytes"] > points["bptt", 2]["saved_bytes"]
    assert points["bptt", 3]["saved_bytes"] > points["leapalign", 3]["saved_bytes"]
    assert doc["config"]["model_family"] == family and doc["config"]["model"].startswith("tiny ")
    assert (("leapalign+kernels", 2) in points) == kernels_available(family)
    assert ("leapalign+kernels" in doc["config"]["methods_left_out"]) != kernels_available(family)


def test_memory_suite_refuses_a_flux1_model_name_with_another_family():
    with pytest.raises(SystemExit, match="--model='test' names a FLUX.1 config"):
        bench_main(["memory", "--model-family", "sd3", "--model", "test"])
