"""Ahead-of-time compilation of every Triton kernel for GPUs this machine does not have.

The interpreter forgives what a GPU does not (Python integers never overflow; no registers, no
vector loads). Here each op's own launcher runs on *meta* tensors (shapes and strides, no memory)
under `backend.compile_for` (blocks, warps and program counts as on an H100), and every kernel
launch it makes is compiled instead of run: ``JITFunction.run`` with ``warmup=True`` under a
stand-in driver whose target is ``GPUTarget("cuda", arch, 32)``. Triton then goes TTIR -> TTGIR
-> LLIR -> PTX -> cubin with the ptxas inside its wheel, whose ``-v`` report gives registers and
spills. From the PTX: how many global loads/stores are vector instructions, and the width of
the compares that close its loops (the loop counters' width).

    python -m leapkernels.aot --arch 90,80 --dtype bf16 --width 3072 --json out.json

Run it with ``TRITON_INTERPRET`` unset (the interpreter's kernels cannot be compiled). Uses
triton 3.9's ``JITFunction.run`` and ``triton.runtime.driver.set_active``; re-check them when
triton is upgraded. ``benchmarks/aot.py`` runs the full matrix; ``tests/kernels/test_aot.py`` a
smaller one, with the assertions.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

ARCHS = (80, 90, 100)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WIDTHS = (3072, 6144, 12288)
"""FLUX.1-dev's width, and the wider ones of current DiTs the row kernels must scale to."""
STREAMING = ("_gelu_fwd_kernel", "_gelu_bwd_kernel", "_sumsq_kernel", "_scale_kernel", "_leap_fwd_kernel", "_leap_bwd_kernel")
"""Kernels that walk a flat buffer of up to B x N elements: their loop counters must be 64-bit."""


@dataclass
class Variant:
    """One compiled kernel variant (a record of `python -m benchmarks aot`)."""

    kernel: str
    arch: int
    dtype: str
    width: int
    case: str
    ok: bool = False
    error: str = ""
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    vector_loads: int = 0
    loads: int = 0
    vector_stores: int = 0
    stores: int = 0
    loop_compare_bits: list[int] = field(default_factory=list)
    num_warps: int = 0
    fp_fusion: bool | None = None
    fma: int = 0
    programs: int = 0
    constexprs: str = ""


# ----------------------------------------------------------------------------- the launch cases
def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _kernels(op: str):
    from leapkernels import backend

    return backend._registry[op]["triton"]


def _row_cases(dt, width: int, batch: int, tokens: int) -> list[tuple[str, Callable]]:
    """Modulated LayerNorm and gated residual at ``width``, every backward switch; the modulation
    rows are strided views of the AdaLN-Zero embedding, as in Flux."""
    emb = _meta(batch, 6 * width, dtype=dt)
    shift, scale, gate = emb[:, :width], emb[:, width:2 * width], emb[:, 2 * width:3 * width]
    x, y = _meta(batch, tokens, width, dtype=dt), _meta(batch, tokens, width, dtype=dt)
    mln, gr = _kernels("modulated_layernorm"), _kernels("gated_residual")
    cases = [("mln.fwd", lambda: mln.forward(x, scale, shift, 1e-6)), ("gr.fwd", lambda: gr.forward(x, gate, y))]
    for a, b in ((True, True), (True, False), (False, True)):
        cases.append((f"mln.bwd dx={a} dmod={b}", lambda a=a, b=b: mln.backward(x, x, scale, 1e-6, a, b)))
        cases.append((f"gr.bwd dy={a} dgate={b}", lambda a=a, b=b: gr.backward(x, gate, y, a, b)))
    return cases


def _head_cases(dt, width: int, batch: int, tokens: int, head_dim: int = 128) -> list[tuple[str, Callable]]:
    """QK RMSNorm (+ RoPE with fp32 tables) on ``to_q``'s output viewed as heads."""
    q = _meta(batch, tokens, width, dtype=dt).unflatten(-1, (width // head_dim, head_dim))
    w = _meta(head_dim, dtype=dt)
    table = _meta(tokens, head_dim, dtype=torch.float32)
    qk = _kernels("qk_norm_rope")
    cases = []
    for rope in (True, False):
        cos = table if rope else None
        cases.append((f"qk.fwd rope={rope}", lambda cos=cos: qk.forward(q, w, cos, cos, 1e-6)))
        for a, b in ((True, True), (True, False), (False, True)):
            cases.append((f"qk.bwd rope={rope} dx={a} dw={b}",
                          lambda cos=cos, a=a, b=b: qk.backward(q, q, w, cos, cos, 1e-6, a, b)))
    return cases


def _stream_cases(dt, width: int, batch: int, tokens: int) -> list[tuple[str, Callable]]:
    """GELU on the MLP's pre-activation (4 x width), and the leap ops on packed latents [B, tokens x 64]."""
    from leapkernels import backend

    h = _meta(batch, tokens, 4 * width, dtype=dt)
    acc = backend.accumulator_dtype(dt)
    lat, coef = _meta(batch, tokens * 64, dtype=dt), _meta(batch, dtype=acc)
    gelu, scale, leap = _kernels("gelu_tanh"), _kernels("grad_scale"), _kernels("leap_connector")
    return [
        ("gelu.fwd", lambda: gelu.forward(h)),
        ("gelu.bwd", lambda: gelu.backward(h, h)),
        ("grad_scale.bwd cap", lambda: scale.backward(lat, coef, 1.0)),
        ("grad_scale.bwd", lambda: scale.backward(lat, coef, None)),
        ("leap.fwd connector", lambda: leap.forward(lat, lat, coef, lat)),
        ("leap.fwd", lambda: leap.forward(lat, lat, coef, None)),
        ("leap.bwd dc", lambda: leap.backward(lat, lat, coef, True)),
        ("leap.bwd", lambda: leap.backward(lat, None, coef, False)),
    ]


def _swiglu_cases(dt, width: int, batch: int, tokens: int) -> list[tuple[str, Callable]]:
    """SwiGLU on FLUX.2's MLP pre-activation (2 x 3 x width), contiguous (double blocks) and as the
    MLP half of the single blocks' fused projection (row stride 9 x width)."""
    hidden = 3 * width
    h = _meta(batch * tokens, 2 * hidden, dtype=dt)
    fused = _meta(batch * tokens, 3 * width + 2 * hidden, dtype=dt)[:, 3 * width:]
    da = _meta(batch * tokens, hidden, dtype=dt)
    sw = _kernels("swiglu")
    return [
        ("swiglu.fwd", lambda: sw.forward(h)),
        ("swiglu.bwd", lambda: sw.backward(da, h)),
        ("swiglu.fwd strided", lambda: sw.forward(fused)),
        ("swiglu.bwd strided", lambda: sw.backward(da, fused)),
    ]


CASES = {"row": _row_cases, "head": _head_cases, "stream": _stream_cases, "swiglu": _swiglu_cases}
"""Launch-case families: every kernel of every op belongs to one."""


def launch_cases(dt, width: int, batch: int = 1, tokens: int = 4096, families=tuple(CASES)) -> list[tuple[str, Callable]]:
    """Every kernel and constexpr branch at FLUX.1-dev's shapes (1024 x 1024: 4,096 image tokens),
    model width ``width`` (FLUX.1-dev: 3,072, heads of 128); ``families``: a subset of `CASES`."""
    return [case for name in families for case in CASES[name](dt, width, batch, tokens)]


# ----------------------------------------------------------------------------- record, then compile
@dataclass
class Launch:
    kernel: object
    args: tuple
    kwargs: dict
    case: str
    grid: tuple = (1,)


@contextlib.contextmanager
def recording() -> list[Launch]:
    """Kernel launches are recorded instead of run (the launchers see an H100, `compile_for`)."""
    from triton.runtime.jit import JITFunction

    from leapkernels import backend

    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), "", tuple(grid)))

    JITFunction.run = record
    try:
        with backend.compile_for(backend.H100):
            yield launches
    finally:
        JITFunction.run = original


class _TargetDriver:
    """Stands in for triton's CUDA driver: the target is ``arch``; nothing is ever launched."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"aot-sm{self.target.arch}"

    def get_current_stream(self, device=None):
        return None


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def loop_compare_bits(ptx: str) -> list[int]:
    """Bit width of the integer compare behind each conditional branch inside a loop (0: not an
    integer compare) — the loop counters' width.

    A loop is the span from a label back to a later branch that jumps to it (LLVM may rotate a
    loop so that its exit test sits at the top and the back edge is an unconditional jump, which
    is why every conditional branch inside the span is read). Guards before a loop are not
    counted: LLVM may rightly narrow them (a grid's y index is < 65,536).
    """
    labels: dict[str, int] = {}
    last_setp: dict[str, int] = {}
    branches = []  # (line, target, bits or None if unconditional)
    for i, line in enumerate(ptx.splitlines()):
        line = line.strip()
        if m := re.match(r"(\$L__\w+):", line):
            labels[m.group(1)] = i
        elif m := re.match(r"setp\.\w+\.([sub])(\d+)\s+(%p\d+)", line):
            last_setp[m.group(3)] = int(m.group(2))
        elif m := re.match(r"setp\.\S+\s+(%p\d+)", line):
            last_setp[m.group(1)] = 0  # a float compare
        elif m := re.match(r"(?:@!?(%p\d+)\s+)?bra(?:\.uni)?\s+(\$L__\w+);", line):
            branches.append((i, m.group(2), last_setp.get(m.group(1), 0) if m.group(1) else None))
    spans = [(labels[t], i) for i, t, _ in branches if t in labels and labels[t] < i]
    return [bits for i, _, bits in branches if bits is not None and any(a <= i <= b for a, b in spans)]


def _analyse(v: Variant, compiled, log: str, kwargs: dict) -> None:
    ptx = compiled.asm.get("ptx", "")
    if m := _PTXAS_REGS.search(log):
        v.registers = int(m.group(1))
    if m := _PTXAS_SPILL.search(log):
        v.spill_bytes = int(m.group(1)) + int(m.group(2))
    v.shared_bytes = compiled.metadata.shared
    for kind in ("ld", "st"):
        ops = re.findall(rf"\b{kind}\.global[\w:.]*", ptx)
        vector = sum(bool(re.search(r"\.v[248]\.", op + ".")) for op in ops)
        if kind == "ld":
            v.loads, v.vector_loads = len(ops), vector
        else:
            v.stores, v.vector_stores = len(ops), vector
    v.loop_compare_bits = loop_compare_bits(ptx)
    v.num_warps = compiled.metadata.num_warps
    v.fp_fusion = kwargs.get("enable_fp_fusion")  # None: left to triton's default
    v.fma = len(re.findall(r"\bfma\.rn\.f(?:32|64)", ptx))
    v.constexprs = ", ".join(f"{k}={getattr(x, 'name', x)}" for k, x in sorted(kwargs.items())
                             if k not in ("num_warps", "enable_fp_fusion"))


def compile_launch(launch: Launch, arch: int, v: Variant) -> Variant:
    """Compile one recorded launch for ``arch`` into ``v`` (errors are recorded, not raised)."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    log = io.StringIO()
    previous = getattr(driver, "_active", None)  # None on a machine without a GPU driver
    driver.set_active(_TargetDriver(arch))
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = JITFunction.run(launch.kernel, *launch.args, grid=(1,), warmup=True, **launch.kwargs)
        _PTXAS_LOGS.setdefault(id(compiled), log.getvalue())  # a cached compile prints nothing
        _analyse(v, compiled, _PTXAS_LOGS[id(compiled)], launch.kwargs)
        v.ok = v.registers is not None
        v.error = "" if v.ok else "no ptxas report (cached compile?)"
    except Exception as exc:  # noqa: BLE001 -- a compiler failure is a finding, recorded per variant
        v.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
    finally:
        knobs.nvidia.dump_ptxas_log = False
        driver.set_active(previous)
    return v


_PTXAS_LOGS: dict[int, str] = {}


def _spec_key(launch: Launch, arch: int) -> tuple:
    """What triton specialises a compile on (tensor dtypes and 16-byte alignment; integers equal
    to 1, divisible by 16, or past 32 bits; constexprs and options): launches alike compile once."""
    parts = []
    for a in launch.args:
        if isinstance(a, torch.Tensor):
            parts.append((str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            parts.append(a if isinstance(a, (bool, str)) or a is None else type(a).__name__)
        else:
            parts.append(("int", a == 1, a % 16 == 0, abs(a) >= 2**31))
    return (launch.kernel.__name__, arch, tuple(parts), tuple(sorted((k, str(v)) for k, v in launch.kwargs.items())))


def record_matrix(dtypes, widths, batch: int = 1, tokens: int = 4096, families=tuple(CASES)) -> list[tuple[str, int, Launch]]:
    """``(dtype name, width, launch)`` for every launch of every case."""
    out = []
    for dname in dtypes:
        for width in widths:
            with recording() as launches:
                for case, call in launch_cases(DTYPES[dname], width, batch, tokens, families):
                    n = len(launches)
                    call()
                    for launch in launches[n:]:
                        launch.case = case
            out += [(dname, width, launch) for launch in launches]
    return out


_TASKS: list = []


def _compile_task(i: int) -> Variant:
    launch, arch, v = _TASKS[i]
    return compile_launch(launch, arch, v)


def run_matrix(archs=(90,), dtypes=("bf16",), widths=(3072,), jobs: int = 1, batch: int = 1, tokens: int = 4096,
               families=tuple(CASES)) -> list[Variant]:
    """Record every launch of every case (of ``families``), compile each distinct specialisation once
    per arch (in ``jobs`` forked workers), and return one `Variant` per (launch, arch)."""
    from triton import knobs

    knobs.cache.dir = tempfile.mkdtemp(prefix="leapkernels-aot-")  # a fresh cache: every variant compiles
    records = record_matrix(dtypes, widths, batch, tokens, families)
    unique: dict[tuple, int] = {}
    owners = []
    _TASKS.clear()
    for dname, width, launch in records:
        for arch in archs:
            key = _spec_key(launch, arch)
            if key not in unique:
                unique[key] = len(_TASKS)
                _TASKS.append((launch, arch, Variant(launch.kernel.__name__, arch, dname, width, launch.case)))
            programs = 1
            for n in launch.grid:
                programs *= n
            owners.append((unique[key], Variant(launch.kernel.__name__, arch, dname, width, launch.case, programs=programs)))
    results = _compile_all(jobs)
    out = []
    for index, v in owners:
        done = results[index]
        out.append(Variant(**{**asdict(done), "dtype": v.dtype, "width": v.width, "case": v.case, "programs": v.programs}))
    return out


def _compile_all(jobs: int) -> list[Variant]:
    if jobs <= 1:
        return [_compile_task(i) for i in range(len(_TASKS))]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
        return list(pool.map(_compile_task, range(len(_TASKS)), chunksize=4))


# ----------------------------------------------------------------------------- command line
def summary_rows(variants: list[Variant]) -> list[str]:
    """One line per kernel x dtype x arch: variants OK, worst registers and spills, vector access."""
    cells: dict[tuple, list[Variant]] = {}
    for v in variants:
        cells.setdefault((v.kernel, v.dtype, v.arch), []).append(v)
    rows = []
    for (kernel, dtype, arch), vs in sorted(cells.items()):
        ok = sum(v.ok for v in vs)
        regs = max((v.registers or 0) for v in vs)
        spill = max((v.spill_bytes or 0) for v in vs)
        ld = f"{sum(v.vector_loads for v in vs)}/{sum(v.loads for v in vs)}"
        st = f"{sum(v.vector_stores for v in vs)}/{sum(v.stores for v in vs)}"
        loops = sorted({b for v in vs for b in v.loop_compare_bits})
        rows.append(f"| {kernel} | {dtype} | sm_{arch} | {ok}/{len(vs)} | {regs} | {spill} | {ld} | {st} | {loops} |")
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m leapkernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90", help="CUDA capabilities, comma-separated (80, 90, 100)")
    p.add_argument("--dtype", default="bf16", help="input dtypes, comma-separated (fp32, bf16, fp16)")
    p.add_argument("--width", default="3072", help="model widths, comma-separated (FLUX.1-dev: 3072)")
    p.add_argument("--tokens", type=int, default=4096, help="image tokens (1024 x 1024: 4096)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--json", default="", help="write one record per compiled variant here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from triton import knobs

    if knobs.runtime.interpret:
        print("leapkernels.aot compiles kernels: run it with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    args = parse_args(argv)
    ints = lambda text: tuple(int(x) for x in text.split(",") if x)  # noqa: E731
    t0 = time.time()
    variants = run_matrix(ints(args.arch), tuple(d for d in args.dtype.split(",") if d), ints(args.width),
                          args.jobs, args.batch, args.tokens)
    print("| kernel | dtype | arch | OK | max registers | spill bytes | vector loads | vector stores | loop compare bits |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(summary_rows(variants)))
    failed = [v for v in variants if not v.ok]
    for v in failed:
        print(f"FAIL sm_{v.arch} {v.dtype} w={v.width} {v.kernel} [{v.case}]: {v.error}")
    print(f"{len(variants) - len(failed)}/{len(variants)} variants compiled in {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(v) for v in variants], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
