"""How every model-patch test judges a patched diffusers transformer (FLUX.2, SD3; FLUX.1 has its
own copy in test_flux_patch): outputs and ALL parameter gradients of the patched model and of the
unpatched one in the same dtype, both against an fp64 copy with the same weights; the patched
error may be at most 2x the eager one plus a floor (1e-6 fp32, 1 ulp bf16)."""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

from leapkernels import backend

from .op_harness import FLOOR, rel_err

KEEP_DTYPE = ("timestep", "guidance", "img_ids", "txt_ids")
"""Inputs the models cast themselves (timesteps: x1000 inside) or that are positions."""


def cast_inputs(inputs: dict, dtype: torch.dtype, device: str | torch.device = "cpu") -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() and k not in KEEP_DTYPE else v).to(device)
            for k, v in inputs.items()}


def run_model(model: torch.nn.Module, inputs: dict, dtype: torch.dtype, cotangent: torch.Tensor, **call_kwargs):
    """One forward + backward; returns the output and every parameter's gradient (fp64 CPU copies)."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    out = model(**cast_inputs(inputs, dtype, device), return_dict=False, **call_kwargs)[0]
    out.backward(cotangent.to(device=device, dtype=out.dtype))
    grads = {n: p.grad.detach().double().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().double().cpu(), grads


def compare_patched(master: torch.nn.Module, inputs: dict, dtype: torch.dtype, device: str,
                    apply: Callable[[torch.nn.Module], object], out_shape: tuple[int, ...]) -> None:
    """Patched vs unpatched ``master`` in ``dtype`` on ``device``, both judged against fp64."""
    eager = copy.deepcopy(master).to(device=device, dtype=dtype)
    truth = copy.deepcopy(eager).to(torch.float64)
    patched = copy.deepcopy(eager)
    apply(patched)
    cot = torch.randn(out_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with backend.poison_outputs():
        out_p, grads_p = run_model(patched, inputs, dtype, cot)
    out_e, grads_e = run_model(eager, inputs, dtype, cot)
    rounded = {k: (v.to(dtype) if v.is_floating_point() and k not in KEEP_DTYPE else v) for k, v in inputs.items()}
    out_t, grads_t = run_model(truth, rounded, torch.float64, cot)
    assert set(grads_p) == set(grads_t), "patched model leaves some parameters without gradient"
    failures = []
    for what, p, e, t in [("output", out_p, out_e, out_t)] + [(n, grads_p[n], grads_e[n], grads_t[n]) for n in grads_t]:
        err, base = rel_err(p, t), rel_err(e, t)
        if not err <= 2 * base + FLOOR[dtype]:
            failures.append(f"{what}: patched error {err:.2e} > 2 x eager {base:.2e} + {FLOOR[dtype]:.0e}")
    assert not failures, "\n".join(failures)


def assert_same(a, b) -> None:
    """Bit-identical output and gradients (``run_model`` results)."""
    assert torch.equal(a[0], b[0]), "outputs differ"
    assert set(a[1]) == set(b[1]) and all(torch.equal(a[1][n], b[1][n]) for n in a[1]), "gradients differ"


def assert_close(a, b, out_tol: float = 2e-6, grad_tol: float = 2e-5) -> None:
    """fp32 results equal up to reassociation (``run_model`` results)."""
    assert rel_err(a[0], b[0]) < out_tol, rel_err(a[0], b[0])
    worst = max((rel_err(a[1][n], b[1][n]), n) for n in b[1])
    assert set(a[1]) == set(b[1]) and worst[0] < grad_tol, worst


def saved_bytes_ratio(master: torch.nn.Module, inputs: dict, apply: Callable[[torch.nn.Module], object],
                      dtype: torch.dtype = torch.bfloat16) -> float:
    """Bytes autograd saves in one forward of the patched model over the unpatched one's (unique
    storages, parameters excluded: `leapalign.profiling.SavedTensorCounter`)."""
    from leapalign.profiling import SavedTensorCounter

    eager = copy.deepcopy(master).to(dtype)
    patched = copy.deepcopy(eager)
    apply(patched)
    counted = []
    for model in (eager, patched):
        with SavedTensorCounter() as counter:
            out = model(**cast_inputs(inputs, dtype), return_dict=False)[0]
        counted.append(counter.bytes)
        del out
    return counted[1] / counted[0]


def check_each_switch(model: torch.nn.Module, inputs: dict, cotangent: torch.Tensor, switches: Sequence[str],
                      apply: Callable[..., object], revert: Callable[[torch.nn.Module], object]) -> None:
    """Every switch on its own and every one off matches the unpatched model; revert is bit-exact.

    This checks the patch's wiring (run it on the reference backend), not the kernels.
    """
    base = run_model(model, inputs, torch.float32, cotangent)
    for name in switches:
        for chosen in ({n: n == name for n in switches}, {n: n != name for n in switches}):
            apply(model, **chosen)
            assert_close(run_model(model, inputs, torch.float32, cotangent), base)
    revert(model)
    assert_same(run_model(model, inputs, torch.float32, cotangent), base)
