"""Helpers for the objective tests: tiny models, rewards, and gradient oracles built by hand.

The oracles never call the code under test's leap/connector/discount ops: they assemble parameter
gradients from ``torch.func.vjp`` of the velocity at the rollout's states (DESIGN §2's terms).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import pytest
import torch
from torch import nn

from leapalign.flow import uniform_sigmas
from leapalign.models.tiny_flux import random_flux_conditioning, tiny_flux_velocity_model

PROMPTS2 = ["a red cube", "two blue spheres"]
FAMILIES = ("flux", "flux2", "flux2-klein", "sd3")
"""Model families the method tests run on: FLUX.1-dev, FLUX.2-dev (embedded guidance), FLUX.2 klein
base (classifier-free guidance, batched) and SD3.5 (classifier-free guidance, batched)."""


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread() -> Iterator[None]:
    """One intra-op thread while a module using these tiny models runs, then restore.

    The models are too small to gain from threads, and under ``pytest -n 2`` on 2 cores two workers
    with 2 threads each oversubscribe the CPU (measured: ~4x more CPU time for these tests).
    Import this fixture into a test module to apply it there.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def flux_model(dtype: torch.dtype = torch.float64, with_vae: bool = True, seed: int = 0, **kw: Any):
    """The "test" tiny Flux (float64 by default for oracle comparisons) and a batch-2 conditioning."""
    model = tiny_flux_velocity_model("test", dtype=dtype, seed=seed, with_vae=with_vae, **kw)
    cond = random_flux_conditioning(model.transformer, 2, 8, generator=torch.Generator().manual_seed(seed + 7))
    return model, cond


def family_model(family: str, dtype: torch.dtype = torch.float64, with_vae: bool = True, seed: int = 0, **kw: Any):
    """A tiny adapter of ``family`` (8x8 images, 3 channels with the VAE) and a batch-2 conditioning.

    CFG families (klein, SD3) get negative embeddings too, so every velocity is one batched forward
    of batch 4. Conditioning is random, seeded by ``seed + 7``.
    """
    if family == "flux":
        return flux_model(dtype, with_vae=with_vae, seed=seed, **kw)
    gen = torch.Generator().manual_seed(seed + 7)
    if family in ("flux2", "flux2-klein"):
        from leapalign.adapters.flux2 import Flux2Conditioning, Flux2VelocityModel
        from leapalign.adapters.tiny_configs import tiny_flux2_transformer, tiny_flux2_vae

        klein = family == "flux2-klein"
        transformer = tiny_flux2_transformer("klein" if klein else "dev", dtype=dtype, seed=seed)
        vae = tiny_flux2_vae(dtype=dtype, seed=seed + 1) if with_vae else None
        model = Flux2VelocityModel(transformer, vae=vae, height=8, width=8, guidance=4.0, cfg=klein, **kw)
        embeds = [torch.randn(2, 8, 32, generator=gen, dtype=dtype) for _ in range(2 if klein else 1)]
        return model, Flux2Conditioning(*embeds)
    if family == "sd3":
        from leapalign.adapters.sd3 import SD3Conditioning, SD3VelocityModel
        from leapalign.adapters.tiny_configs import tiny_sd3_transformer, tiny_sd3_vae

        vae = tiny_sd3_vae(dtype=dtype, seed=seed + 1) if with_vae else None
        model = SD3VelocityModel(tiny_sd3_transformer(dtype=dtype, seed=seed), vae=vae, height=8, width=8, guidance=5.0, **kw)
        shapes = [(2, 9, 32), (2, 32), (2, 9, 32), (2, 32)]
        return model, SD3Conditioning(*(torch.randn(s, generator=gen, dtype=dtype) for s in shapes))
    raise ValueError(f"unknown family={family!r}; expected one of {FAMILIES}")


def float64_fixtures(num_steps: int, seed: int) -> tuple[Any, Any, Any]:
    """Module-scoped fixtures of a test module that rolls out ``num_steps`` from ``seed``; assign them
    to module names: ``flux64, flux64_reference, family64 = float64_fixtures(T, SEED)``.

    ``flux64``: the tiny float64 Flux and its conditioning; ``flux64_reference``: its no-grad
    rollout ``(sigmas, x_0..x_T, dL/dx0)`` (independent Euler loop); ``family64``: each of
    :data:`FAMILIES` in float64 with its conditioning and reference rollout.
    """

    @pytest.fixture(scope="module", name="flux64")
    def flux64():
        return flux_model(torch.float64)

    @pytest.fixture(scope="module", name="flux64_reference")
    def flux64_reference(flux64):
        return reference_rollout(*flux64, num_steps, seed)

    @pytest.fixture(scope="module", params=FAMILIES, name="family64")
    def family64(request):
        model, cond = family_model(request.param, torch.float64)
        return model, cond, reference_rollout(model, cond, num_steps, seed)

    return flux64, flux64_reference, family64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms), the relative error every gradient test bounds."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def smooth_reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """A differentiable, non-linear, per-sample reward with a non-trivial image gradient."""
    target = torch.linspace(0.2, 0.8, images[0].numel(), dtype=images.dtype, device=images.device).view_as(images[0])
    return -((images - target) ** 2).flatten(1).mean(1) + 0.3 * torch.sin(3 * images).flatten(1).mean(1)


def grads(model: Any) -> torch.Tensor:
    """All trainable parameter gradients, flattened (zeros where None)."""
    out = []
    for p in model.trainable_parameters():
        out.append(torch.zeros_like(p).flatten() if p.grad is None else p.grad.detach().flatten().clone())
    return torch.cat(out)


def zero_grads(model: Any) -> None:
    for p in model.trainable_parameters():
        p.grad = None


def objective_grad(objective: Callable, model: Any, cond: Any, reward=smooth_reward, seed: int = 3, prompts=PROMPTS2):
    """Run one objective call with a fresh seeded generator, backprop, return (flat grad, output)."""
    zero_grads(model)
    out = objective(model, cond, prompts, reward, torch.Generator().manual_seed(seed))
    out.loss.backward()
    g = grads(model)
    zero_grads(model)
    return g, out


def image_cotangent(model: Any, x0: torch.Tensor, prompts=PROMPTS2, reward=smooth_reward) -> torch.Tensor:
    """``d loss / d x0`` for ``loss = mean(-reward(decode(x0)))`` (weighting off, no hinge)."""
    x0 = x0.detach().requires_grad_(True)
    loss = -reward(model.decode(x0), prompts).mean()
    (g,) = torch.autograd.grad(loss, x0)
    return g


class _VelocityModule(nn.Module):
    """``x -> model.velocity(x, sigma, cond)`` as an nn.Module, so ``functional_call`` can swap weights."""

    def __init__(self, model: Any, sigma: Any, cond: Any) -> None:
        super().__init__()
        self.transformer = model.transformer
        self._model, self._sigma, self._cond = model, sigma, cond

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model.velocity(x, self._sigma, self._cond)


def velocity_vjp(model: Any, x: torch.Tensor, sigma: Any, cond: Any, cotangent: torch.Tensor):
    """``(d<v, cot>/dtheta flattened, d<v, cot>/dx)`` at ``x`` via ``torch.func.vjp``."""
    module = _VelocityModule(model, sigma, cond)
    named = [(f"transformer.{n}", p) for n, p in model.transformer.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = tuple(p.detach() for _, p in named)

    def f(ps: tuple[torch.Tensor, ...], x_: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, dict(zip(names, ps)), (x_,))

    _, pullback = torch.func.vjp(f, params, x.detach())
    g_params, g_x = pullback(cotangent)
    return torch.cat([g.flatten() for g in g_params]), g_x


def leap_oracle(
    model: Any,
    cond: Any,
    trajectory: list[torch.Tensor],
    sigmas: torch.Tensor,
    steps: Sequence[int],
    alpha: float,
    g0: torch.Tensor,
) -> torch.Tensor:
    """LeapAlign's parameter gradient for leaps through ``steps`` (then to sigma = 0), assembled by hand.

    Leap m: ``xhat_{m+1} = x_m' + c_m v(x_in_m)``, ``c_m = sigma_{next} - sigma_m``; ``x_m'`` has the
    value of ``x_{i_m}`` and the gradient of the previous leap; ``x_in_m`` carries alpha times it.
    Walking back from ``g0 = dL/dx0``: the cotangent of ``v_m`` is ``c_m * cot``; the cotangent
    reaching ``x_m'`` is ``cot + alpha * (dv_m/dx)^T (c_m cot)``.
    """
    ends = list(steps[1:]) + [len(sigmas) - 1]
    cot = g0
    total = None
    for m in reversed(range(len(steps))):
        i, nxt = steps[m], ends[m]
        c = (sigmas[nxt] - sigmas[i]).to(g0.dtype)
        g_theta, g_x = velocity_vjp(model, trajectory[i], sigmas[i], cond, c * cot)
        total = g_theta if total is None else total + g_theta
        cot = cot + alpha * g_x
    return total


class ToyVelocity(nn.Module):
    """An analytic velocity model satisfying the VelocityModel protocol (for hand-built latents).

    ``v(x, s) = tanh(x W^T) (1 + s) + b`` over ``x: [B, N, 3]``; uniform sigmas; decode is the
    reshape ``[B, N, 3] -> [B, 3, N, 1]`` (latents are pixels); noise is standard normal.
    """

    def __init__(self, n_tokens: int = 5, channels: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(0.8 * torch.randn(channels, channels, generator=gen, dtype=dtype))
        self.b = nn.Parameter(0.3 * torch.randn(channels, generator=gen, dtype=dtype))
        self.n_tokens, self.channels = n_tokens, channels
        self.calls = 0

    def noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch_size, self.n_tokens, self.channels, generator=generator, dtype=self.W.dtype)

    def velocity(self, x: torch.Tensor, sigma: Any, cond: Any) -> torch.Tensor:
        self.calls += 1
        s = torch.as_tensor(sigma, dtype=x.dtype)
        s = s.view(-1, 1, 1) if s.ndim == 1 else s
        return torch.tanh(x @ self.W.T) * (1 + s) + self.b

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return uniform_sigmas(num_steps)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.permute(0, 2, 1).unsqueeze(-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def reference_rollout(model: Any, cond: Any, num_steps: int, seed: int):
    """``(sigmas, x_0..x_T, dL/dx0)`` of the no-grad rollout from ``model.noise(2, seed)``, written out by hand."""
    sigmas = model.sigmas(num_steps)
    noise = model.noise(2, torch.Generator().manual_seed(seed))
    traj = manual_trajectory(model, cond, noise, sigmas)
    return sigmas, traj, image_cotangent(model, traj[-1])


def manual_trajectory(model: Any, cond: Any, noise: torch.Tensor, sigmas: torch.Tensor) -> list[torch.Tensor]:
    """Euler states ``x_0..x_T`` written out independently of :mod:`leapalign.flow`."""
    xs = [noise]
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            v = model.velocity(xs[-1], sigmas[i], cond)
            xs.append(xs[-1] + (sigmas[i + 1] - sigmas[i]).to(noise.dtype) * v)
    return xs
