"""The compiled rollout engine on the smallest tiny Flux (spec ``test``): one graph for every
iteration, prompt and (k, j) draw; the reward sees the rollout that ran; eager gradients.

The inductor compile is paid once per module (the ``engine`` fixture) and shared by every test
here. Gradient tolerance: the compiled forward differs from eager in the last bits (fp32, ~1e-7
per forward; inductor reorders reductions), which the 2-4 steps of a tiny rollout carry into the
parameter gradients: ``||g_compiled - g_eager|| <= GRAD_RTOL ||g_eager||`` with GRAD_RTOL = 1e-4.
"""
from __future__ import annotations

import os

import pytest
import torch

import leapkernels
from leapalign.models import tiny_flux
from leapalign.objectives import build_objective
from leapalign.rollout_engine import CompiledRollout, RolloutCompileError, RolloutEngineConfig, unwrap_rollout, wrap_rollout

GRAD_RTOL = 1e-4
STEPS = 4
BATCH = 2
SHARED_ROLLOUT = {  # every objective whose no-grad rollout the engine runs, configured as in the benchmarks
    "leapalign": {"use_kernels": True},
    "drtune": {"k": 2},
    "draft_k": {"k": 1},
    "refl": {},
    "draft_lv": {"n": 2},
    "alignprop": {},
}


def _reward(images, prompts):
    return (images.float() - 0.5).abs().flatten(1).mean(1)


def _cond(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tiny_flux.random_flux_conditioning(model.transformer, BATCH, text_len=8, generator=g)


def _model(lora: bool = False):
    model = tiny_flux.tiny_flux_velocity_model("test", seed=0)
    if lora:
        from benchmarks.workload import add_lora

        add_lora(model.transformer, 4)
    leapkernels.apply_leapkernels_to_flux(model.transformer)  # as the trainer runs it
    return model


@pytest.fixture(scope="module", autouse=True)
def reference_kernels():
    """The patched ops' PyTorch references, not the Triton interpreter (tested in tests/kernels): the
    eager comparisons here run dozens of forwards."""
    with leapkernels.force_backend("reference"):
        yield


@pytest.fixture(scope="module")
def engine():
    torch._dynamo.reset()
    return CompiledRollout(_model(), RolloutEngineConfig(compile="default"))


def _grads(objective, model, cond, seed: int) -> tuple[torch.Tensor, object]:
    for p in model.trainable_parameters():
        p.grad = None
    out = objective(model, cond, ["a", "b"], _reward, torch.Generator().manual_seed(seed))
    out.loss.backward()
    flat = torch.cat([p.grad.flatten() for p in model.trainable_parameters() if p.grad is not None])
    return flat, out


def test_one_graph_for_every_iteration_prompt_and_draw(engine):
    from torch._dynamo.utils import counters

    objective = build_objective("leapalign", num_steps=STEPS, hinge_lambda=None)
    _grads(objective, engine, _cond(engine, 0), 0)  # compiles
    frames, graphs = counters["frames"]["total"], counters["stats"]["unique_graphs"]
    draws = set()
    for it in range(1, 4):
        _, out = _grads(objective, engine, _cond(engine, it), 100 + it)
        draws.add((out.metrics["i_k"], out.metrics["i_j"]))
    assert len(draws) > 1, "the seeds must draw different (k, j) pairs for the test to mean anything"
    assert counters["frames"]["total"] == frames and counters["stats"]["unique_graphs"] == graphs, "recompiled"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert engine.compiled_calls > 0 and engine.eager_calls > 0


def test_reward_sees_the_final_image_of_the_rollout_that_ran(engine, monkeypatch):
    import leapalign.objectives.leapalign as leapalign_module

    finals = []
    original = leapalign_module.rollout
    monkeypatch.setattr(leapalign_module, "rollout",
                        lambda *a, **k: finals.append(original(*a, **k)) or finals[-1])
    seen = []
    objective = build_objective("leapalign", num_steps=STEPS, hinge_lambda=None)
    out = objective(engine, _cond(engine, 7), ["a", "b"], lambda im, p: seen.append(im) or _reward(im, p),
                    torch.Generator().manual_seed(7))
    assert torch.equal(seen[0].detach(), engine.decode(finals[0].x0))
    assert torch.equal(out.images, engine.decode(finals[0].x0))


@pytest.mark.parametrize("name", list(SHARED_ROLLOUT))
def test_parameter_gradients_match_eager(engine, name):
    objective = build_objective(name, num_steps=STEPS, hinge_lambda=None, **SHARED_ROLLOUT[name])
    cond = _cond(engine, 3)
    compiled, out_c = _grads(objective, engine, cond, 11)
    eager, out_e = _grads(objective, unwrap_rollout(engine), cond, 11)
    assert {k: v for k, v in out_c.metrics.items() if k.startswith(("i_", "step", "k", "t"))} == \
        {k: v for k, v in out_e.metrics.items() if k.startswith(("i_", "step", "k", "t"))}
    err = float((compiled - eager).norm() / eager.norm())
    assert err <= GRAD_RTOL, f"{name}: relative gradient error {err:.2e} > {GRAD_RTOL:.0e}"
    torch.testing.assert_close(out_c.rewards, out_e.rewards, rtol=1e-4, atol=1e-6)


def test_off_returns_the_model_and_bad_settings_fail_clearly():
    model = tiny_flux.tiny_flux_velocity_model("test", seed=0)
    assert wrap_rollout(model, RolloutEngineConfig()) is model and wrap_rollout(model, None) is model
    with pytest.raises(ValueError, match="rollout compile must be one of"):
        RolloutEngineConfig(compile="fast")
    with pytest.raises(ValueError, match="grad_steps"):
        RolloutEngineConfig(compile="default", grad_steps="jit")
    with pytest.raises(ValueError, match="cuda_graphs='on' needs a CUDA network"):
        CompiledRollout(model, RolloutEngineConfig(compile="default", cuda_graphs="on"))
    with pytest.raises(TypeError, match="model.transformer"):
        CompiledRollout(object(), RolloutEngineConfig(compile="default"))


def test_inductor_failure_is_one_clear_error(monkeypatch):
    import leapalign.rollout_engine as engine_module

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    real_compile = torch.compile
    monkeypatch.setattr(engine_module.torch, "compile", lambda m, **kw: real_compile(m, backend=broken_backend))
    model = tiny_flux.tiny_flux_velocity_model("test", seed=0)
    engine = CompiledRollout(model, RolloutEngineConfig(compile="default"))
    x = model.noise(BATCH, torch.Generator().manual_seed(0))
    with torch.no_grad(), pytest.raises(RolloutCompileError, match="rollout_compile='default'.*set rollout_compile=off"):
        engine.velocity(x, torch.tensor(0.5, dtype=torch.float64), _cond(model, 0))
    assert model.transformer is unwrap_rollout(engine).transformer and not isinstance(model.transformer, type(None))


@pytest.fixture
def aot_eager(monkeypatch):
    """The engine's torch.compile with dynamo + AOTAutograd but no inductor codegen: what LoRA (peft
    layers under dynamo) and the trainer's wiring need checked, in seconds instead of a compile."""
    import leapalign.rollout_engine as engine_module

    real_compile = torch.compile
    monkeypatch.setattr(engine_module.torch, "compile",
                        lambda m, dynamic=False, mode=None: real_compile(m, backend="aot_eager", dynamic=dynamic))


def test_lora_gradients_match_eager(aot_eager):
    torch._dynamo.reset()
    engine = CompiledRollout(_model(lora=True), RolloutEngineConfig(compile="default"))
    objective = build_objective("leapalign", num_steps=STEPS, hinge_lambda=None)
    cond = _cond(engine, 5)
    compiled, _ = _grads(objective, engine, cond, 5)
    eager, _ = _grads(objective, unwrap_rollout(engine), cond, 5)
    err = float((compiled - eager).norm() / eager.norm())
    assert err <= GRAD_RTOL, f"LoRA: relative gradient error {err:.2e}"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LEAPALIGN_SLOW_TESTS"), reason="compiles forward + backward graphs "
                    "(~3 min on 2 cores); set LEAPALIGN_SLOW_TESTS=1")
def test_compiled_grad_steps_match_eager():
    torch._dynamo.reset()
    engine = CompiledRollout(_model(), RolloutEngineConfig(compile="default", grad_steps="compiled"))
    objective = build_objective("leapalign", num_steps=STEPS, hinge_lambda=None)
    cond = _cond(engine, 5)
    compiled, _ = _grads(objective, engine, cond, 5)
    eager, _ = _grads(objective, unwrap_rollout(engine), cond, 5)
    assert engine.eager_calls == 0 and engine.compiled_calls == STEPS
    err = float((compiled - eager).norm() / eager.norm())
    assert err <= GRAD_RTOL, f"compiled grad steps: relative gradient error {err:.2e}"
