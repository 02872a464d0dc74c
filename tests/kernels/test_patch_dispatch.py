"""apply_leapkernels(transformer): the family is chosen by the model's class, switches by name,
revert is bit-exact, and anything else is refused by name."""
from __future__ import annotations

import pytest
import torch

import leapkernels as lk
from leapkernels import backend
from leapkernels.patch import FAMILIES, model_family

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402


def _flux() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=[4, 4, 8])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 16, 4, generator=g), encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.5, 0.25]),
                  img_ids=torch.randint(0, 6, (16, 3), generator=g).float(), txt_ids=torch.zeros(8, 3))
    return model, inputs


def run_model(model: torch.nn.Module, inputs: dict, seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every parameter gradient of one forward + backward (a fixed random cotangent)."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False)[0]
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype))
    return out.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@backend.force_backend("reference")  # the dispatch and the revert; the kernels are judged in the parity tests
def test_apply_dispatches_flux_and_reverts_bit_for_bit():
    model, inputs = _flux()
    before = run_model(model, inputs)
    assert lk.apply_leapkernels(model) is model
    assert lk.is_patched(model) and lk.patch_options(model) == dict(lk.FluxPatchOptions().__dict__)
    patched = run_model(model, inputs)
    assert not torch.equal(patched[0], before[0]), "the patch changed nothing: the revert check would be vacuous"
    assert lk.revert_leapkernels(model) is model
    after = run_model(model, inputs)
    assert not lk.is_patched(model) and lk.patch_options(model) is None
    assert torch.equal(after[0], before[0]) and all(torch.equal(after[1][n], before[1][n]) for n in before[1])


def test_switches_by_name_or_dataclass_and_unknown_ones_are_named():
    model, _ = _flux()
    lk.apply_leapkernels(model, {"gelu": False})
    assert lk.patch_options(model) == dict(lk.FluxPatchOptions(gelu=False).__dict__)
    lk.apply_leapkernels(model, lk.FluxPatchOptions(norm_out=False, qk_norm_rope=False))
    assert lk.patch_options(model)["norm_out"] is False and lk.patch_options(model)["gelu"] is True
    with pytest.raises(ValueError, match=r"unknown leapkernels switch\(es\) \['swiglu'\] for a FluxTransformer2DModel; known: "):
        lk.apply_leapkernels(model, {"swiglu": True})
    with pytest.raises(TypeError, match="options must be None, a mapping"):
        lk.apply_leapkernels(model, ["gelu"])
    lk.revert_leapkernels(model)
    assert not lk.is_patched(model)


def test_a_subclass_is_its_family():
    class MyFlux(FluxTransformer2DModel):
        pass

    model = MyFlux(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    assert model_family(model).name == "flux"
    lk.apply_leapkernels(model)
    assert lk.is_patched(model)


@pytest.mark.parametrize("model", [torch.nn.Linear(2, 2), torch.nn.Sequential()], ids=["Linear", "Sequential"])
def test_an_unsupported_model_is_refused_naming_its_class_and_the_supported_ones(model):
    name = type(model).__qualname__
    with pytest.raises(lk.UnsupportedModelError, match=rf"cannot patch a torch\.nn\.modules\.\w+\.{name}; supported "
                                                       r"transformers: diffusers\.FluxTransformer2DModel, "
                                                       r"diffusers\.Flux2Transformer2DModel, diffusers\.SD3Transformer2DModel$"):
        lk.apply_leapkernels(model)
    with pytest.raises(lk.UnsupportedModelError):
        lk.revert_leapkernels(model)
    assert isinstance(lk.UnsupportedModelError("x"), TypeError)


def test_every_family_names_a_diffusers_class_and_its_switches():
    for family in FAMILIES:
        assert getattr(diffusers, family.model_class) is not None
        assert family.model_class in lk.supported_models()
        assert all(isinstance(v, bool) for v in family.options().__dict__.values())


@pytest.mark.parametrize("family", ["flux2", "sd3"])
def test_compiled_patched_model_is_one_graph_with_the_eager_value(family):
    """The rollout engine compiles the no-grad forward of the patched transformer: the patched
    FLUX.2 / SD3 blocks trace (the fused ops lower to their references) in one graph, no break."""
    from torch._dynamo.utils import counters

    from . import test_flux2_patch, test_sd3_patch

    module, name = {"flux2": (test_flux2_patch, "tiny-dev"), "sd3": (test_sd3_patch, "sd35")}[family]
    model, inputs = module._model(name)
    lk.apply_leapkernels(model)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        want = model(**inputs, return_dict=False)[0]
        got = torch.compile(model, backend="aot_eager")(**inputs, return_dict=False)[0]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
