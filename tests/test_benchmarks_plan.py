"""Smoke test of ``python -m benchmarks plan``: one point on the tiny ``test`` model, the result files'
shape, resuming from the per-point records, the FSDP2 world-size bound, and the GPU suite's pairing
of planned and measured points.
"""
from __future__ import annotations

import json
import os

from benchmarks.__main__ import main as bench_main
from benchmarks.gpu_suite import pair_planned_measured
from benchmarks.plan import fsdp_lower_bound, point_key

RECORD_KEYS = {"method", "resolution", "train_mode", "world_size", "peak_bytes", "flops", "roofline_s", "fits",
               "plan_seconds", "rss_peak_bytes", "status"}


def test_plan_suite_one_tiny_point_and_resume(tmp_path, capsys):
    path = tmp_path / "plan_test.json"
    argv = ["plan", "--model", "test", "--points", "leapalign/16/lora", "--threads", "1", "--json", str(path)]
    assert bench_main(argv) == 0
    doc = json.loads(path.read_text())
    assert set(doc) == {"suite", "machine", "config", "records", "summary"}
    assert doc["suite"] == "plan" and doc["machine"]["command"].startswith("python -m benchmarks plan ")
    (rec,) = doc["records"]
    assert RECORD_KEYS <= set(rec) and rec["status"] == "ok", rec
    assert (rec["method"], rec["resolution"], rec["train_mode"], rec["world_size"]) == ("leapalign", 16, "lora", 1)
    assert rec["peak_bytes"] > 0 and rec["flops_per_iteration"] > 0
    assert set(rec["fits"]) == {"24GB", "48GB", "80GB", "141GB"} and rec["fits"]["24GB"]
    assert "H100-SXM" in rec["roofline_s"]
    point = tmp_path / "plan_test_points" / (point_key("leapalign", 16, "lora") + ".json")
    assert json.loads(point.read_text())["peak_bytes"] == rec["peak_bytes"]
    assert os.path.exists(tmp_path / "plan_test.md") and os.path.exists(tmp_path / "plan_test.png")
    capsys.readouterr()
    assert bench_main(argv) == 0  # resumed: the finished point is read back, not planned again
    assert "done before" in capsys.readouterr().out
    # --collect plans nothing: the finished point is written, the unplanned one is left out
    assert bench_main([*argv[:4], "bptt/16/lora", *argv[4:], "--collect"]) == 0
    assert [r["method"] for r in json.loads(path.read_text())["records"]] == ["leapalign"]


def test_fsdp_lower_bound_is_sharded_state():
    rec = {"breakdown": {"params": 400, "grads": 400, "optimizer": 800, "ema": 400, "activations": 10_000}}
    assert fsdp_lower_bound(rec, 1) == 2000 and fsdp_lower_bound(rec, 4) == 500


def test_pair_planned_measured_matches_method_and_steps():
    planned = [{"method": "leapalign", "steps": 25, "status": "ok", "saved_bytes": 110, "peak_bytes": 1_000,
                "breakdown": {"optimizer": 100, "ema": 50}, "fits": {"80GB": True}, "peak_phase": "backward"},
               {"method": "bptt", "steps": 25, "status": "error"}]
    measured = [{"method": "leapalign", "steps": 25, "status": "ok", "saved_bytes": 100, "peak_bytes": 200,
                 "peak_allocated_bytes": 1_000},
                {"method": "bptt", "steps": 25, "status": "oom", "saved_bytes": None, "peak_bytes": None}]
    rows = pair_planned_measured(planned, measured)
    assert [r["method"] for r in rows] == ["leapalign", "bptt"]
    la, bp = rows
    assert la["planned"] and la["planned_peak_no_optimizer_bytes"] == 850 and la["measured_peak_bytes"] == 1_000
    assert la["saved_ratio"] == 1.1 and la["peak_ratio"] == 0.85 and la["planned_fits_80gb"]
    assert not bp["planned"] and bp["measured_status"] == "oom"


def test_resume_only_reuses_points_planned_with_the_same_settings():
    from benchmarks.plan import _same_settings, point_settings

    rec = {"settings": point_settings("test", 25, 64, True), "status": "ok"}
    assert _same_settings(rec, point_settings("test", 25, 64, True))
    assert not _same_settings(rec, point_settings("test", 25, 8, True))
    assert not _same_settings(rec, point_settings("test", 25, 64, True, reward="pickscore"))


def test_plan_check_smoke(tmp_path):
    """``python -m benchmarks plan_check`` on the tiny model: every field of the extrapolated plan equal."""
    import json

    from benchmarks.plan_check import main

    out = tmp_path / "check.json"
    assert main(["--model", "test", "--point", "bptt_ckpt/16/lora", "--steps", "5", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["summary"]["all_equal"] and {r["field"] for r in doc["records"]} >= {"peak_bytes", "flops"}
