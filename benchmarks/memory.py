"""``python -m benchmarks memory``: bytes saved for backward and peak memory of one iteration, per method x T.

For each method and each T: build the workload (same model, batch and seed for all), run one
iteration (objective forward + ``loss.backward()``, no optimiser step) and record

- ``saved_bytes``: bytes autograd saves for backward during the objective's forward
  (``leapalign.profiling.saved_tensor_bytes``: unique storages, parameters excluded; exact on CPU);
- ``peak_bytes``: peak memory of the iteration above the level after the model was built
  (CPU: process RSS high-water mark; CUDA: ``max_memory_allocated``, plus ``nvml_peak_bytes``);
- ``seconds``: wall time of that one iteration (a cold run; see the throughput suite for medians).

On CPU every point runs in a fresh subprocess by default (``--isolate``): glibc keeps freed memory
in its arenas, so a later point in the same process would reuse it and under-report its peak.

``--model-family flux2|sd3`` runs the same sweep on that family's tiny model
(:mod:`benchmarks.families`; ``--model`` is FLUX.1's); results go to ``memory_DEVICE_FAMILY.json``.
Methods with leapkernels are left out, and the run says so, until leapkernels patches that family.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from typing import Any, Sequence

import torch

from benchmarks import headline
from benchmarks.machine import machine_info
from benchmarks.measure import NvmlPeak, is_oom, saved_bytes_of, saved_tensor_counter, synchronizer
from benchmarks.options import REPO_ROOT, add_workload_args, default_paths, parse_suite_args, suite_parser, workload_config
from benchmarks.report import Column, ResultDoc, format_bytes, format_float, write_results
from benchmarks.workload import Method, Workload, WorkloadConfig, build_method_objective, build_workload, resolve_methods, run_iteration
from leapalign.profiling import PeakMemory

__all__ = ["main", "measure_point", "COLUMNS"]

_RECORD_MARK = "@@MEMORY_RECORD "

COLUMNS = (
    Column("method", "method"), Column("steps", "T"),
    Column("saved_bytes", "saved for backward (MiB)", format_bytes), Column("peak_bytes", "peak (MiB)", format_bytes),
    Column("seconds", "seconds", format_float), Column("status", "status"),
)

NOTES = (
    "saved_bytes: unique storages autograd saves for backward during the objective forward "
    "(saved_tensors_hooks), parameters excluded.",
    "peak_bytes on CPU: process VmHWM minus VmRSS at the start of the iteration (high-water mark reset "
    "via /proc/self/clear_refs), one fresh process per point; on CUDA: torch.cuda.max_memory_allocated "
    "minus memory_allocated at the start.",
    "seconds: one cold iteration; use the throughput suite for medians.",
)


def _build(config: WorkloadConfig, family: str, kernels: bool) -> Workload:
    if family == "flux":
        return build_workload(config, kernels=kernels)
    from benchmarks.families import build_family_workload

    return build_family_workload(config, family, kernels=kernels)


def measure_point(method: Method, steps: int, config: WorkloadConfig,
                  shared: list[Workload] | None = None, family: str = "flux") -> dict[str, Any]:
    """One (method, T) point in this process; never raises for OOM/errors, records them instead.

    ``shared`` is one workload reused across points in in-process mode (the FLUX.1-dev build takes
    a while), patched or reverted to suit the method; without it the point builds its own (always,
    for a ``family`` other than FLUX.1's).
    """
    record: dict[str, Any] = {"method": method.name, "label": method.label, "steps": steps, "status": "ok",
                              "saved_bytes": None, "peak_bytes": None, "seconds": None}
    try:
        if shared and family == "flux":
            workload = shared[0]
            workload.use_kernels(method.kernels)
        else:
            workload = _build(config, family, method.kernels)
            if shared is not None and family == "flux":
                shared.append(workload)
        objective = build_method_objective(method, steps)
        record.update(workload.info)
        sync = synchronizer(workload.device)
        with contextlib.ExitStack() as stack:
            nvml = _nvml_probe(workload.device, stack)
            probe = stack.enter_context(PeakMemory(workload.device))
            result = run_iteration(objective, workload, saved_counter=saved_tensor_counter, sync=sync)
        report = probe.report
        record["peak_bytes"] = report.peak_delta
        if workload.device.type == "cuda":
            record["peak_source"] = "cuda_max_memory_allocated"
            record["peak_allocated_bytes"] = report.peak_allocated
            record["nvml_peak_bytes"] = None if nvml is None else nvml.peak - nvml.baseline
        else:
            record["peak_source"] = "rss_vmhwm" if report.peak_rss_reset else "rss_lifetime_peak"
            record["rss_before_bytes"] = report.rss_before
        record["metrics"] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        record["saved_bytes"] = saved_bytes_of(result.saved)
        record["seconds"] = result.seconds
        record["forward_s"] = result.forward_s
        record["backward_s"] = result.backward_s
        record["loss"] = result.loss
    except Exception as exc:  # noqa: BLE001 - a failed point is a result (OOM is a finding), not a crash
        record["status"] = "oom" if is_oom(exc) else "error"
        record["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return record


def _nvml_probe(device: torch.device, stack: contextlib.ExitStack) -> NvmlPeak | None:
    """Poll NVML during the iteration on CUDA (device-wide peak); None on CPU or without NVML."""
    if device.type != "cuda":
        return None
    try:
        return stack.enter_context(NvmlPeak(device.index or 0))
    except Exception:  # noqa: BLE001 - nvidia-ml-py or the driver library missing: allocator figures stand
        return None


def _point_argv(args: argparse.Namespace, method: Method, steps: int) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks", "memory", "--point", method.name, str(steps),
            "--device", args.device, "--model", args.model, "--dtype", args.dtype,
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--model-family", args.model_family]
    if args.lora_rank is not None:
        argv += ["--lora-rank", str(args.lora_rank)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return argv


def _measure_isolated(args: argparse.Namespace, method: Method, steps: int) -> dict[str, Any]:
    """Run one point in a fresh interpreter and parse the record it prints."""
    argv = _point_argv(args, method, steps)
    base = {"method": method.name, "label": method.label, "steps": steps, "saved_bytes": None,
            "peak_bytes": None, "seconds": None}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.point_timeout,
                              cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "error": f"point exceeded --point-timeout={args.point_timeout}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RECORD_MARK):
            return json.loads(line[len(_RECORD_MARK):])
    status = "oom" if proc.returncode in (-9, 137) else "error"
    return {**base, "status": status, "error": f"exit {proc.returncode}: {proc.stderr[-500:]}"}


def run_suite(args: argparse.Namespace, argv: Sequence[str]) -> ResultDoc:
    config = workload_config(args)
    methods, skipped = _family_methods(resolve_methods(args.methods), args.model_family)
    isolate = args.isolate if args.isolate is not None else config.device == "cpu"
    records = []
    shared: list[Workload] = []
    for steps in args.steps:
        for method in methods:
            t0 = time.perf_counter()
            rec = (_measure_isolated(args, method, steps) if isolate
                   else measure_point(method, steps, config, shared, args.model_family))
            rec["isolated"] = isolate
            records.append(rec)
            print(f"  memory {method.name:>18} T={steps:<3} saved={format_bytes(rec.get('saved_bytes')):>9} MiB "
                  f"peak={format_bytes(rec.get('peak_bytes')):>9} MiB  {rec['status']} ({time.perf_counter() - t0:.1f}s)",
                  flush=True)
    model = config.model if args.model_family == "flux" else _family_model(args.model_family)
    run_config = {**config.as_dict(), "model": model, "model_family": args.model_family, "steps": list(args.steps),
                  "methods": [m.name for m in methods], "methods_left_out": skipped,
                  "isolated_per_point": isolate, "measurement": "one iteration = objective forward + backward, no optimiser step"}
    summary = headline.memory_headline(records, args.steps)
    return ResultDoc("memory", machine_info(["memory", *argv]), run_config, records, summary)


def _family_methods(methods: list[Method], family: str) -> tuple[list[Method], dict[str, str]]:
    """``methods`` less the leapkernels ones where leapkernels cannot patch ``family`` (and why)."""
    if family == "flux":
        return methods, {}
    from benchmarks.families import kernels_available

    if kernels_available(family):
        return methods, {}
    why = f"leapkernels has no fused blocks for the {family} transformer yet (leapkernels.apply_leapkernels missing)"
    return [m for m in methods if not m.kernels], {m.name: why for m in methods if m.kernels}


def _family_model(family: str) -> str:
    from benchmarks.families import FAMILY_MODELS

    return FAMILY_MODELS[family]


def _paths(args: argparse.Namespace) -> tuple[str, str]:
    if args.model_family == "flux":
        return default_paths("memory", args)
    from benchmarks.options import output_paths

    return output_paths(args, f"memory_{args.device}_{args.model_family}.json")


def build_parser() -> argparse.ArgumentParser:
    parser = suite_parser("memory", __doc__)
    add_workload_args(parser)
    parser.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                        help="one subprocess per point (default on CPU)")
    parser.add_argument("--in-process", dest="isolate", action="store_false",
                        help="all points in this process (default on CUDA; CPU peaks become lower bounds)")
    parser.add_argument("--point-timeout", type=float, default=1800.0, help="seconds per isolated point")
    parser.add_argument("--model-family", default="flux", choices=("flux", "flux2", "sd3"),
                        help="flux: --model's FLUX.1 config; flux2 / sd3: that family's tiny model (benchmarks.families)")
    parser.add_argument("--point", nargs=2, metavar=("METHOD", "STEPS"), default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, argv = parse_suite_args(build_parser(), argv)
    if args.model_family != "flux" and args.model != "cpu-bench":
        raise SystemExit(f"memory: --model={args.model!r} names a FLUX.1 config; --model-family {args.model_family} "
                         "runs that family's tiny model (leave --model out)")
    if args.point is not None:
        method = resolve_methods([args.point[0]])[0]
        record = measure_point(method, int(args.point[1]), workload_config(args), family=args.model_family)
        print(_RECORD_MARK + json.dumps(record), flush=True)
        return 0
    doc = run_suite(args, argv)
    print("headline:", json.dumps(doc.summary))
    model = args.model if args.model_family == "flux" else args.model_family
    write_results(*_paths(args), doc, COLUMNS, f"Memory per iteration ({args.device}, {model})", NOTES)
    return 0 if all(r["status"] in ("ok", "oom") for r in doc.records) else 1
