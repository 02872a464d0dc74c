"""LeapAlign objective: the maths of DESIGN §2 against hand-built oracles, memory, and bad input.

Oracles run in float64 on the tiny diffusers Flux ("test" config, with its tiny VAE); gradients are
assembled from ``torch.func.vjp`` of the velocity at the rollout's own states (tests/_objective_oracles.py).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from _objective_oracles import single_torch_thread  # noqa: F401 (autouse fixture)
from _objective_oracles import (
    FAMILIES, PROMPTS2, ToyVelocity, family_model, float64_fixtures, flux_model, leap_oracle, manual_trajectory,
    objective_grad, rel, smooth_reward, velocity_vjp,
)
from leapalign.objectives import build_objective
from leapalign.objectives.leap_ops import grad_scale, leap_connector, trajectory_weight
from leapalign.objectives.leapalign import LeapAlignObjective, LeapAlignObjectiveConfig
from leapalign.profiling import saved_tensor_bytes
from leapalign.rewards.base import RewardNotDifferentiableError

T = 6
SEED = 3
# flux64 / flux64_reference: the tiny float64 Flux and its no-grad rollout for SEED; family64: each
# model family in float64 with its reference rollout (the tests that matter run on all)
flux64, flux64_reference, family64 = float64_fixtures(T, SEED)


def leapalign(**kw) -> LeapAlignObjective:
    cfg = dict(num_steps=T, weighting="off", hinge_lambda=None)
    cfg.update(kw)
    return LeapAlignObjective(LeapAlignObjectiveConfig(**cfg))


# -- the reward sees the true image ---------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_leaps,steps", [(1, (2,)), (2, (1, 4)), (3, (0, 2, 5))])
def test_reward_sees_bit_identical_final_image(family, num_leaps, steps):
    """float32 model + VAE: the decoded image scored with gradient equals the pure no-grad rollout's."""
    model, cond = family_model(family, torch.float32)
    seen = []

    def reward(images, prompts):
        seen.append(images.detach().clone())
        return smooth_reward(images, prompts)

    obj = leapalign(num_leaps=num_leaps, fixed_steps=steps, alpha=0.3)
    out = obj(model, cond, PROMPTS2, reward, torch.Generator().manual_seed(SEED))
    out.loss.backward()
    with torch.no_grad():
        sigmas = model.sigmas(T)
        noise = model.noise(2, torch.Generator().manual_seed(SEED))
        expected = model.decode(manual_trajectory(model, cond, noise, sigmas)[-1])
    assert len(seen) == 1
    assert torch.equal(seen[0], expected), f"max |diff| = {(seen[0] - expected).abs().max().item()}"
    assert torch.equal(out.images, expected)


# -- the gradient ------------------------------------------------------------------------------------


def test_alpha0_and_alpha1_match_vjp_oracle(family64):
    """g(0) and g(1) equal -j dv_j - (k-j) dv_k + alpha j (k-j) J dv_k assembled from vjps at x_k, x_j.

    For the CFG families v is the guided velocity of one batched forward, so the oracle's vjps
    (and J) are of the guided velocity too.
    """
    model, cond, (sigmas, traj, g0) = family64
    k, j = 1, 4
    oracle = {a: leap_oracle(model, cond, traj, sigmas, [k, j], a, g0) for a in (0.0, 1.0)}
    # the nested term must be visible, or the comparison would not tell alpha apart
    assert rel(oracle[1.0], oracle[0.0]) > 1e-3
    for a in (0.0, 1.0):
        g, out = objective_grad(leapalign(fixed_steps=(k, j), alpha=a), model, cond, seed=SEED)
        assert out.metrics["i_k"] == k and out.metrics["i_j"] == j
        assert rel(g, oracle[a]) < 1e-10, f"alpha={a}: rel err {rel(g, oracle[a])}"


def test_gradient_is_affine_in_alpha(flux64):
    """g(alpha) = g(0) + alpha (g(1) - g(0)) at three interior alphas."""
    model, cond = flux64
    g = {a: objective_grad(leapalign(fixed_steps=(0, 3), alpha=a), model, cond, seed=SEED)[0] for a in (0.0, 1.0)}
    assert rel(g[1.0], g[0.0]) > 1e-3
    for a in (0.1, 0.3, 0.75):
        ga = objective_grad(leapalign(fixed_steps=(0, 3), alpha=a), model, cond, seed=SEED)[0]
        expected = g[0.0] + a * (g[1.0] - g[0.0])
        assert rel(ga, expected) < 1e-10, f"alpha={a}: rel err {rel(ga, expected)}"


def test_alpha0_equals_drtune_stop_gradient(flux64, flux64_reference):
    """alpha = 0 equals stopping the gradient at the model input: only -j dv_j - (k-j) dv_k remain.

    Reference built with plain autograd: the model sees sg(x_k), sg(x_j); the image is
    ``x0 + S - sg(S)`` with ``S = (0 - j) v_j + (j - k) v_k`` (no connector or discount op).
    """
    model, cond = flux64
    sigmas, traj, _ = flux64_reference
    k, j = 2, 5
    g, _ = objective_grad(leapalign(fixed_steps=(k, j), alpha=0.0), model, cond, seed=SEED)

    for p in model.trainable_parameters():
        p.grad = None
    v_k = model.velocity(traj[k].detach(), sigmas[k], cond)
    v_j = model.velocity(traj[j].detach(), sigmas[j], cond)
    s = (sigmas[-1] - sigmas[j]).to(v_j.dtype) * v_j + (sigmas[j] - sigmas[k]).to(v_k.dtype) * v_k
    x0 = traj[-1] + s - s.detach()
    loss = -smooth_reward(model.decode(x0), PROMPTS2).mean()
    loss.backward()
    reference = torch.cat([p.grad.flatten() for p in model.trainable_parameters()])
    for p in model.trainable_parameters():
        p.grad = None
    assert rel(g, reference) < 1e-10


@pytest.mark.parametrize("num_leaps,steps", [(1, (3,)), (3, (0, 2, 4))])
def test_one_and_three_leap_gradients_match_oracle(family64, num_leaps, steps):
    """1 leap: -k dv_k only; 3 leaps k -> j -> l -> 0 with alpha at both intermediate inputs."""
    model, cond, (sigmas, traj, g0) = family64
    alpha = 0.6
    oracle = leap_oracle(model, cond, traj, sigmas, list(steps), alpha, g0)
    g, _ = objective_grad(leapalign(num_leaps=num_leaps, fixed_steps=steps, alpha=alpha), model, cond, seed=SEED)
    assert rel(g, oracle) < 1e-10
    if num_leaps == 1:  # independent check of the 1-leap formula: d x0 / d theta = -sigma_k dv_k
        c = (sigmas[-1] - sigmas[steps[0]]).to(g0.dtype)
        direct, _ = velocity_vjp(model, traj[steps[0]], sigmas[steps[0]], cond, c * g0)
        assert rel(g, direct) < 1e-10


def test_reward_on_xhat0_scores_the_leap(flux64, flux64_reference):
    """reward_on='xhat0': the reward sees decode(x_j + (0 - j) v(x_j)), the two-leap prediction."""
    model, cond = flux64
    sigmas, traj, _ = flux64_reference
    k, j = 1, 3
    seen = []

    def reward(images, prompts):
        seen.append(images.detach())
        return smooth_reward(images, prompts)

    obj = leapalign(fixed_steps=(k, j), alpha=0.5, reward_on="xhat0")
    obj(model, cond, PROMPTS2, reward, torch.Generator().manual_seed(SEED)).loss.backward()
    with torch.no_grad():
        xhat0 = traj[j] + (sigmas[-1] - sigmas[j]).to(traj[j].dtype) * model.velocity(traj[j], sigmas[j], cond)
        expected = model.decode(xhat0)
    assert torch.allclose(seen[0], expected, rtol=0, atol=1e-12)
    assert not torch.allclose(seen[0], model.decode(traj[-1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_leaps", [1, 2, 3])
def test_leapalign_reuses_the_rollout_forwards(num_leaps):
    """Exactly T velocity evaluations per call: the leap steps reuse the rollout's own forwards."""
    model = ToyVelocity()
    obj = build_objective("leapalign", num_steps=7, num_leaps=num_leaps, hinge_lambda=None)
    model.calls = 0
    obj(model, None, PROMPTS2, smooth_reward, torch.Generator().manual_seed(0)).loss.backward()
    assert model.calls == 7


# -- weighting and hinge on hand-built latents ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["both", "d_j", "d_0", "off"])
def test_weight_formula_on_handbuilt_latents(mode):
    """Loss = mean(relu(lambda - r) * w), w = 1 / (max(d_j, tau) + max(d_0, tau)) (or its parts)."""
    torch.manual_seed(0)
    model = ToyVelocity()
    steps, tau, lam, num_steps = (1, 3), 0.033, 10.0, 5
    sigmas = model.sigmas(num_steps)
    noise = model.noise(2, torch.Generator().manual_seed(SEED))
    xs = manual_trajectory(model, None, noise, sigmas)
    with torch.no_grad():
        k, j = steps
        xhat_j = xs[k] + (sigmas[j] - sigmas[k]) * model.velocity(xs[k], sigmas[k], None)
        xhat_0 = xs[j] - sigmas[j] * model.velocity(xs[j], sigmas[j], None)
        d_j = (xs[j] - xhat_j).abs().mean(dim=(1, 2))
        d_0 = (xs[-1] - xhat_0).abs().mean(dim=(1, 2))
    # d_j above tau; d_0 straddles it, so both the clamp and the raw distance are exercised
    assert (d_j > tau).all() and (d_0 > tau).any() and (d_0 < tau).any(), (d_j, d_0)
    r = smooth_reward(model.decode(xs[-1]), PROMPTS2)
    w = {
        "both": 1 / (d_j.clamp_min(tau) + d_0.clamp_min(tau)),
        "d_j": 1 / d_j.clamp_min(tau),
        "d_0": 1 / d_0.clamp_min(tau),
        "off": torch.ones_like(d_0),
    }[mode]
    expected = ((lam - r) * w).mean()
    obj = LeapAlignObjective(
        LeapAlignObjectiveConfig(num_steps=num_steps, fixed_steps=steps, tau=tau, hinge_lambda=lam, weighting=mode)
    )
    out = obj(model, None, PROMPTS2, smooth_reward, torch.Generator().manual_seed(SEED))
    assert torch.allclose(out.loss.detach().double(), expected, rtol=1e-6), (out.loss, expected)
    assert out.metrics["d_j"] == pytest.approx(float(d_j.mean()), rel=1e-6)
    assert out.metrics["d_0"] == pytest.approx(float(d_0.mean()), rel=1e-6)


def test_trajectory_weight_clamps_at_tau():
    d_j = torch.tensor([0.01, 0.5, 2.0])
    d_0 = torch.tensor([0.02, 0.001, 3.0])
    w = trajectory_weight([d_j], d_0, tau=0.1, mode="both")
    assert torch.allclose(w, torch.tensor([1 / 0.2, 1 / 0.6, 1 / 5.0]))
    assert not w.requires_grad


def test_hinge_zero_above_lambda():
    """Rewards above lambda: zero loss and exactly zero gradient; below: loss (lambda - r) w."""
    model = ToyVelocity()
    obj = build_objective("leapalign", num_steps=4, fixed_steps=(0, 2), hinge_lambda=0.5, weighting="off")
    high = lambda images, prompts: 1.0 + 0.1 * images.flatten(1).mean(1)  # noqa: E731  (always > 0.5 here)
    out = obj(model, None, PROMPTS2, high, torch.Generator().manual_seed(SEED))
    assert (out.rewards > 0.5).all()
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.trainable_parameters())
    assert out.metrics["hinge_active"] == 0.0
    low = lambda images, prompts: -1.0 + 0.1 * images.flatten(1).mean(1)  # noqa: E731
    out = obj(model, None, PROMPTS2, low, torch.Generator().manual_seed(SEED))
    assert out.loss.item() == pytest.approx(float((0.5 - out.rewards).mean()), rel=1e-12)
    assert out.metrics["hinge_active"] == 1.0


# -- the ops themselves -------------------------------------------------------------------------------


def test_connector_and_discount_values_and_gradients():
    """Connector: value of x_true bit for bit, gradient of x + c v; discount: identity value, alpha * grad."""
    gen = torch.Generator().manual_seed(0)
    x, v, x_true = (torch.randn(3, 7, 5, generator=gen, dtype=torch.float32) for _ in range(3))
    x.requires_grad_(True)
    v.requires_grad_(True)
    c = torch.tensor([0.3, -0.7, 0.11])
    connected, d = leap_connector(x, v, c, x_true)
    assert torch.equal(connected, x_true)
    assert torch.allclose(d, (x_true - (x + c.view(-1, 1, 1) * v)).abs().mean(dim=(1, 2)).detach())
    up = torch.randn(3, 7, 5, generator=gen)
    gx, gv = torch.autograd.grad(connected, (x, v), up)
    assert torch.equal(gx, up)
    assert torch.allclose(gv, c.view(-1, 1, 1) * up)
    y = torch.randn(2, 9, generator=gen, requires_grad=True)
    scaled = grad_scale(y, 0.3)
    assert torch.equal(scaled, y)
    (gy,) = torch.autograd.grad(scaled, y, torch.ones_like(y))
    assert torch.allclose(gy, torch.full_like(y, 0.3))


# -- pair sampling ----------------------------------------------------------------------------------------


def test_pair_sampling_is_uniform_over_range():
    """i_k < i_j drawn uniformly from the C(n, 2) pairs of [min_idx, max_idx); nothing outside it."""
    obj = leapalign(num_steps=10, min_idx=3, max_idx=7)
    gen = torch.Generator().manual_seed(0)
    counts: dict[tuple[int, int], int] = {}
    draws = 3000
    for _ in range(draws):
        k, j = obj.sample_steps(gen)
        counts[(k, j)] = counts.get((k, j), 0) + 1
    expected_pairs = {(a, b) for a in range(3, 7) for b in range(a + 1, 7)}
    assert set(counts) == expected_pairs
    expected = draws / len(expected_pairs)
    chi2 = sum((n - expected) ** 2 / expected for n in counts.values())
    assert chi2 < 20.5, f"chi2={chi2} with 5 dof (p ~ 0.001)"


# -- memory ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_bytes_constant_in_T(family):
    """Saved-for-backward bytes of LeapAlign at T = 4 and T = 32 agree within 2 % (two forwards kept)."""
    model, cond = family_model(family, torch.float32)
    obj = {T_: build_objective("leapalign", num_steps=T_, min_idx=0, max_idx=T_) for T_ in (4, 32)}
    measured = {}
    for T_, o in obj.items():
        nbytes, out = saved_tensor_bytes(o, model, cond, PROMPTS2, smooth_reward, torch.Generator().manual_seed(1))
        out.loss.backward()
        measured[T_] = nbytes
    assert measured[4] > 0
    assert abs(measured[32] - measured[4]) <= 0.02 * measured[4], measured


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(min_idx=5, max_idx=5), "min_idx must be < max_idx"),
        (dict(min_idx=6, max_idx=3), "min_idx must be < max_idx"),
        (dict(min_idx=4, max_idx=5), "2 leaps need at least 2 distinct steps"),
        (dict(num_steps=1), "2 leaps need at least 2 distinct steps"),
        (dict(num_steps=2, num_leaps=3), "3 leaps need at least 3 distinct steps"),
        (dict(alpha=1.5), r"alpha must be in \[0, 1\], got 1.5"),
        (dict(alpha=-0.1), r"alpha must be in \[0, 1\]"),
        (dict(tau=0.0), "tau must be > 0, got 0.0"),
        (dict(tau=-1.0), "tau must be > 0"),
        (dict(num_leaps=4), "num_leaps must be 1, 2 or 3"),
        (dict(weighting="both_maybe"), "weighting must be one of"),
        (dict(num_leaps=1, weighting="d_j"), "needs an intermediate connector"),
        (dict(reward_on="x1"), "reward_on must be"),
        (dict(max_idx=30), "max_idx must be <= num_steps=25"),
        (dict(fixed_steps=(3, 3)), "strictly increasing"),
        (dict(fixed_steps=(1,)), "must hold num_leaps=2 steps"),
        (dict(discount_max_norm=0.0), "discount_max_norm must be > 0 or None, got 0.0"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LeapAlignObjectiveConfig(**kwargs)


def test_default_range_follows_num_steps():
    cfg = LeapAlignObjectiveConfig(num_steps=25)
    assert cfg.upper_idx == 25
    assert dataclasses.replace(cfg, num_steps=50).upper_idx == 50
    with pytest.raises(ValueError, match="max_idx must be <= num_steps=10"):
        dataclasses.replace(LeapAlignObjectiveConfig(num_steps=25, max_idx=20), num_steps=10)


def test_non_differentiable_reward_is_detected():
    model = ToyVelocity()
    obj = build_objective("leapalign", num_steps=4)
    detached = lambda images, prompts: images.detach().flatten(1).mean(1)  # noqa: E731
    with pytest.raises(RewardNotDifferentiableError, match="without a gradient path"):
        obj(model, None, PROMPTS2, detached, torch.Generator().manual_seed(0))


def test_mismatched_batch_sizes_are_rejected(flux64):
    model, cond = flux64  # cond has batch 2
    obj = build_objective("leapalign", num_steps=4)
    with pytest.raises(ValueError, match="cond has batch size 2 but 3 prompts"):
        obj(model, cond, ["a", "b", "c"], smooth_reward)
    toy = ToyVelocity()
    wrong_shape = lambda images, prompts: images.flatten(1).mean(1)[:1]  # noqa: E731
    with pytest.raises(ValueError, match=r"reward must return shape \[2\]"):
        obj(toy, None, PROMPTS2, wrong_shape)


def test_build_objective_rejects_unknown_names_and_fields():
    with pytest.raises(ValueError, match="unknown objective name='leap'"):
        build_objective("leap")
    with pytest.raises(TypeError, match="valid fields"):
        build_objective("leapalign", alpa=0.3)
    assert isinstance(build_objective("LeapAlign", alpha=0.1), LeapAlignObjective)


def test_reward_with_gradient_only_through_its_own_weights_is_detected():
    """A trainable scorer fed detached images returns requires_grad=True rewards: still caught."""
    model = ToyVelocity()
    scorer = torch.nn.Linear(5, 1).double()  # unfrozen reward weights
    sneaky = lambda images, prompts: scorer(images.detach()[:, 0, :, 0]).squeeze(1)  # noqa: E731
    obj = build_objective("leapalign", num_steps=4)
    with pytest.raises(RewardNotDifferentiableError, match="does not reach the images"):
        obj(model, None, PROMPTS2, sneaky, torch.Generator().manual_seed(0))


def test_block_checkpointing_keeps_the_gradient_and_cuts_saved_bytes():
    """The adapter's per-block checkpointing on LeapAlign's two grad-enabled calls: same gradient, less memory."""
    results = {}
    for ckpt in (False, True):
        model, cond = flux_model(torch.float64, gradient_checkpointing=ckpt)
        obj = leapalign(fixed_steps=(1, 4), alpha=0.3)
        nbytes, out = saved_tensor_bytes(obj, model, cond, PROMPTS2, smooth_reward, torch.Generator().manual_seed(SEED))
        out.loss.backward()
        results[ckpt] = (torch.cat([p.grad.flatten() for p in model.trainable_parameters()]), nbytes)
    assert rel(results[True][0], results[False][0]) < 1e-12
    assert results[True][1] < results[False][1]


# -- the fused leapkernels ops behind the objective ---------------------------------------------------


def test_fused_ops_are_the_default_and_match_the_reference(flux64):
    """use_kernels=True (default) runs leapkernels' ops and gives the reference ops' gradient and image."""
    model, cond = flux64
    fused, plain = leapalign(fixed_steps=(1, 4), alpha=0.3), leapalign(fixed_steps=(1, 4), alpha=0.3, use_kernels=False)
    assert fused.ops.name == "leapkernels" and plain.ops.name == "reference"
    g_fused, out_fused = objective_grad(fused, model, cond, seed=SEED)
    g_plain, out_plain = objective_grad(plain, model, cond, seed=SEED)
    assert torch.equal(out_fused.images, out_plain.images)
    assert rel(g_fused, g_plain) < 1e-12


def test_discount_max_norm_caps_only_the_nested_term(flux64):
    """A tiny cap on the discounted input's gradient leaves g(0) (no nested term) and moves g(1) towards it."""
    model, cond = flux64
    g = {a: objective_grad(leapalign(fixed_steps=(1, 4), alpha=a), model, cond, seed=SEED)[0] for a in (0.0, 1.0)}
    capped = objective_grad(leapalign(fixed_steps=(1, 4), alpha=1.0, discount_max_norm=1e-12), model, cond, seed=SEED)[0]
    # the cap kills the gradient through the model input at x_j, so only the single-step terms remain
    assert rel(capped, g[0.0]) < 1e-8
    assert rel(capped, g[1.0]) > 1e-3
    loose = objective_grad(leapalign(fixed_steps=(1, 4), alpha=1.0, discount_max_norm=1e12), model, cond, seed=SEED)[0]
    assert rel(loose, g[1.0]) < 1e-10
