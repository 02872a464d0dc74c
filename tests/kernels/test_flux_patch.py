"""apply_leapkernels_to_flux on diffusers' FluxTransformer2DModel: same outputs and parameter
gradients as the unpatched model (judged against an fp64 copy), exact revert, checkpointing, LoRA."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from leapkernels import backend
from leapkernels.flux import apply_leapkernels_to_flux, is_patched, patch_options, revert_leapkernels

from .op_harness import FLOOR, rel_err

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402

# diffusers' own tiny test config, and a wider one: 3 heads of 18 (not a power of two), 2 + 2
# blocks, odd token counts (15 image, 7 text).
CONFIGS = {
    "tiny": (dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
             16, 8),
    "wide-odd": (dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=18,
                      num_attention_heads=3, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 8]),
                 15, 7),
}


def _model(name: str, seed: int = 0) -> tuple[FluxTransformer2DModel, dict]:
    config, n_img, n_txt = CONFIGS[name]
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**config)
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-inits nothing here, but make every path matter
            p.normal_(0.0, 0.15)
    g = torch.Generator().manual_seed(seed + 1)
    batch = 2
    inputs = dict(
        hidden_states=torch.randn(batch, n_img, config["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, n_txt, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.5, 0.25])[:batch],  # x1000 exact in bf16: the truth sees the same timesteps
        img_ids=torch.randint(0, 6, (n_img, 3), generator=g).float(),
        txt_ids=torch.zeros(n_txt, 3),
    )
    return model, inputs


def _run(model: torch.nn.Module, inputs: dict, dtype: torch.dtype, cotangent: torch.Tensor):
    """One forward + backward on the model's device; returns the output and every parameter's
    gradient (fp64 CPU copies)."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    cast = {k: (v.to(dtype) if k != "timestep" and v.is_floating_point() and "ids" not in k else v).to(device)
            for k, v in inputs.items()}
    out = model(**cast, return_dict=False)[0]
    out.backward(cotangent.to(device=device, dtype=out.dtype))
    grads = {n: p.grad.detach().double().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().double().cpu(), grads


def _compare(name: str, dtype: torch.dtype, device: str = "cpu", **switches):
    """Patched vs unpatched model of ``dtype``, both judged against the fp64 model (same weights)."""
    master, inputs = _model(name)
    eager = copy.deepcopy(master).to(device=device, dtype=dtype)
    truth = copy.deepcopy(eager).to(torch.float64)
    patched = copy.deepcopy(eager)
    apply_leapkernels_to_flux(patched, **switches)
    out_shape = (inputs["hidden_states"].shape[0], inputs["hidden_states"].shape[1], CONFIGS[name][0]["in_channels"])
    cot = torch.randn(out_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with backend.poison_outputs():
        out_p, grads_p = _run(patched, inputs, dtype, cot)
    out_e, grads_e = _run(eager, inputs, dtype, cot)
    out_t, grads_t = _run(truth, {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()},
                          torch.float64, cot)
    failures = []
    pairs = [("output", out_p, out_e, out_t)] + [(n, grads_p[n], grads_e[n], grads_t[n]) for n in grads_t]
    assert set(grads_p) == set(grads_t), "patched model leaves some parameters without gradient"
    for what, p, e, t in pairs:
        err, base = rel_err(p, t), rel_err(e, t)
        if not err <= 2 * base + FLOOR[dtype]:
            failures.append(f"{what}: patched error {err:.2e} > 2 x eager {base:.2e} + {FLOOR[dtype]:.0e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(backend.interpreter_enabled(), reason="compiled Triton needs TRITON_INTERPRET unset")])])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patched_flux_matches_unpatched(name, dtype, device):
    """Output and ALL parameter gradients: patched error vs fp64 <= 2x eager's + floor (1e-6 fp32,
    1 ulp bf16). On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _compare(name, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patched_flux_with_whole_mlp_matches_unpatched(dtype):
    """whole_mlp: the up projections join the GELU fusions (`gated_mlp`); same parity rule."""
    _compare("wide-odd", dtype, whole_mlp=True)


@backend.force_backend("reference")
def test_whole_mlp_saves_under_0_35x_the_eager_bytes_in_bf16_and_reverts():
    from leapalign.profiling import SavedTensorCounter

    model, inputs = _model("wide-odd")
    model = model.to(torch.bfloat16)
    cast = {k: (v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" and "ids" not in k else v)
            for k, v in inputs.items()}
    counted = []
    for switches in (None, {}, {"whole_mlp": True}):
        if switches is not None:
            apply_leapkernels_to_flux(model, **switches)
        with SavedTensorCounter() as counter:
            model(**cast, return_dict=False)
        counted.append(counter.bytes)
    assert counted[2] < counted[1] < counted[0] and counted[2] <= 0.35 * counted[0], counted  # ~0.31x vs ~0.44x
    revert_leapkernels(model)
    assert not is_patched(model)


@backend.force_backend("reference")  # the patch's wiring; the kernels are judged above
def test_revert_restores_bit_identical_outputs_and_gradients():
    model, inputs = _model("tiny")
    cot = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    before = _run(model, inputs, torch.float32, cot)
    processors = [b.attn.processor for b in list(model.transformer_blocks) + list(model.single_transformer_blocks)]
    apply_leapkernels_to_flux(model)
    assert is_patched(model) and patch_options(model)["qk_norm_rope"]
    patched = _run(model, inputs, torch.float32, cot)
    assert not torch.equal(patched[0], before[0]), "patch had no effect (the comparison would be vacuous)"
    revert_leapkernels(model)
    after = _run(model, inputs, torch.float32, cot)
    assert not is_patched(model)
    assert [b.attn.processor for b in list(model.transformer_blocks) + list(model.single_transformer_blocks)] == processors
    assert torch.equal(after[0], before[0])
    assert all(torch.equal(after[1][n], before[1][n]) for n in before[1])


def test_each_switch_alone_matches_unpatched():
    """Every per-op switch on its own (reference backend: this checks the wiring, not the kernels)."""
    model, inputs = _model("tiny")
    cot = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out0, g0 = _run(model, inputs, torch.float32, cot)
    names = ["modulated_layernorm", "gated_residual", "qk_norm_rope", "gelu", "norm_out"]
    with backend.force_backend("reference"):
        for name in names:
            apply_leapkernels_to_flux(model, **{n: n == name for n in names})
            out, g = _run(model, inputs, torch.float32, cot)
            assert rel_err(out, out0) < 2e-6, name
            assert max(rel_err(g[n], g0[n]) for n in g0) < 2e-5, name
    revert_leapkernels(model)


def test_gradient_checkpointing_gives_the_same_gradients():
    model, inputs = _model("tiny")
    cot = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    apply_leapkernels_to_flux(model)
    with backend.force_backend("reference"):
        out0, g0 = _run(model, inputs, torch.float32, cot)
        model.enable_gradient_checkpointing()
        out1, g1 = _run(model, inputs, torch.float32, cot)
    assert torch.equal(out0, out1)
    assert all(rel_err(g1[n], g0[n]) < 1e-6 for n in g0)


def test_lora_wrapped_flux_matches_unpatched():
    """peft LoRA on projections the patch reads directly otherwise (to_q, to_out.0, proj_out,
    ff.net.2): it must call the wrapped modules, so the LoRA weights get the same gradients."""
    peft = pytest.importorskip("peft")
    model, inputs = _model("tiny")
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                      target_modules=["to_q", "add_k_proj", "to_out.0", "proj_out", "ff.net.2", "proj_mlp"]))
    patched = copy.deepcopy(model)
    cot = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out0, g0 = _run(model, inputs, torch.float32, cot)
    apply_leapkernels_to_flux(patched)
    with backend.force_backend("reference"):
        out1, g1 = _run(patched, inputs, torch.float32, cot)
    lora = [n for n in g0 if "lora_" in n]
    assert lora and set(g1) == set(g0)
    assert rel_err(out1, out0) < 2e-6
    assert max(rel_err(g1[n], g0[n]) for n in lora) < 2e-5


def test_apply_rejects_a_non_flux_module():
    with pytest.raises(TypeError, match="transformer must be a diffusers FluxTransformer2DModel"):
        apply_leapkernels_to_flux(torch.nn.Linear(2, 2))


def test_norm_out_runs_ada_layernorm_continuous(monkeypatch):
    """norm_out alone: the final AdaLayerNormContinuous goes through the fused op (once per forward),
    matches the unpatched model in output and gradients, and reverts bit for bit."""
    import leapkernels.fusions as fusions

    model, inputs = _model("tiny")
    cot = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    before = _run(model, inputs, torch.float32, cot)
    calls = []
    fused = fusions.ada_layernorm_continuous
    monkeypatch.setattr(fusions, "ada_layernorm_continuous", lambda *a: calls.append(1) or fused(*a))
    names = ["modulated_layernorm", "gated_residual", "qk_norm_rope", "gelu"]
    apply_leapkernels_to_flux(model, **{n: False for n in names}, norm_out=True)
    patched = _run(model, inputs, torch.float32, cot)
    assert calls == [1]
    assert rel_err(patched[0], before[0]) < 2e-6
    assert max(rel_err(patched[1][n], before[1][n]) for n in before[1]) < 2e-5
    revert_leapkernels(model)
    after = _run(model, inputs, torch.float32, cot)
    assert torch.equal(after[0], before[0]) and all(torch.equal(after[1][n], before[1][n]) for n in before[1])


# ----------------------------------------------------------------------------- diffusers version guard
def test_installed_diffusers_is_a_verified_one():
    """CI runs the parity tests above on the installed diffusers: it must be one the guard accepts."""
    from leapkernels.flux import VERIFIED_DIFFUSERS, check_diffusers_version

    assert check_diffusers_version() == diffusers.__version__
    assert diffusers.__version__ in VERIFIED_DIFFUSERS


@pytest.mark.parametrize("version", ["0.43.0", "0.41.2", "0.43.0.dev0", "1.0.0"])
def test_unverified_diffusers_is_refused_unless_allowed(monkeypatch, version):
    from leapkernels.flux import UnverifiedDiffusersError

    model, _ = _model("tiny")
    monkeypatch.setattr(diffusers, "__version__", version)
    with pytest.raises(UnverifiedDiffusersError, match=rf"verified against diffusers .*, but diffusers {re.escape(version)} is installed"):
        apply_leapkernels_to_flux(model)
    assert not is_patched(model)
    with pytest.warns(UserWarning, match=rf"diffusers {re.escape(version)} is installed.*patching anyway"):
        apply_leapkernels_to_flux(model, allow_unverified_diffusers=True)
    assert is_patched(model)
    revert_leapkernels(model)
