"""Each baseline's gradient against its own definition on the tiny float64 Flux, memory scaling, bad input.

DRaFT-K / full backprop are checked against a chain of ``torch.func.vjp`` pullbacks through the
rollout's own states (the Euler chain rule written out), DRTune against the sum of stopped-input
pullbacks, ReFL / DRaFT-LV against plain autograd of their one-step predictions.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from _objective_oracles import single_torch_thread  # noqa: F401 (autouse fixture)
from _objective_oracles import (
    PROMPTS2, float64_fixtures, flux_model, leap_oracle, objective_grad, rel, smooth_reward, velocity_vjp,
)
from leapalign.objectives import OBJECTIVES, build_objective
from leapalign.objectives.baselines import (
    AlignPropConfig,
    DraftKConfig,
    DraftLVConfig,
    DRTuneConfig,
    ReFLConfig,
)
from leapalign.profiling import saved_tensor_bytes

T = 5
SEED = 3
flux64, flux64_reference, family64 = float64_fixtures(T, SEED)


def autograd_grad(model, loss: torch.Tensor) -> torch.Tensor:
    for p in model.trainable_parameters():
        p.grad = None
    loss.backward()
    g = torch.cat([p.grad.flatten() for p in model.trainable_parameters()])
    for p in model.trainable_parameters():
        p.grad = None
    return g


def test_draft1_equals_last_step_backprop(flux64, flux64_reference):
    """DRaFT-1: gradient of the reward through x0 = x_{T-1} - sigma_{T-1} v(x_{T-1}) only."""
    model, cond = flux64
    sigmas, traj, _ = flux64_reference
    g, out = objective_grad(build_objective("draft_k", num_steps=T, k=1), model, cond, seed=SEED)
    s = sigmas[T - 1]
    x0 = traj[T - 1] + (sigmas[-1] - s).to(traj[0].dtype) * model.velocity(traj[T - 1], s, cond)
    expected = autograd_grad(model, -smooth_reward(model.decode(x0), PROMPTS2).mean())
    assert rel(g, expected) < 1e-10
    assert torch.equal(out.images, model.decode(traj[-1]).detach())


@pytest.mark.parametrize("k", [2, T])
def test_draftk_equals_vjp_chain_through_last_k_steps(family64, k):
    """DRaFT-K: the chain rule through the last K Euler steps (full Jacobians), from the vjps."""
    model, cond, (sigmas, traj, g0) = family64
    g, out = objective_grad(build_objective("draft_k", num_steps=T, k=k), model, cond, seed=SEED)
    # one-step leaps between consecutive steps are the Euler steps; alpha = 1 keeps dv/dx
    oracle = leap_oracle(model, cond, traj, sigmas, list(range(T - k, T)), 1.0, g0)
    assert rel(g, oracle) < 1e-10
    assert out.metrics["k"] == k


@pytest.mark.parametrize("checkpoint", [False, True])
def test_full_backprop_equals_vjp_chain_through_all_steps(flux64, flux64_reference, checkpoint):
    model, cond = flux64
    sigmas, traj, g0 = flux64_reference
    g, _ = objective_grad(build_objective("full_backprop", num_steps=T, checkpoint=checkpoint), model, cond, seed=SEED)
    oracle = leap_oracle(model, cond, traj, sigmas, list(range(T)), 1.0, g0)
    assert rel(g, oracle) < 1e-10


def test_drtune_is_sum_of_stopped_input_gradients(family64):
    """DRTune: sum over trained steps of (sigma_{i+1} - sigma_i) dv_i/dtheta with sg(x_i), no dv/dx."""
    model, cond, (sigmas, traj, g0) = family64
    steps = (1, 3)
    g, out = objective_grad(build_objective("drtune", num_steps=T, k=2, fixed_steps=steps), model, cond, seed=SEED)
    oracle = sum(
        velocity_vjp(model, traj[i], sigmas[i], cond, (sigmas[i + 1] - sigmas[i]).to(g0.dtype) * g0)[0] for i in steps
    )
    assert rel(g, oracle) < 1e-10
    assert torch.equal(out.images, model.decode(traj[-1]).detach())


def test_drtune_samples_evenly_spaced_steps_with_random_offset():
    obj = build_objective("drtune", num_steps=12, k=3)
    seen = set()
    for seed in range(20):
        steps = obj.train_steps(torch.Generator().manual_seed(seed))
        assert len(steps) == 3 and steps[1] - steps[0] == 4 and steps[2] - steps[1] == 4
        assert 0 <= steps[0] < 4
        seen.add(steps[0])
    assert len(seen) > 1


def test_refl_equals_one_step_prediction_backprop(flux64, flux64_reference):
    """ReFL: reward of x0hat = x_t - sigma_t v(x_t) at the drawn late step t, gradient through v only."""
    model, cond = flux64
    sigmas, traj, _ = flux64_reference
    t = T - 2
    g, out = objective_grad(build_objective("refl", num_steps=T, min_idx=t, max_idx=t + 1), model, cond, seed=SEED)
    assert out.metrics["t"] == t
    x0_hat = traj[t] + (sigmas[-1] - sigmas[t]).to(traj[0].dtype) * model.velocity(traj[t], sigmas[t], cond)
    expected = autograd_grad(model, -smooth_reward(model.decode(x0_hat), PROMPTS2).mean())
    assert rel(g, expected) < 1e-10


def test_refl_default_range_is_last_quarter():
    cfg = ReFLConfig(num_steps=40)
    assert (cfg.lower_idx, cfg.upper_idx) == (30, 40)
    shorter = dataclasses.replace(cfg, num_steps=20)
    assert (shorter.lower_idx, shorter.upper_idx) == (15, 20)


def test_draft_lv_equals_its_definition(flux64, flux64_reference):
    """DRaFT-LV: mean over n re-noisings x_s = (1-s) x0 + s eps of the one-step-denoised reward."""
    model, cond = flux64
    sigmas, traj, _ = flux64_reference
    n = 3
    g, out = objective_grad(build_objective("draft_lv", num_steps=T, n=n), model, cond, seed=SEED)
    gen = torch.Generator().manual_seed(SEED)
    model.noise(2, gen)  # the rollout's noise comes first
    s = sigmas[T - 1]
    losses = []
    for _ in range(n):
        eps = model.noise(2, gen)
        x_s = (1 - s) * traj[-1] + s * eps
        x0_hat = x_s - s * model.velocity(x_s, s, cond)
        losses.append(-smooth_reward(model.decode(x0_hat), PROMPTS2).mean())
    expected = autograd_grad(model, torch.stack(losses).mean())
    assert rel(g, expected) < 1e-10
    assert out.metrics["n"] == n


def test_alignprop_is_draftk_with_random_k(flux64):
    model, cond = flux64
    g_fixed, _ = objective_grad(build_objective("alignprop", num_steps=T, min_k=2, max_k=2), model, cond, seed=SEED)
    g_draft2, _ = objective_grad(build_objective("draft_k", num_steps=T, k=2), model, cond, seed=SEED)
    assert rel(g_fixed, g_draft2) < 1e-10
    obj = build_objective("alignprop", num_steps=T, min_k=1, max_k=4)
    ks = set()
    for seed in range(8):
        with torch.no_grad():
            ks.add(int(obj(model, cond, PROMPTS2, smooth_reward, torch.Generator().manual_seed(seed)).metrics["k"]))
    assert ks <= {1, 2, 3, 4} and len(ks) > 1, ks
    g_rand, out = objective_grad(obj, model, cond, seed=SEED)
    same_k = build_objective("draft_k", num_steps=T, k=int(out.metrics["k"]))
    g_same_k, _ = objective_grad(same_k, model, cond, seed=SEED)
    assert rel(g_rand, g_same_k) < 1e-10


def test_naive_bptt_grows_with_T():
    """Full backprop keeps every step's activations: saved bytes grow linearly in T; checkpointing cuts them."""
    model, cond = flux_model(torch.float32)
    measured = {}
    for num_steps in (2, 4, 8):
        obj = build_objective("full_backprop", num_steps=num_steps)
        gen = torch.Generator().manual_seed(0)
        measured[num_steps], out = saved_tensor_bytes(obj, model, cond, PROMPTS2, smooth_reward, gen)
        del out
    assert measured[2] < measured[4] < measured[8]
    per_step = (measured[8] - measured[4]) / 4
    assert per_step == pytest.approx((measured[4] - measured[2]) / 2, rel=0.05)
    ckpt = build_objective("full_backprop", num_steps=8, checkpoint=True)
    ckpt_bytes, _ = saved_tensor_bytes(ckpt, model, cond, PROMPTS2, smooth_reward, torch.Generator().manual_seed(0))
    assert ckpt_bytes < measured[8] / 2
    leap_bytes, _ = saved_tensor_bytes(
        build_objective("leapalign", num_steps=8), model, cond, PROMPTS2, smooth_reward,
        torch.Generator().manual_seed(0),
    )
    assert leap_bytes < measured[8]


def test_every_registered_objective_runs_and_backprops(family64):
    model, cond, _ = family64
    for name in OBJECTIVES:
        g, out = objective_grad(build_objective(name, num_steps=4), model, cond, seed=SEED)
        assert out.loss.ndim == 0 and out.rewards.shape == (2,) and out.images.shape == (2, 3, 8, 8), name
        assert g.abs().sum() > 0, f"{name} produced no gradient"
        assert "reward_mean" in out.metrics and "loss" in out.metrics


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: DraftKConfig(num_steps=4, k=5), r"k must be in \[1, num_steps=4\], got 5"),
        (lambda: DraftKConfig(num_steps=4, k=0), r"k must be in \[1, num_steps=4\]"),
        (lambda: DraftLVConfig(n=0), "n must be >= 1"),
        (lambda: ReFLConfig(num_steps=10, min_idx=8, max_idx=8), "min_idx < max_idx"),
        (lambda: DRTuneConfig(num_steps=4, k=2, fixed_steps=(1, 1)), "distinct steps"),
        (lambda: AlignPropConfig(num_steps=4, min_k=3, max_k=2), "min_k <= max_k"),
        (lambda: DraftKConfig(num_steps=0), "num_steps must be >= 1"),
    ],
)
def test_baseline_configs_reject_bad_values(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_baselines_reject_mismatched_batch(flux64):
    model, cond = flux64
    with pytest.raises(ValueError, match="cond has batch size 2 but 1 prompts"):
        build_objective("draft_k", num_steps=3)(model, cond, ["only one"], smooth_reward)
