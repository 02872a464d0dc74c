"""``python -m benchmarks gpu [--out DIR]``: the whole GPU suite in one call, under 10 minutes on one H100.

Runs, each stage in its own process with its own time limit inside one global budget
(``--budget``, default 570 s), every file written to one folder (``--out``):

1. the CUDA tests: ``pytest -m cuda tests`` with ``TRITON_INTERPRET=0`` (compiled kernels);
2. memory and throughput on the real FLUX.1-dev architecture with random weights
   (``--model flux-dev``: 19 double + 38 single blocks, 24 x 128 heads, 512x512 -> 1024 image
   tokens + 512 text tokens, bf16, LoRA rank 16, T = 25); naive BPTT is expected to run out of
   memory there and is recorded as ``status: oom``; throughput puts LeapAlign with the compiled
   rollout (CUDA graphs on and off) and plain sampling (eager, compiled both ways) next to eager
   LeapAlign and BPTT (`FLUX_DEV_THROUGHPUT_METHODS`: the issue-15 ratios);
3. the fused-op kernels at FLUX.1-dev shapes (``triton.testing.do_bench``, GB/s);
4. memory and throughput on the ``cpu-bench`` model on CUDA (T = 4..50), comparable to the CPU run;
5. the activations suite (patched vs eager Flux forward);
6. ``plot`` over the folder, and ``gpu_suite.json``: the machine block, each stage's command, exit
   code, seconds and log file.

Beside the GPU stages, on the CPUs, ``python -m benchmarks plan`` plans every FLUX.1-dev point the
memory stage measures, configured the same way (``GPU_SUITE_PLAN`` below); at the end
``plan_vs_measured_flux-dev.{json,md}`` puts planned and measured saved-for-backward bytes and peaks
side by side, so the first lent GPU checks the planner (points the planner did not finish within
the budget are marked ``planned: false``).

Stages are ordered by value: when the budget runs short the later ones are skipped (recorded as
``skipped``), never the tests. Needs a CUDA build of torch with triton, diffusers, peft and
nvidia-ml-py installed in the running interpreter.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

from benchmarks.machine import machine_info
from benchmarks.options import REPO_ROOT, RESULTS_DIR, parse_suite_args, suite_parser

__all__ = ["main", "stages", "DEFAULT_BUDGET_S"]

# The issue-15 ratios on FLUX.1-dev: the compiled rollout with CUDA graphs on and off next to the eager
# one, plain sampling the same three ways, naive BPTT (out of memory there) and BPTT + checkpointing.
FLUX_DEV_THROUGHPUT_METHODS = (
    "leapalign", "leapalign+kernels", "leapalign+kernels+compiled", "leapalign+kernels+compiled-nographs",
    "bptt", "bptt_ckpt", "sampling", "sampling+compiled", "sampling+compiled-nographs",
)
DEFAULT_BUDGET_S = 570.0  # the issue: one call under 10 minutes; 30 s left for start-up and copy-back


@dataclass(frozen=True)
class Stage:
    name: str
    argv: list[str]
    limit_s: float
    env: dict[str, str] | None = None


def stages(out: str, python: str = sys.executable) -> list[Stage]:
    """The suite's stages in run order, every output under ``out``."""
    bench = [python, "-m", "benchmarks"]
    flux = ["--device", "cuda", "--model", "flux-dev", "--dtype", "bfloat16", "--lora-rank", "16", "--steps", "25"]
    tiny = ["--device", "cuda", "--model", "cpu-bench", "--dtype", "float32"]
    j = lambda name: os.path.join(out, name)  # noqa: E731 - a path helper local to this list
    return [
        Stage("cuda_tests", [python, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                             f"--junitxml={j('cuda_tests.xml')}", "tests"], 150, {"TRITON_INTERPRET": "0"}),
        Stage("memory_flux_dev", [*bench, "memory", *flux, "--in-process", "--json", j("memory_cuda_flux-dev.json")], 120),
        Stage("throughput_flux_dev", [*bench, "throughput", *flux, "--methods", *FLUX_DEV_THROUGHPUT_METHODS,
                                      "--repeats", "2", "--warmup", "1", "--json", j("throughput_cuda_flux-dev.json")], 270),
        Stage("kernels_flux_dev_shapes", [*bench, "kernels", "--device", "cuda", "--shape", "flux-dev", "--dtype", "bfloat16",
                                          "--json", j("kernels_cuda.json")], 75),
        Stage("memory_cpu_bench", [*bench, "memory", *tiny, "--in-process", "--json", j("memory_cuda.json")], 45),
        Stage("throughput_cpu_bench", [*bench, "throughput", *tiny, "--repeats", "3", "--warmup", "1",
                                       "--json", j("throughput_cuda.json")], 60),
        Stage("activations", [*bench, "activations", "--device", "cuda", "--json", j("activations_cuda.json")], 40),
    ]


def _run_stage(stage: Stage, limit: float, out: str) -> dict[str, object]:
    log_path = os.path.join(out, f"{stage.name}.log")
    env = {**os.environ, **(stage.env or {})}
    record: dict[str, object] = {"stage": stage.name, "command": " ".join(stage.argv), "limit_s": round(limit, 1),
                                 "log": os.path.basename(log_path)}
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            proc = subprocess.run(stage.argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
            record["rc"] = proc.returncode
            record["status"] = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            record["rc"] = None
            record["status"] = "timeout"
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def _start_plan(out: str) -> subprocess.Popen | None:
    """Plan the FLUX.1-dev memory points on the CPUs while the GPU stages run (its own log)."""
    from benchmarks.workload import DEFAULT_METHODS

    jobs = max(1, min(len(DEFAULT_METHODS), (os.cpu_count() or 2) // 2))
    argv = gpu_suite_plan_argv(sys.executable, DEFAULT_METHODS, os.path.join(out, "plan_flux-dev.json"), jobs)
    log = open(os.path.join(out, "plan_flux_dev.log"), "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    # its own process group: at the deadline the planner and the point processes it started stop together
    return subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish_plan(proc: subprocess.Popen | None, out: str, wait_s: float) -> dict[str, object]:
    """Wait for the planner (at most ``wait_s``), then write planned next to measured from what exists."""

    record: dict[str, object] = {"stage": "plan_vs_measured", "log": "plan_flux_dev.log"}
    if proc is not None:
        try:
            proc.wait(timeout=max(1.0, wait_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        record["plan_rc"] = proc.returncode
    planned = []
    points = os.path.join(out, "plan_flux-dev_points")
    for name in sorted(os.listdir(points)) if os.path.isdir(points) else []:
        with open(os.path.join(points, name), encoding="utf-8") as fh:
            planned.append(json.load(fh))
    measured_path = os.path.join(out, "memory_cuda_flux-dev.json")
    measured = []
    if os.path.exists(measured_path):
        with open(measured_path, encoding="utf-8") as fh:
            measured = json.load(fh)["records"]
    rows = pair_planned_measured(planned, measured)
    with open(os.path.join(out, "plan_vs_measured_flux-dev.json"), "w", encoding="utf-8") as fh:
        json.dump({"rows": rows, "planned_points": len(planned)}, fh, indent=2)
        fh.write("\n")
    from benchmarks.report import Column, format_bytes, render_table

    cols = [Column("method", "method"), Column("steps", "T"), Column("measured_status", "measured"),
            Column("planned_saved_bytes", "planned saved (MiB)", format_bytes),
            Column("measured_saved_bytes", "measured saved (MiB)", format_bytes), Column("saved_ratio", "ratio"),
            Column("planned_peak_no_optimizer_bytes", "planned peak w/o AdamW+EMA (MiB)", format_bytes),
            Column("measured_peak_bytes", "measured max_memory_allocated (MiB)", format_bytes), Column("peak_ratio", "ratio")]
    with open(os.path.join(out, "plan_vs_measured_flux-dev.md"), "w", encoding="utf-8") as fh:
        fh.write("# FLUX.1-dev: planned (leapalign plan, fake tensors) vs measured (memory stage)\n\n"
                 + render_table(rows, cols) + "\n")
    record["status"] = ("ok" if rows and all(r["planned"] for r in rows)
                        else "partial" if any(r["planned"] for r in rows) else "failed")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = suite_parser("gpu", __doc__, threads=False)
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "gpu"), help="folder for every result and log")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole suite (plot included)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these stages (names as in gpu_suite.json)")
    args, argv = parse_suite_args(parser, argv)

    import torch

    if not torch.cuda.is_available():
        print("the GPU suite needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    plot_reserve = 20.0
    planner = None if args.only and "plan_vs_measured" not in args.only else _start_plan(out)
    records = []
    for stage in stages(out):
        if args.only and stage.name not in args.only:
            continue
        remaining = args.budget - plot_reserve - (time.perf_counter() - start)
        if remaining < 15:
            records.append({"stage": stage.name, "command": " ".join(stage.argv), "status": "skipped",
                            "reason": f"budget of {args.budget}s spent"})
            print(f"[gpu] {stage.name}: skipped (budget)", flush=True)
            continue
        rec = _run_stage(stage, min(stage.limit_s, remaining), out)
        records.append(rec)
        print(f"[gpu] {stage.name}: {rec['status']} in {rec['seconds']}s (log {rec['log']})", flush=True)
    if planner is not None:
        pairing = _finish_plan(planner, out, args.budget - plot_reserve - (time.perf_counter() - start))
        records.append(pairing)
        print(f"[gpu] plan_vs_measured: {pairing['status']}", flush=True)
    plot = _run_stage(Stage("plot", [sys.executable, "-m", "benchmarks", "plot", "--results", out], plot_reserve),
                      plot_reserve, out)
    records.append(plot)
    summary = {"suite": "gpu", "machine": machine_info(["gpu", *argv]),
               "config": {"out": out, "budget_s": args.budget}, "records": records,
               "summary": {"wall_s": round(time.perf_counter() - start, 1),
                           "failed": [r["stage"] for r in records if r.get("status") not in ("ok",)]}}
    with open(os.path.join(out, "gpu_suite.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    print(json.dumps(summary["summary"]))
    return 0 if not summary["summary"]["failed"] else 1


# --- the GPU suite's check of the planner (issue 14 item 6) -------------------------------------------

#: How the GPU suite's FLUX.1-dev memory stage runs (``benchmarks.gpu_suite``: bf16 weights, no autocast,
#: LoRA rank 16, T = 25, 512x512, no transformer checkpointing, a weightless reward): planned the same way.
GPU_SUITE_PLAN = ["--model", "flux-dev", "--resolutions", "512", "--train-modes", "lora", "--lora-rank", "16",
                  "--steps", "25", "--no-gradient-checkpointing", "--reward", "brightness", "--mixed-precision", "no",
                  "--trainable-dtype", "bfloat16", "--no-world-search"]


def gpu_suite_plan_argv(python: str, methods: Sequence[str], json_path: str, jobs: int) -> list[str]:
    """The command that plans the GPU suite's FLUX.1-dev memory points (CPU only; run beside the GPU stages)."""
    return [python, "-m", "benchmarks", "plan", *GPU_SUITE_PLAN, "--methods", *methods, "--jobs", str(jobs),
            "--json", json_path]


def pair_planned_measured(planned: Sequence[dict[str, Any]], measured: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per measured point (``memory`` suite records, matched by method and T): planned next to measured.

    Measured ``peak_allocated_bytes`` is CUDA's ``max_memory_allocated`` over objective forward + backward
    (weights included, no optimiser step); planned ``peak_bytes`` is the planner's per-GPU peak of the whole
    iteration (optimiser step, AdamW state and EMA included), so ``planned_peak_no_optimizer_bytes`` drops the
    AdamW state and the EMA from it for the like-for-like ratio (an upper bound when the planned peak falls
    in the optimiser step). Saved-for-backward bytes compare directly.
    """
    by_key = {(p["method"], p.get("steps")): p for p in planned if p.get("status") == "ok"}
    rows = []
    for m in measured:
        p = by_key.get((m["method"], m.get("steps")))
        row: dict[str, Any] = {"method": m["method"], "steps": m.get("steps"), "measured_status": m.get("status"),
                               "planned": p is not None,
                               "measured_saved_bytes": m.get("saved_bytes"),
                               "measured_peak_bytes": m.get("peak_allocated_bytes", m.get("peak_bytes"))}
        if p is not None:
            row["planned_saved_bytes"] = p["saved_bytes"]
            row["planned_peak_bytes"] = p["peak_bytes"]
            held = sum(int(p.get("breakdown", {}).get(k, 0)) for k in ("optimizer", "ema"))
            row["planned_peak_no_optimizer_bytes"] = p["peak_bytes"] - held
            row["planned_peak_phase"] = p.get("peak_phase")
            row["planned_fits_80gb"] = p.get("fits", {}).get("80GB")
            for key, a, b in (("saved_ratio", "planned_saved_bytes", "measured_saved_bytes"),
                              ("peak_ratio", "planned_peak_no_optimizer_bytes", "measured_peak_bytes")):
                row[key] = round(row[a] / row[b], 4) if row.get(b) else None
        rows.append(row)
    return rows
