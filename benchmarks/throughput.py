"""``python -m benchmarks throughput``: iteration time and images/s per method x T, split rollout vs gradient.

One iteration = the objective's forward (rollout + grad-enabled steps + decode + reward) and
``loss.backward()``; no optimiser step (the same for every method). Each (method, T) is warmed up,
then the repeats run **interleaved** — repeat r runs every method once, in a rotated order — so a
noisy shared machine slows all methods alike and the ratios stay honest; we report the median.

The split comes from a timing proxy around the model's ``velocity``: calls with autograd off are
the rollout, calls with autograd on are the forward-with-grad; ``backward_s`` is ``loss.backward()``;
``gradient_s = grad_forward_s + backward_s``; ``other_s`` is what is left (decode, reward, leaps).
On CUDA every timed call synchronises, which costs a little throughput but makes the split exact.

Methods ending in ``+compiled`` run the rollout engine (``leapalign.rollout_engine``: the no-grad
steps through ``torch.compile``); each compiles in one untimed iteration before the repeats, and
its ``compile_s`` (the first no-grad call: tracing + inductor) is reported apart, with the
iterations it takes to pay for itself against the same method run eagerly (the headline).
``sampling`` is plain no-grad 25-step Euler sampling + decode of the same model: the inference a
LeapAlign iteration is compared with.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Sequence

import torch

from benchmarks import headline
from benchmarks.machine import machine_info
from benchmarks.measure import VelocityTimer, is_oom, synchronizer
from benchmarks.options import add_workload_args, default_paths, parse_suite_args, suite_parser, workload_config
from benchmarks.report import Column, ResultDoc, format_float, write_results
from benchmarks.workload import (
    THROUGHPUT_METHODS, Method, Workload, build_method_objective, build_workload, resolve_methods, run_iteration,
)

__all__ = ["main", "COLUMNS"]

COLUMNS = (
    Column("method", "method"), Column("steps", "T"),
    Column("seconds", "iteration s (median)", format_float), Column("images_per_s", "images/s", format_float),
    # the iteration's split (see NOTES)
    Column("rollout_s", "rollout s (no grad)", format_float), Column("gradient_s", "gradient s (fwd+bwd)", format_float),
    Column("other_s", "other s", format_float),
    Column("rollout_calls", "no-grad calls"), Column("grad_calls", "grad calls"),
    Column("compile", "rollout compile"), Column("compile_s", "compile s", format_float), Column("status", "status"),
)

NOTES = (
    "seconds: median over interleaved repeats of one iteration (objective forward + backward, no optimiser step).",
    "rollout_s: velocity calls with autograd off; gradient_s: velocity calls with autograd on + loss.backward(); "
    "other_s: the rest (decode, reward, leap/connector arithmetic).",
    "images_per_s = batch_size / median seconds.",
    "compile: the rollout engine's mode (off = eager); compile_s: wall time of the first compiled no-grad call "
    "(dynamo + inductor), paid once per process, outside the timed repeats.",
)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time_once(objective: Any, workload: Workload, method: Method, clock: str = "wall") -> dict[str, float]:
    sync = synchronizer(workload.device)
    timer = VelocityTimer(workload.rollout_model(method), sync, CLOCKS[clock])

    def around_backward(entering: bool) -> None:
        timer.active = not entering

    result = run_iteration(objective, workload, model=timer, sync=sync, around_backward=around_backward,
                           clock=CLOCKS[clock])
    total = result.seconds
    return {
        "seconds": total,
        "rollout_s": timer.rollout_s,
        "grad_forward_s": timer.grad_forward_s,
        "backward_s": result.backward_s,
        "other_s": total - timer.rollout_s - timer.grad_forward_s - result.backward_s,
        "rollout_calls": timer.rollout_calls,
        "grad_calls": timer.grad_calls,
    }


def _compile_first(methods: list[Method], objectives: dict[str, Any], workload: Workload,
                   failed: dict[str, dict[str, Any]]) -> None:
    """One untimed iteration of every compiled method, so the repeats time compiled graphs only."""
    for m in methods:
        if m.compile == "off" or m.name in failed or m.name not in objectives:
            continue
        try:
            workload.use_kernels(m.kernels)
            _time_once(objectives[m.name], workload, m)
        except Exception as exc:  # noqa: BLE001 - recorded per method (a missing C++ compiler, say)
            failed[m.name] = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:500]}"}


def _dynamo_frames() -> int:
    """Frames dynamo has compiled so far in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def _median_record(method: Method, steps: int, samples: list[dict[str, float]], batch: int) -> dict[str, Any]:
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    seconds = [s["seconds"] for s in samples]
    return {
        "method": method.name, "label": method.label, "steps": steps, "status": "ok",
        "seconds": med["seconds"], "seconds_min": min(seconds), "seconds_all": seconds,
        "images_per_s": batch / med["seconds"],
        "rollout_s": med["rollout_s"], "grad_forward_s": med["grad_forward_s"], "backward_s": med["backward_s"],
        "gradient_s": med["grad_forward_s"] + med["backward_s"], "other_s": med["other_s"],
        "rollout_calls": int(med["rollout_calls"]), "grad_calls": int(med["grad_calls"]), "repeats": len(samples),
        "compile": method.compile, "cuda_graphs": method.cuda_graphs, "grad_steps": method.grad_steps,
    }


def run_suite(args: argparse.Namespace, argv: Sequence[str]) -> ResultDoc:
    config = workload_config(args)
    methods = resolve_methods(args.methods)
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if args.clock == "cpu" and (args.device != "cpu" or getattr(args, "threads", None) != 1):
        raise ValueError("--clock cpu needs --device cpu --threads 1 (CPU time sums every thread; GPUs work asynchronously)")
    workload = build_workload(config)  # one model; kernel methods patch it and eager ones revert it
    records: list[dict[str, Any]] = []
    for steps in args.steps:
        failed: dict[str, dict[str, Any]] = {}
        objectives = {}
        for m in methods:
            try:
                objectives[m.name] = build_method_objective(m, steps)
            except Exception as exc:  # noqa: BLE001 - recorded per method
                failed[m.name] = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        samples: dict[str, list[dict[str, float]]] = {m.name: [] for m in methods}
        _compile_first(methods, objectives, workload, failed)
        frames_before = _dynamo_frames()
        for r in range(args.warmup + args.repeats):
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            for m in order:
                if m.name in failed:
                    continue
                try:
                    workload.use_kernels(m.kernels)
                    sample = _time_once(objectives[m.name], workload, m, args.clock)
                except Exception as exc:  # noqa: BLE001 - OOM is a finding; keep the other methods running
                    failed[m.name] = {"status": "oom" if is_oom(exc) else "error",
                                      "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                if r >= args.warmup:
                    samples[m.name].append(sample)
        recompiles = _dynamo_frames() - frames_before  # must stay 0: the repeats reuse the compiled graphs
        for m in methods:
            if m.name in failed:
                rec = {"method": m.name, "label": m.label, "steps": steps, "seconds": None, **failed[m.name]}
            else:
                rec = _median_record(m, steps, samples[m.name], config.batch_size)
                engine = workload.engines.get(m.name)
                rec["compile_s"] = engine.compile_seconds if engine is not None else None
                rec["recompiles_during_repeats"] = recompiles if engine is not None else None
            records.append(rec)
            print(f"  throughput {m.name:>18} T={steps:<3} median={format_float(rec.get('seconds')):>8}s "
                  f"rollout={format_float(rec.get('rollout_s')):>8}s gradient={format_float(rec.get('gradient_s')):>8}s "
                  f"{rec['status']}", flush=True)
    run_config = {**config.as_dict(), "steps": list(args.steps), "methods": [m.name for m in methods], "clock": args.clock,
                  "warmup": args.warmup, "repeats": args.repeats, "order": "interleaved, rotated per repeat",
                  "model_info": workload.info}
    summary = headline.throughput_headline(records, args.steps)
    return ResultDoc("throughput", machine_info(["throughput", *argv]), run_config, records, summary)


def build_parser() -> argparse.ArgumentParser:
    parser = suite_parser("throughput", __doc__)
    add_workload_args(parser)
    parser.set_defaults(methods=list(THROUGHPUT_METHODS))
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="wall (default) or cpu: this process's CPU time, for a one-thread run on a loaded shared "
                             "machine, where other processes inflate wall time but not the iteration's own work")
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations per (method, T); the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per (method, T) first")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, argv = parse_suite_args(build_parser(), argv)
    t0 = time.perf_counter()
    doc = run_suite(args, argv)
    doc.config["suite_wall_s"] = time.perf_counter() - t0
    print("headline:", json.dumps(doc.summary))
    write_results(*default_paths("throughput", args), doc, COLUMNS, f"Throughput per iteration ({args.device}, {args.model})",
                  NOTES)
    return 0 if all(r["status"] in ("ok", "oom") for r in doc.records) else 1
