"""``python -m benchmarks plan_check``: naive BPTT's T-extrapolation checked against a full trace on FLUX.1-dev.

``leapalign plan`` plans objectives whose every step runs with grad at T = 3 and T = 4 and
extrapolates to T (:data:`leapalign.training.plan.EXTRAPOLATE_FROM`). The tests prove it exact on
the tiny models; this suite checks it at real scale: one FLUX.1-dev point traced with all T steps
and planned by extrapolation, every accounted figure side by side (``equal`` per field).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from benchmarks.machine import machine_info
from benchmarks.options import add_output_args, output_paths, parse_suite_args, suite_parser
from benchmarks.report import Column, ResultDoc, write_results

__all__ = ["main", "FIELDS"]

FIELDS = ("peak_bytes", "peak_phase", "saved_bytes", "flops", "calls", "breakdown")


def _check(method: str, resolution: int, train_mode: str, steps: int,
           model: str = "flux-dev") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from benchmarks.plan import point_config
    from leapalign.training import plan as planner
    from leapalign.training.plan_models import model_spec

    cfg = point_config(method, resolution, train_mode, steps=steps, model=model)
    spec = model_spec("" if model == "flux-dev" else f"tiny:{model}")
    start = time.perf_counter()
    full, _ = planner._trace(cfg, spec, 1, [])
    middle = time.perf_counter()
    notes: list[str] = []
    extrapolated, _ = planner._trace_steps(cfg, spec, 1, notes)
    end = time.perf_counter()
    records = [{"field": name, "full_trace": getattr(full, name), "extrapolated": getattr(extrapolated, name),
                "equal": getattr(full, name) == getattr(extrapolated, name)} for name in FIELDS]
    summary = {"all_equal": all(r["equal"] for r in records), "full_trace_seconds": round(middle - start, 1),
               "extrapolated_seconds": round(end - middle, 1), "notes": notes}
    return records, summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = suite_parser("plan_check", __doc__)
    parser.add_argument("--point", default="bptt/512/lora", metavar="METHOD/RES/MODE")
    parser.add_argument("--model", default="flux-dev", help="flux-dev, or a tiny_flux name (test) for a smoke run")
    parser.add_argument("--steps", type=int, default=6, help="T of the full trace (every step with grad: minutes each)")
    add_output_args(parser, "plan_extrapolation_check.json")
    args, argv = parse_suite_args(parser, argv)
    method, res, mode = args.point.split("/")
    records, summary = _check(method, int(res), mode, args.steps, args.model)
    json_path, md_path = output_paths(args, "plan_extrapolation_check.json")
    config = {"model": args.model, "point": args.point, "steps": args.steps}
    doc = ResultDoc("plan_check", machine_info(["plan_check", *argv]), config, records, summary)
    columns = (Column("field", "field"), Column("full_trace", "full trace (all T steps)"),
               Column("extrapolated", "extrapolated from T = 3, 4"), Column("equal", "equal"))
    write_results(json_path, md_path, doc, columns, f"BPTT plan extrapolation vs full trace ({args.model} {args.point}, T = {args.steps})")
    return 0 if summary["all_equal"] else 1
