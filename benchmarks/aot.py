"""``python -m benchmarks aot``: every Triton kernel compiled ahead of time through its launcher.

The full matrix of `leapkernels.aot` (the test suite runs a smaller one, with the assertions):
sm_90 by default (``--arch 80,90,100`` for all three; ptxas-blackwell compiles sm_90 and sm_100,
the legacy ptxas sm_80), fp32/bf16/fp16, FLUX.1-dev shapes (1024 x 1024: 4,096 image tokens,
heads of 128, MLP 4x) at model widths 3,072 (FLUX.1-dev), 6,144 and 12,288. One record per
compiled variant: kernel, arch, dtype, width, ok, registers, spill_bytes, shared_bytes,
vector_loads, loads, vector_stores, stores (and the case, loop-compare widths, warps, programs).
Needs no GPU; runs with TRITON_INTERPRET unset. Default output: benchmarks/results/aot_sm90.{json,md}
(``aot_sm80-sm90-sm100`` for ``--arch 80,90,100``).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Sequence

from benchmarks.machine import machine_info
from benchmarks.options import add_output_args, output_paths, parse_suite_args, suite_parser
from benchmarks.report import Column, ResultDoc, write_results

KEYS = ("kernel", "case", "arch", "dtype", "width", "ok", "registers", "spill_bytes", "shared_bytes",
        "vector_loads", "loads", "vector_stores", "stores", "loop_compare_bits", "num_warps", "programs", "error")

COLUMNS = (
    Column("kernel", "kernel"), Column("case", "case"), Column("arch", "sm", str), Column("dtype", "dtype"),
    Column("width", "width", str), Column("ok", "ok", lambda x: "ok" if x else "FAIL"),
    Column("registers", "registers", str), Column("spill_bytes", "spill B", str), Column("shared_bytes", "shared B", str),
    Column("vector_loads", "vector ld", str), Column("loads", "ld", str), Column("vector_stores", "vector st", str),
    Column("stores", "st", str), Column("loop_compare_bits", "loop compare bits", lambda b: ",".join(map(str, b))),
)

NOTES = (
    "Compiled without a GPU: each op's launcher runs on meta tensors as on an H100 (132 SMs), every launch is "
    "compiled with triton.compile's own pipeline (TTIR -> TTGIR -> LLIR -> PTX -> cubin, the wheel's ptxas) "
    "instead of run; registers and spills from ptxas -v, vector loads/stores and loop-counter widths from the PTX.",
    "Scalar by nature (not vectorisable): the per-sample coefficient loads of the leap and scale kernels, the capped "
    "scale's per-program partial sums, and one partial-sum store per program after its loop.",
)


def build_parser():
    parser = suite_parser("aot", __doc__, threads=False)
    parser.add_argument("--arch", default="90", help="CUDA capabilities, comma-separated (80, 90, 100)")
    parser.add_argument("--dtype", default="fp32,bf16,fp16", help="input dtypes, comma-separated")
    parser.add_argument("--width", default="3072,6144,12288", help="model widths, comma-separated")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    add_output_args(parser, "aot_sm90.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled kernels only
    from leapkernels import aot

    args, argv = parse_suite_args(build_parser(), argv)
    archs = tuple(int(a) for a in args.arch.split(",") if a)
    dtypes = tuple(d for d in args.dtype.split(",") if d)
    widths = tuple(int(w) for w in args.width.split(",") if w)
    t0 = time.time()
    variants = aot.run_matrix(archs, dtypes, widths, jobs=args.jobs)
    records = [{k: asdict(v)[k] for k in KEYS} for v in variants]
    ok = [r for r in records if r["ok"]]
    summary = {
        "variants": len(records), "compiled": len(ok),
        "max_registers": max((r["registers"] for r in ok), default=None),
        "spilling_variants": sum(bool(r["spill_bytes"]) for r in ok),
        "scalar_loads": sum(r["loads"] - r["vector_loads"] for r in ok),
        "scalar_stores": sum(r["stores"] - r["vector_stores"] for r in ok),
        "seconds": round(time.time() - t0, 1),
    }
    config = {"archs": list(archs), "dtypes": list(dtypes), "widths": list(widths), "tokens": 4096, "batch": 1,
              "target": "H100 SXM launch heuristics (132 SMs)"}
    doc = ResultDoc("aot", machine_info(["aot", *argv]), config, records, summary)
    name = "aot_" + "-".join(f"sm{a}" for a in archs) + ".json"
    json_path, md_path = output_paths(args, name)
    write_results(json_path, md_path, doc, COLUMNS, f"Ahead-of-time compilation ({', '.join(f'sm_{a}' for a in archs)})", NOTES)
    table = ["| kernel | dtype | arch | OK | max registers | spill bytes | vector loads | vector stores | loop compare bits |",
             "|---|---|---|---|---|---|---|---|---|", *aot.summary_rows(variants)]
    with open(md_path, "a") as f:  # the per-kernel summary after the per-variant table
        f.write("\n## Per kernel x dtype x arch\n\n" + "\n".join(table) + "\n")
    print("\n".join(["", *table]))
    return 0 if len(ok) == len(records) else 1
