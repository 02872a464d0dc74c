"""``python -m benchmarks kernels``: each fused leapkernels op vs eager PyTorch vs ``torch.compile``.

For every op: forward + backward (one random upstream gradient) timed for

- ``fused[BACKEND]``: the leapkernels op (its autograd.Function) on each backend that can run on the
  device (CUDA: ``triton``; CPU: ``reference`` and ``native`` when built -- never the Triton
  interpreter, whose ~1 ms per program instance makes its timings meaningless);
- ``eager``: the op's plain-PyTorch ``*_reference`` (what diffusers runs);
- ``compile``: ``torch.compile`` of that reference (inductor; ``--no-compile`` skips it).

Timing: CPU -- ``torch.utils.benchmark.Timer.blocked_autorange`` median; CUDA --
``triton.testing.do_bench(..., return_mode="median")``. On CUDA each record also carries
``gb_per_s``: the op's minimum memory traffic (inputs and outputs read/written once forward;
output gradients read, input gradients written and saved inputs re-read backward) divided by the
median time. ``gelu_linear`` is matmul-bound: its GB/s is left out.
Shapes: ``--shape flux-dev`` (FLUX.1-dev at 512x512: 1536 tokens, width 3072, 24 heads x 128,
MLP 12288) is the CUDA default; ``--shape cpu`` (1024 tokens, width 512, 4 heads x 128, MLP 2048)
the CPU default.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from benchmarks.machine import machine_info
from benchmarks.options import add_output_args, output_paths, parse_suite_args, suite_parser
from benchmarks.report import Column, ResultDoc, format_float, format_ms, format_ratio, write_results
from leapalign.dtypes import torch_dtype

__all__ = ["main", "SHAPES", "op_cases"]

SHAPES: dict[str, dict[str, int]] = {
    "flux-dev": dict(batch=1, tokens=1536, width=3072, heads=24, head_dim=128, mlp=12288, latent_tokens=1024, latent_ch=64),
    "cpu": dict(batch=1, tokens=1024, width=512, heads=4, head_dim=128, mlp=2048, latent_tokens=1024, latent_ch=64),
    "tiny": dict(batch=1, tokens=64, width=64, heads=2, head_dim=32, mlp=128, latent_tokens=64, latent_ch=16),
}


@dataclass
class OpCase:
    """One op at one shape: inputs builder, fused and reference callables, traffic model."""

    name: str
    make_inputs: Callable[[], list[Any]]
    fused: Callable[..., Any]
    reference: Callable[..., Any]
    memory_bound: bool = True


def op_cases(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> list[OpCase]:
    """The fused ops at ``shape``; inputs are seeded so every implementation sees the same tensors."""
    import leapkernels as lk

    b, s, d, h, dh, f = (shape[k] for k in ("batch", "tokens", "width", "heads", "head_dim", "mlp"))
    n, c = shape["latent_tokens"], shape["latent_ch"]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*size: int, grad: bool = True, scale: float = 1.0, dt: torch.dtype | None = None) -> torch.Tensor:
        t = (scale * torch.randn(*size, generator=gen)).to(device=device, dtype=dt or dtype)
        return t.requires_grad_(grad)

    def rope() -> tuple[torch.Tensor, torch.Tensor]:
        theta = torch.randn(s, dh // 2, generator=gen).repeat_interleave(2, dim=-1)
        return theta.cos().to(device), theta.sin().to(device)

    def leap_inputs() -> list[Any]:
        return [rnd(b, n, c), rnd(b, n, c), -0.3, rnd(b, n, c, grad=False)]

    def qk_inputs() -> list[Any]:
        cos, sin = rope()
        weight = (1.0 + 0.1 * torch.randn(dh, generator=gen)).to(device=device, dtype=dtype).requires_grad_(True)
        return [rnd(b, s, h, dh), weight, cos, sin]

    return [
        OpCase("leap_connector", leap_inputs, lambda *a: lk.leap_connector(*a)[0],
               lambda *a: lk.leap_connector_reference(*a)[0]),
        OpCase("grad_scale", lambda: [rnd(b, n, c), 0.3], lambda x, a: lk.grad_scale(x, a) * 1.0,
               lambda x, a: lk.grad_scale_reference(x, a) * 1.0),
        OpCase("modulated_layernorm", lambda: [rnd(b, s, d), rnd(b, d, scale=0.1), rnd(b, d, scale=0.1)],
               lk.modulated_layernorm, lk.modulated_layernorm_reference),
        OpCase("ada_layernorm_continuous", lambda: [rnd(b, s, d), rnd(b, 2 * d, scale=0.1)],
               lk.ada_layernorm_continuous, lk.ada_layernorm_continuous_reference),
        OpCase("gated_residual", lambda: [rnd(b, s, d), rnd(b, d, scale=0.1), rnd(b, s, d)],
               lk.gated_residual, lk.gated_residual_reference),
        OpCase("qk_norm_rope", qk_inputs, lk.qk_norm_rope, lk.qk_norm_rope_reference),
        OpCase("gelu_tanh", lambda: [rnd(b, s, f)], lk.gelu_tanh, lk.gelu_tanh_reference),
        OpCase("gelu_linear", lambda: [rnd(b, s, f), rnd(d, f, scale=f**-0.5), rnd(d, scale=0.01)],
               lk.gelu_linear, lk.gelu_linear_reference, memory_bound=False),
    ]


def _tensor_bytes(xs: Sequence[Any]) -> int:
    return sum(x.numel() * x.element_size() for x in xs if isinstance(x, torch.Tensor))


def _traffic_bytes(inputs: Sequence[Any], output: torch.Tensor) -> tuple[int, int]:
    """(forward, forward + backward) minimum bytes moved, as the module docstring defines them."""
    fwd = _tensor_bytes(inputs) + _tensor_bytes([output])
    needs_grad = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    bwd = _tensor_bytes([output]) + 2 * _tensor_bytes(needs_grad)
    return fwd, fwd + bwd


def _make_step(fn: Callable[..., Any], inputs: list[Any], upstream: torch.Tensor) -> Callable[[], None]:
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def step() -> None:
        for x in leaves:
            x.grad = None
        out = fn(*inputs)
        out.backward(upstream)

    return step


def _time_cpu(step: Callable[[], None], min_run_time: float) -> float:
    from torch.utils import benchmark

    step()  # warm-up outside the timer (first-call allocations, compilation)
    measurement = benchmark.Timer(stmt="step()", globals={"step": step}).blocked_autorange(min_run_time=min_run_time)
    return float(measurement.median)


def _time_cuda(step: Callable[[], None]) -> float:
    import triton.testing

    step()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")) / 1e3


PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.039e12, "L40S": 0.864e12, "A10": 0.6e12}
"""Bytes/s of HBM/GDDR by GPU name (SXM where there are variants): the roofline's time floor is
an op's minimum bytes moved over this."""


def peak_bandwidth(device: torch.device) -> float | None:
    """The memory bandwidth of ``device``'s GPU, when its name is in `PEAK_BANDWIDTH`."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


# ops whose kernels are registered under another op's name (they reuse its kernels)
_REGISTRY_NAME = {"ada_layernorm_continuous": "modulated_layernorm", "gelu_linear": "gelu_tanh"}


def _cpu_backends(op: str) -> list[str]:
    """CPU backends with kernels for ``op``: the reference always, ``native`` when it was built."""
    from leapkernels import backend

    registered = backend.registered(op) if hasattr(backend, "registered") else ("reference",)
    return [b for b in ("reference", "native") if b in registered]


def run_suite(args: argparse.Namespace, argv: Sequence[str]) -> ResultDoc:
    from leapkernels import backend

    device = torch.device(args.device)
    dtype = torch_dtype(args.dtype, "--dtype")
    shape_name = args.shape or ("flux-dev" if device.type == "cuda" else "cpu")
    shape = SHAPES[shape_name]
    records: list[dict[str, Any]] = []
    cases = [c for c in op_cases(shape, dtype, device) if not args.ops or c.name in args.ops]
    unknown = set(args.ops or ()) - {c.name for c in op_cases(SHAPES["tiny"], torch.float32, torch.device("cpu"))}
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)} in --ops")
    for case in cases:
        inputs = case.make_inputs()
        if device.type == "cuda":
            impls: list[tuple[str, Callable[..., Any], str | None]] = [("fused[triton]", case.fused, "triton")]
        else:
            impls = [(f"fused[{b}]", case.fused, b) for b in _cpu_backends(_REGISTRY_NAME.get(case.name, case.name))]
        impls.append(("eager", case.reference, None))
        if not args.no_compile:
            impls.append(("compile", torch.compile(case.reference, dynamic=False), None))
        with torch.no_grad():
            probe_out = case.reference(*[x.detach() if isinstance(x, torch.Tensor) else x for x in inputs])
        fwd_bytes, total_bytes = _traffic_bytes(inputs, probe_out)
        upstream = torch.randn(probe_out.shape, generator=torch.Generator().manual_seed(1)).to(device, probe_out.dtype)
        for impl, fn, forced in impls:
            rec: dict[str, Any] = {"op": case.name, "impl": impl, "shape": shape_name, "dtype": args.dtype,
                                   "status": "ok", "seconds": None}
            try:
                step = _make_step(fn, inputs, upstream)
                with backend.force_backend(forced):
                    seconds = _time_cuda(step) if device.type == "cuda" else _time_cpu(step, args.min_run_time)
                rec["seconds"] = seconds
                rec["bytes_moved"] = total_bytes
                if device.type == "cuda" and case.memory_bound:
                    rec["gb_per_s"] = total_bytes / seconds / 1e9
                    if peak_bandwidth(device):  # roofline: achieved time over the bandwidth floor
                        rec["floor_seconds"] = total_bytes / peak_bandwidth(device)
                        rec["x_floor"] = seconds / rec["floor_seconds"]
            except Exception as exc:  # noqa: BLE001 - one impl failing (no compiler, no backend) is recorded
                rec["status"] = "error"
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            records.append(rec)
            floor = f" {rec['x_floor']:.2f}x floor" if rec.get("x_floor") else ""
            print(f"  kernels {case.name:>24} {impl:>18} {format_float(rec['seconds'] and 1e3 * rec['seconds']):>9} ms "
                  f"{rec['status']}{floor}", flush=True)
        eager = next((r["seconds"] for r in records if r["op"] == case.name and r["impl"] == "eager" and r["seconds"]), None)
        for r in records:
            if r["op"] == case.name and r["seconds"] and eager:
                r["speedup_vs_eager"] = eager / r["seconds"]
    config = {"device": args.device, "dtype": args.dtype, "shape": shape_name, **shape,
              "timer": "triton.testing.do_bench median" if device.type == "cuda" else
              f"torch.utils.benchmark blocked_autorange median (min_run_time={args.min_run_time}s)",
              "measured": "forward + backward with one fixed random upstream gradient"}
    return ResultDoc("kernels", machine_info(["kernels", *argv]), config, records, {})


COLUMNS = (
    Column("op", "op"), Column("impl", "implementation"),
    Column("seconds", "ms (fwd+bwd, median)", format_ms), Column("speedup_vs_eager", "x eager", format_ratio),
    Column("gb_per_s", "GB/s", lambda x: f"{x:.0f}"), Column("x_floor", "x roofline floor", format_ratio),
    Column("status", "status"),
)

NOTES = (
    "On CPU the fused ops run their PyTorch reference (or native C++) backend; the Triton interpreter is "
    "a correctness tool (~1 ms per program instance) and is never timed. CPU numbers compare the "
    "recompute-in-backward autograd.Functions against eager PyTorch and torch.compile; real kernel "
    "speed is the CUDA run.",
    "GB/s (CUDA only): minimum bytes moved (forward: inputs + output once; backward: output grad read, "
    "input grads written, saved inputs re-read) / median time. gelu_linear is matmul-bound: no GB/s.",
    "x roofline floor (CUDA, known GPUs): median time / (those bytes / the GPU's memory bandwidth, PEAK_BANDWIDTH); "
    "1.0 is the floor.",
)


def build_parser() -> argparse.ArgumentParser:
    parser = suite_parser("kernels", __doc__)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: flux-dev on CUDA, cpu on CPU")
    parser.add_argument("--ops", nargs="+", default=None, help="subset of ops to run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="CPU: seconds per blocked_autorange")
    add_output_args(parser, "kernels_DEVICE.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, argv = parse_suite_args(build_parser(), argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1 is set; CPU timings use the reference/native backends explicitly", file=sys.stderr)
    doc = run_suite(args, argv)
    json_path, md_path = output_paths(args, f"kernels_{args.device}.json")
    write_results(json_path, md_path, doc, COLUMNS, f"Fused ops vs eager vs torch.compile ({args.device})", NOTES)
    return 0 if all(r["status"] == "ok" or r["impl"] == "compile" for r in doc.records) else 1
