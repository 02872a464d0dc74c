"""fp64 latents keep fp64 all the way through LeapAlign's weighting (issue 12).

With weighting on, the loss is ``relu(lambda - r) * w``, ``w = 1 / (max(d_j, tau) + max(d_0, tau))``:
the distances and the weight must be computed in the latents' precision when it is wider than
float32, or the fp64 objective stops agreeing with an fp64 reference at ~1e-7. Here it must agree
to 1e-12, in value and in gradient, through the fused ops and through the reference ops.
"""
from __future__ import annotations

import pytest
import torch

from _objective_oracles import (  # single_torch_thread: autouse fixture
    single_torch_thread,  # noqa: F401
    PROMPTS2,
    flux_model,
    leap_oracle,
    manual_trajectory,
    objective_grad,
    smooth_reward,
)
from leapalign.objectives.leapalign import LeapAlignObjective, LeapAlignObjectiveConfig

SEED, T, STEPS, ALPHA, TAU = 3, 6, (1, 4), 0.4, 1e-4


def _reference(model, cond, hinge_lambda: float):
    """fp64 loss, weights and parameter gradient, written out by hand (distances in fp64)."""
    sigmas = model.sigmas(T)
    xs = manual_trajectory(model, cond, model.noise(2, torch.Generator().manual_seed(SEED)), sigmas)
    k, j = STEPS
    with torch.no_grad():
        xhat_j = xs[k] + (sigmas[j] - sigmas[k]).to(xs[k].dtype) * model.velocity(xs[k], sigmas[k], cond)
        xhat_0 = xs[j] + (sigmas[-1] - sigmas[j]).to(xs[j].dtype) * model.velocity(xs[j], sigmas[j], cond)
        d_j = (xs[j] - xhat_j).abs().flatten(1).mean(1)
        d_0 = (xs[-1] - xhat_0).abs().flatten(1).mean(1)
        w = 1.0 / (d_j.clamp_min(TAU) + d_0.clamp_min(TAU))
    x0 = xs[-1].detach().requires_grad_(True)
    loss = (torch.relu(hinge_lambda - smooth_reward(model.decode(x0), PROMPTS2)) * w).mean()
    (g0,) = torch.autograd.grad(loss, x0)
    grad = leap_oracle(model, cond, xs, sigmas, list(STEPS), ALPHA, g0)
    return loss.detach(), w, d_j, d_0, grad


@pytest.mark.parametrize("use_kernels", [True, False], ids=["leapkernels", "reference-ops"])
def test_fp64_objective_with_weighting_equals_fp64_reference(use_kernels):
    model, cond = flux_model(torch.float64)
    hinge_lambda = 2.0
    loss, w, d_j, d_0, grad = _reference(model, cond, hinge_lambda)
    assert (d_j > TAU).all() and (d_0 > TAU).all(), "the weight must depend on the raw distances"
    obj = LeapAlignObjective(LeapAlignObjectiveConfig(
        num_steps=T, fixed_steps=STEPS, alpha=ALPHA, tau=TAU, hinge_lambda=hinge_lambda, weighting="both",
        use_kernels=use_kernels,
    ))
    g, out = objective_grad(obj, model, cond, seed=SEED)
    assert out.loss.dtype == torch.float64
    assert abs(out.loss.item() - loss.item()) <= 1e-12 * abs(loss.item())
    assert out.metrics["weight_mean"] == pytest.approx(w.mean().item(), rel=1e-12)
    assert out.metrics["d_j"] == pytest.approx(d_j.mean().item(), rel=1e-12)
    assert out.metrics["d_0"] == pytest.approx(d_0.mean().item(), rel=1e-12)
    assert float((g - grad).norm() / grad.norm()) <= 1e-12
