"""``python -m benchmarks.kernels_native``: the native C++ CPU backend of leapkernels, measured on CPU.

Per op (the inputs of `benchmarks.kernels.op_cases`, ``--shape cpu`` by default), forward alone
and forward + backward (one fixed random upstream gradient) of:

- ``native``:    the op's autograd.Function on the ``native`` backend (csrc/, ATen + OpenMP);
- ``reference``: the same Function on the ``reference`` backend (the CPU default without native);
- ``eager``:     the op's plain-PyTorch ``*_reference`` (diffusers' arithmetic);
- ``compile``:   ``torch.compile`` of that reference (inductor's C++ backend).

Timing: all implementations of an op run round-robin in one process (``torch.set_num_threads``
= ``--threads``), each round timing a block of calls long enough to read (>= ~3 ms); the figure
is the median over ``--repeats`` rounds (the minimum is kept too). Memory, per implementation:
``saved_bytes``, the unique storages autograd saves for backward (`saved_tensors_hooks`), and
``peak_bytes``, the peak of CPU bytes allocated during forward + backward above what was live
before (torch.profiler memory events; allocations made by the profiled call only).

End to end (``--e2e``): one LeapAlign iteration (objective forward + ``loss.backward()``, no
optimiser step) of the CPU benchmark model (`leapalign.models.tiny_flux` ``cpu-bench``) through
`benchmarks.workload`: unpatched eager, patched on the reference backend, patched on native.

`run_native_cpu` returns the records (flat dicts) for other suites to merge.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import torch

from benchmarks.options import add_output_args, output_paths, parse_suite_args, suite_parser
from benchmarks.report import (Column, ResultDoc, format_bytes, format_float, format_kib, format_ms, format_ratio, render_table,
                               write_json, write_markdown)
from leapalign.profiling import saved_tensor_bytes

__all__ = ["run_native_cpu", "run_native_iteration", "main"]

SUITE = "kernels_native"


# ----------------------------------------------------------------------------- measuring one call
def _peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak CPU bytes allocated by ``fn`` above the live bytes at its start.

    torch.profiler attributes each allocation (and free) to the op that made it (``[memory]``
    events for frees outside any op); the running sum of every event's *self* memory, in start
    order, is the live-bytes timeline at op granularity.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _block_size(fn: Callable[[], None], target_s: float = 0.003) -> int:
    """Calls per timed block so that a block lasts about ``target_s``."""
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(1000, int(target_s / once)))


def _time_round_robin(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Per-call seconds of each fn, ``repeats`` rounds, the fns interleaved within a round."""
    blocks = {name: _block_size(fn) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            n = blocks[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    return samples


# ----------------------------------------------------------------------------- per op
def _detached(inputs: Sequence[Any]) -> list[Any]:
    return [x.detach() if isinstance(x, torch.Tensor) else x for x in inputs]


def _impls(case: Any, use_compile: bool) -> list[tuple[str, Callable[..., Any], str | None]]:
    impls: list[tuple[str, Callable[..., Any], str | None]] = [
        ("native", case.fused, "native"),
        ("reference", case.fused, "reference"),
        ("eager", case.reference, None),
    ]
    if use_compile:
        impls.append(("compile", torch.compile(case.reference, dynamic=False), None))
    return impls


@contextlib.contextmanager
def _backend(name: str | None) -> Iterator[None]:
    from leapkernels import backend

    with backend.force_backend(name):
        yield


def _op_records(case: Any, dtype_name: str, shape_name: str, repeats: int, use_compile: bool) -> list[dict[str, Any]]:
    inputs = case.make_inputs()
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    with torch.no_grad():
        probe = case.reference(*_detached(inputs))
    upstream = torch.randn(probe.shape, generator=torch.Generator().manual_seed(1)).to(probe.dtype)
    base = {"suite": SUITE, "kind": "op", "op": case.name, "shape": shape_name, "dtype": dtype_name,
            "threads": torch.get_num_threads()}
    steps: dict[str, Callable[[], None]] = {}
    forwards: dict[str, Callable[[], None]] = {}
    records: dict[str, dict[str, Any]] = {}
    for name, fn, forced in _impls(case, use_compile):
        rec = {**base, "impl": name, "status": "ok"}
        records[name] = rec

        def step(fn: Callable[..., Any] = fn, forced: str | None = forced) -> None:
            for x in leaves:
                x.grad = None
            with _backend(forced):
                fn(*inputs).backward(upstream)

        def forward(fn: Callable[..., Any] = fn, forced: str | None = forced) -> None:
            with _backend(forced):
                fn(*inputs)

        try:
            step()  # warm-up: compilation, first allocations
            with _backend(forced):
                rec["saved_bytes"] = saved_tensor_bytes(fn, *inputs)[0]
            rec["peak_bytes"] = _peak_bytes(step)
            steps[name], forwards[name] = step, forward
        except Exception as exc:  # noqa: BLE001 - a missing backend or compiler is a recorded fact
            rec["status"] = "error"
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    out: list[dict[str, Any]] = []
    for phase, fns in (("fwd+bwd", steps), ("fwd", forwards)):
        samples = _time_round_robin(fns, repeats)
        for name, rec in records.items():
            r = {**rec, "phase": phase, "repeats": repeats}
            if name in samples:
                r["seconds"] = statistics.median(samples[name])
                r["seconds_min"] = min(samples[name])
            out.append(r)
    for phase in ("fwd+bwd", "fwd"):
        same = [r for r in out if r["phase"] == phase]
        ref = {r["impl"]: r.get("seconds") for r in same}
        ref_min = {r["impl"]: r.get("seconds_min") for r in same}
        for r in same:
            if r.get("seconds"):
                if ref.get("eager"):
                    r["speedup_vs_eager"] = ref["eager"] / r["seconds"]
                    r["speedup_vs_eager_min"] = ref_min["eager"] / r["seconds_min"]
                if ref.get("compile"):
                    r["speedup_vs_compile"] = ref["compile"] / r["seconds"]
    return out


def run_native_cpu(
    shape: str = "cpu",
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    threads: int | None = 2,
    repeats: int = 21,
    ops: Sequence[str] | None = None,
    use_compile: bool = True,
    progress: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Records for every op x dtype x implementation x phase (see the module docstring).

    Raises `RuntimeError` naming the reason when the native backend is absent.
    """
    from benchmarks.kernels import SHAPES, op_cases
    from leapalign.dtypes import torch_dtype
    from leapkernels import native

    if not native.available():
        raise RuntimeError(f"the native backend is absent: {native.unavailable_reason()}")
    native.register_all()
    if threads is not None:
        torch.set_num_threads(threads)
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    records: list[dict[str, Any]] = []
    for dtype_name in dtypes:
        dtype = torch_dtype(dtype_name, "--dtypes")
        cases = op_cases(SHAPES[shape], dtype, torch.device("cpu"))
        unknown = set(ops or ()) - {c.name for c in cases}
        if unknown:
            raise ValueError(f"unknown op(s) {sorted(unknown)}; known: {[c.name for c in cases]}")
        for case in cases:
            if ops and case.name not in ops:
                continue
            if case.name == "gelu_linear" and dtype != torch.float32 and not ops:
                continue  # matmul-bound: bf16 GEMMs without AVX512-BF16 take seconds and measure MKL, not us
            recs = _op_records(case, dtype_name, shape, repeats, use_compile)
            records += recs
            if progress is not None:
                for r in recs:
                    if r["phase"] == "fwd+bwd":
                        progress(_progress_line(r))
    return records


def _progress_line(r: dict[str, Any]) -> str:
    ms = f"{1e3 * r['seconds']:9.3f} ms" if r.get("seconds") else "        - ms"
    x = f"x{r['speedup_vs_eager']:.2f} eager" if r.get("speedup_vs_eager") else ""
    label = r.get("op") or r.get("method")
    return f"  {SUITE} {label:>24} {r['dtype']:>8} {r['impl']:>18} {r.get('phase', ''):>8} {ms} {x} {r['status']}"


# ----------------------------------------------------------------------------- one LeapAlign iteration
def run_native_iteration(
    steps: int = 8,
    dtype: str = "float32",
    threads: int | None = 2,
    repeats: int = 5,
    model: str = "cpu-bench",
    progress: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """One LeapAlign iteration of ``model``: eager vs patched+reference vs patched+native.

    Built with `benchmarks.workload` (same model, batch, seed and reward as the throughput
    suite) and ``build_objective("leapalign", hinge_lambda=None, use_kernels=...)``. The three variants
    run round-robin; medians of ``repeats`` iterations after one warm-up each. Each record carries the
    loss, so the variants can be seen to agree.
    """
    from benchmarks.workload import WorkloadConfig, build_workload, run_iteration
    from leapalign.objectives import build_objective
    from leapalign.profiling import SavedTensorCounter
    from leapkernels import native

    if not native.available():
        raise RuntimeError(f"the native backend is absent: {native.unavailable_reason()}")
    native.register_all()

    if threads is not None:
        torch.set_num_threads(threads)
    config = WorkloadConfig(model=model, dtype=dtype)
    # eager: unpatched diffusers Flux + plain-PyTorch leap ops; patched: every fused op (Flux blocks
    # through apply_leapkernels_to_flux, leap/connector/discount through use_kernels) on one backend.
    variants = {"eager": (False, None), "patched[reference]": (True, "reference"), "patched[native]": (True, "native")}
    state: dict[str, dict[str, Any]] = {}
    for name, (kernels, forced) in variants.items():
        workload = build_workload(config, kernels=kernels)
        objective = build_objective("leapalign", num_steps=steps, hinge_lambda=None, use_kernels=kernels)
        state[name] = {"workload": workload, "objective": objective, "forced": forced, "samples": [], "losses": []}
        with _backend(forced):
            first = run_iteration(objective, workload, saved_counter=SavedTensorCounter)
        state[name]["saved_bytes"] = getattr(first.saved, "bytes", None)
    for _ in range(repeats):
        for name, s in state.items():
            with _backend(s["forced"]):
                result = run_iteration(s["objective"], s["workload"])
            s["samples"].append(result.seconds)
            s["losses"].append(result.loss)
    records = []
    eager = statistics.median(state["eager"]["samples"])
    for name, s in state.items():
        seconds = statistics.median(s["samples"])
        rec = {
            "suite": SUITE, "kind": "iteration", "method": "leapalign", "impl": name, "model": model,
            "steps": steps, "dtype": dtype, "threads": torch.get_num_threads(), "repeats": repeats,
            "status": "ok", "seconds": seconds, "seconds_min": min(s["samples"]),
            "speedup_vs_eager": eager / seconds, "saved_bytes": s["saved_bytes"], "loss": s["losses"][-1],
        }
        records.append(rec)
        if progress is not None:
            progress(_progress_line({**rec, "phase": f"T={steps}"}))
    return records


# ----------------------------------------------------------------------------- command line
OP_COLUMNS = (
    Column("op", "op"), Column("dtype", "dtype"), Column("phase", "phase"), Column("impl", "implementation"),
    # medians, then the least disturbed round (see the notes)
    Column("seconds", "ms (median)", format_ms), Column("speedup_vs_eager", "x eager", format_ratio),
    Column("speedup_vs_compile", "x compile", format_ratio),
    Column("seconds_min", "ms (min)", format_ms), Column("speedup_vs_eager_min", "x eager (min)", format_ratio),
    Column("saved_bytes", "saved KiB", format_kib), Column("peak_bytes", "peak KiB", format_kib), Column("status", "status"),
)

ITERATION_COLUMNS = (
    Column("impl", "variant"), Column("model", "model"), Column("steps", "T"), Column("dtype", "dtype"),
    Column("seconds", "s / iteration (median)", format_float), Column("speedup_vs_eager", "x eager", format_ratio),
    Column("saved_bytes", "saved MiB", format_bytes), Column("loss", "loss", lambda x: f"{x:.6f}"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = suite_parser("kernels_native", __doc__, threads_default=2)
    parser.add_argument("--shape", default="cpu", help="a benchmarks.kernels SHAPES name (default: cpu)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--ops", nargs="+", default=None, help="subset of ops (default: all)")
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds per op; the median is reported")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--e2e", action="store_true", help="also time one LeapAlign iteration of cpu-bench")
    parser.add_argument("--e2e-steps", type=int, default=8, help="sampling steps T of that iteration")
    parser.add_argument("--e2e-repeats", type=int, default=5)
    parser.add_argument("--e2e-dtypes", nargs="+", default=["float32"],
                        help="dtypes of the LeapAlign iteration (bf16 GEMMs are very slow on CPUs without AVX512-BF16)")
    parser.add_argument("--e2e-only", action="store_true", help="only the LeapAlign iteration")
    add_output_args(parser, "kernels_native_cpu.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.machine import machine_info

    args, argv = parse_suite_args(build_parser(), argv)
    records: list[dict[str, Any]] = []
    if not args.e2e_only:
        records += run_native_cpu(args.shape, args.dtypes, args.threads, args.repeats, args.ops, not args.no_compile)
    if args.e2e or args.e2e_only:
        for dtype in args.e2e_dtypes:
            try:
                records += run_native_iteration(args.e2e_steps, dtype, args.threads, args.e2e_repeats)
            except (ImportError, AttributeError, NotImplementedError) as exc:
                records.append({"suite": SUITE, "kind": "iteration", "impl": "-", "dtype": dtype, "status": "skipped",
                                "note": f"{type(exc).__name__}: {exc}"})
    machine = machine_info([SUITE, *argv])
    ops = [r for r in records if r["kind"] == "op"]
    summary = _summary(ops)
    config = {"shape": args.shape, "dtypes": args.dtypes, "threads": args.threads, "repeats": args.repeats,
              "compile": not args.no_compile, "e2e_steps": args.e2e_steps if (args.e2e or args.e2e_only) else None,
              "timer": "time.perf_counter over blocks of >= ~3 ms, implementations round-robin, median of repeats",
              "measured": "fwd+bwd with one fixed random upstream gradient, and fwd alone"}
    doc = ResultDoc(SUITE, machine, config, records, summary)
    json_path, md_path = output_paths(args, "kernels_native_cpu.json")
    write_json(json_path, doc)
    iterations = [r for r in records if r["kind"] == "iteration"]
    write_markdown(md_path, ResultDoc(SUITE, machine, config, ops, summary), OP_COLUMNS,
                   title="leapkernels native CPU backend vs reference vs eager vs torch.compile", notes=_notes(iterations))
    print(render_table(ops, OP_COLUMNS))
    if iterations:
        table = render_table(iterations, ITERATION_COLUMNS)
        with open(md_path, "a", encoding="utf-8") as fh:
            fh.write("\n## One LeapAlign iteration (objective forward + backward, no optimiser step)\n\n" + table + "\n")
        print(table)
    print(f"wrote {json_path} and {md_path}")
    return 0


def _summary(ops: list[dict[str, Any]]) -> dict[str, Any]:
    """Native vs eager per op and dtype (fwd+bwd): the speed ratio and the memory ratios."""
    out: dict[str, Any] = {}
    for r in ops:
        if r["impl"] != "native" or r["phase"] != "fwd+bwd" or not r.get("speedup_vs_eager"):
            continue
        eager = next((e for e in ops if e["op"] == r["op"] and e["dtype"] == r["dtype"] and e["impl"] == "eager"
                      and e["phase"] == "fwd+bwd"), {})
        entry = {"x_eager": r["speedup_vs_eager"], "x_eager_min": r.get("speedup_vs_eager_min")}
        if r.get("speedup_vs_compile"):
            entry["x_compile"] = r["speedup_vs_compile"]
        for key in ("saved_bytes", "peak_bytes"):
            if eager.get(key):
                entry[f"{key}_vs_eager"] = r.get(key, 0) / eager[key]
        out[f"{r['op']}[{r['dtype']}]"] = entry
    return out


def _notes(iterations: list[dict[str, Any]]) -> list[str]:
    notes = [
        "x eager / x compile: the median time of eager / compile divided by this implementation's (> 1: faster).",
        "saved: unique storages autograd keeps for backward; peak: CPU bytes allocated during fwd+bwd above the "
        "start (torch.profiler memory events).",
        "The machine is shared: the load average in the machine block says how busy it was; ratios come from "
        "round-robin timing in one process, which the load affects alike. Under load, OpenMP regions with 2 "
        "threads stall whenever one thread is descheduled, so medians can swing by 10x between neighbouring "
        "rows; the minimum over the rounds (ms (min), x eager (min)) is the least disturbed figure.",
        "peak is the profiler's per-op attribution: it misses allocations made outside ATen ops (inductor's "
        "own buffers), so compile's peak can read low.",
    ]
    if iterations:
        notes.append("One LeapAlign iteration: see the last section.")
    return notes


if __name__ == "__main__":
    sys.exit(main())
