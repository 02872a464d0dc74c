"""``python -m benchmarks activations``: bytes saved for backward by one transformer forward, patched vs eager.

One forward of a diffusers transformer (random weights, same weights for both variants) with
autograd on; every tensor autograd saves is counted through
``torch.autograd.graph.saved_tensors_hooks`` (unique storages once, parameters and views of them
excluded: they are resident anyway). ``eager`` is diffusers as shipped; ``patched`` is the same
model after ``leapkernels.apply_leapkernels`` (all fusions on). DESIGN §3's target: patched <= 0.5x eager.

``--model-family``: ``flux`` (FLUX.1, ``FluxTransformer2DModel``; results ``activations_DEVICE``),
``flux2`` (``Flux2Transformer2DModel``) or ``sd3`` (SD3.5-style ``SD3Transformer2DModel``: dual
attention, RMS QK-norm); results ``activations_DEVICE_FAMILY`` for the last two.

``max_rel_err``: the largest ``max|x - truth| / max|truth|`` over the output and every parameter
gradient (one fixed random cotangent), against the fp64 model with the same weights; eager's own
figure is beside it, so the patched one can be read against the flash-attention rule (<= 2x).

Default models (``--model cpu``), batch 1, 4 heads x 64 (width 256), 1,024 image + 64 text tokens:
FLUX.1 2 double + 4 single blocks; FLUX.2 2 double + 4 single blocks (mlp ratio 3, no guidance:
klein-like); SD3 4 joint blocks (the first 2 with SD3.5's dual attention), RMS QK-norm. On CPU the
fused ops run their PyTorch reference backend (the bytes saved do not depend on the backend: the
autograd.Functions save the same tensors); on CUDA the compiled Triton kernels.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Any, Callable, Sequence

import torch

from benchmarks.machine import machine_info
from benchmarks.options import add_output_args, output_paths, parse_suite_args, suite_parser
from benchmarks.report import Column, ResultDoc, format_bytes, write_results
from leapalign.models.tiny_flux import tiny_flux_spec
from leapalign.profiling import SavedTensorCounter

__all__ = ["main", "MODELS", "FAMILIES", "saved_bytes_of_forward"]

FAMILIES = {"flux": "FLUX.1", "flux2": "FLUX.2", "sd3": "SD3.5"}


def _flux(spec_name: str, latent_side: int, text_tokens: int) -> dict[str, Any]:
    """A ``leapalign.models.tiny_flux`` config without guidance embeddings, at the given token counts."""
    config = dict(tiny_flux_spec(spec_name).transformer, guidance_embeds=False)
    return dict(config=config, latent_side=latent_side, text_tokens=text_tokens)


def _flux2(width_heads: tuple[int, int], blocks: tuple[int, int], latent_side: int, text_tokens: int) -> dict[str, Any]:
    heads, head_dim = width_heads
    config = dict(patch_size=1, in_channels=64, num_layers=blocks[0], num_single_layers=blocks[1],
                  attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=128,
                  timestep_guidance_channels=64, axes_dims_rope=(head_dim // 4,) * 4, guidance_embeds=False)
    return dict(config=config, latent_side=latent_side, text_tokens=text_tokens)


def _sd3(width_heads: tuple[int, int], layers: int, dual: int, latent_side: int, text_tokens: int) -> dict[str, Any]:
    heads, head_dim = width_heads
    config = dict(sample_size=2 * latent_side, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=head_dim,
                  num_attention_heads=heads, joint_attention_dim=128, caption_projection_dim=heads * head_dim,
                  pooled_projection_dim=64, out_channels=16, pos_embed_max_size=latent_side,
                  dual_attention_layers=tuple(range(dual)), qk_norm="rms_norm")
    return dict(config=config, latent_side=latent_side, text_tokens=text_tokens)


MODELS: dict[str, dict[str, dict[str, Any]]] = {
    "flux": {"cpu": _flux("cpu-wide", 32, 64), "tiny": _flux("test", 4, 8)},
    "flux2": {"cpu": _flux2((4, 64), (2, 4), 32, 64), "tiny": _flux2((2, 16), (1, 1), 4, 8)},
    "sd3": {"cpu": _sd3((4, 64), 4, 2, 32, 64), "tiny": _sd3((2, 16), 2, 1, 4, 8)},
}
"""family -> model name -> transformer config and token counts (``latent_side``^2 image tokens)."""


def _positions(side: int, axes: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ids = [torch.zeros_like(rows), rows, cols] + [torch.zeros_like(rows)] * (axes - 3)
    return torch.stack(ids, dim=-1).reshape(-1, axes).float()


def _inputs(family: str, spec: dict[str, Any], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Batch-1 inputs of ``family``'s transformer, drawn latents, text, pooled text (timesteps exact
    in bf16: the fp64 truth sees the same)."""
    cfg, side, n_txt = spec["config"], spec["latent_side"], spec["text_tokens"]
    if family == "sd3":
        latents = torch.randn(1, cfg["in_channels"], 2 * side, 2 * side, generator=g)
    else:
        latents = torch.randn(1, side * side, cfg["in_channels"], generator=g)
    inputs = dict(hidden_states=latents, encoder_hidden_states=torch.randn(1, n_txt, cfg["joint_attention_dim"], generator=g))
    if family == "sd3":
        return dict(inputs, pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
                    timestep=torch.tensor([500.0]))
    if family == "flux":
        return dict(inputs, pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
                    timestep=torch.tensor([0.5]), img_ids=_positions(side, 3), txt_ids=torch.zeros(n_txt, 3))
    txt_ids = torch.cat([torch.zeros(n_txt, 3), torch.arange(n_txt, dtype=torch.float32)[:, None]], dim=1)
    return dict(inputs, timestep=torch.tensor([0.5]), img_ids=_positions(side, 4), txt_ids=txt_ids)


def _model_class(family: str) -> Callable[..., torch.nn.Module]:
    import diffusers

    return getattr(diffusers, {"flux": "FluxTransformer2DModel", "flux2": "Flux2Transformer2DModel",
                               "sd3": "SD3Transformer2DModel"}[family])


def _build(family: str, name: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The model (weights ~ N(0, 0.05), seeded) and its inputs (batch 1)."""
    spec = MODELS[family][name]
    torch.manual_seed(seed)
    model = _model_class(family)(**spec["config"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    inputs = _inputs(family, spec, torch.Generator().manual_seed(seed + 1))
    model = model.to(device=device, dtype=dtype)
    inputs = {k: v.to(device=device, dtype=dtype if k not in ("img_ids", "txt_ids") else v.dtype) for k, v in inputs.items()}
    return model, inputs


def saved_bytes_of_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes autograd saves in one forward of ``model(**inputs)``; also returns the output (graph alive)."""
    counter = SavedTensorCounter()
    with counter:
        out = model(**inputs, return_dict=False)[0]
    return counter.bytes, out


def _grads(model: torch.nn.Module, out: torch.Tensor, cotangent: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out.backward(cotangent.to(out.dtype))
    return {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}


def _rel(x: torch.Tensor, truth: torch.Tensor) -> float:
    x, truth = x.detach().double().cpu(), truth.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    return (x - truth).abs().max().item() / max(truth.abs().max().item(), 1e-30)


_FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2.0**-10, torch.float16: 2.0**-13, torch.float64: 1e-12}


def _tokens(family: str, model_name: str) -> int:
    spec = MODELS[family][model_name]
    return spec["latent_side"] ** 2 + spec["text_tokens"]


def run(model_name: str, dtypes: Sequence[torch.dtype], device: torch.device, family: str = "flux",
        switches: dict[str, bool] | None = None) -> list[dict[str, Any]]:
    """One eager and one patched record per dtype (``switches``: leapkernels options by name)."""
    from leapkernels import apply_leapkernels

    records = []
    for dtype in dtypes:
        eager, inputs = _build(family, model_name, dtype, device)
        patched = apply_leapkernels(copy.deepcopy(eager), switches)
        truth = copy.deepcopy(eager).to(torch.float64)
        truth_inputs = {k: (v.double() if v.is_floating_point() and "ids" not in k else v) for k, v in inputs.items()}
        out_t = truth(**truth_inputs, return_dict=False)[0]
        cot = torch.randn(out_t.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)
        grads_t = _grads(truth, out_t, cot)
        eager_bytes, eager_errs = None, None
        for variant, model in (("eager", eager), ("patched", patched)):
            nbytes, out = saved_bytes_of_forward(model, inputs)
            grads = _grads(model, out, cot)
            errs = {"output": _rel(out, out_t), **{n: _rel(grads[n], grads_t[n]) for n in grads_t}}
            if variant == "eager":
                eager_bytes, eager_errs = nbytes, errs
            floor = _FLOOR[dtype]
            within = sum(errs[k] <= 2 * eager_errs[k] + floor for k in errs)
            records.append(dict(
                variant=variant, dtype=str(dtype).replace("torch.", ""), model=model_name, family=family,
                tokens=_tokens(family, model_name),
                saved_bytes=nbytes, ratio_vs_eager=nbytes / eager_bytes, output_rel_err=errs["output"],
                max_rel_err=max(errs.values()), within_2x_eager=f"{within}/{len(errs)}", status="ok",
            ))
            del out, grads
    return records


COLUMNS = [
    Column("variant", "variant"), Column("dtype", "dtype"), Column("tokens", "tokens"),
    Column("saved_bytes", "saved for backward (MiB)", format_bytes), Column("ratio_vs_eager", "x eager", lambda x: f"{x:.3f}"),
    Column("output_rel_err", "output rel err vs fp64", "{:.2e}".format),
    Column("max_rel_err", "max rel err vs fp64 (output + all grads)", "{:.2e}".format),
    Column("within_2x_eager", "tensors within 2x eager err + floor"),
]

NOTES = (
    "saved bytes: torch.autograd.graph.saved_tensors_hooks over one forward; unique storages, parameters "
    "and their views excluded. Target (DESIGN §3): patched <= 0.5x eager.",
    "max rel err: max over output and every parameter gradient of max|x - fp64| / max|fp64|, same weights, "
    "one fixed random cotangent; the patched figure should be <= 2x the eager one (flash-attention rule). "
    "bf16: the max is dominated by parameters whose bf16 gradient is mostly rounding (eager's is as bad); the "
    "last column counts the tensors (output + each parameter gradient) whose patched error is <= 2x eager's + "
    "a floor (1e-6 fp32, 2^-10 bf16).",
    "On CPU the fused ops run the PyTorch reference backend (same saved tensors as the Triton kernels).",
)


def _parse_switches(items: Sequence[str]) -> dict[str, bool]:
    switches = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or value not in ("0", "1"):
            raise ValueError(f"--switch takes NAME=0 or NAME=1, got {item!r}")
        switches[name] = value == "1"
    return switches


def build_parser() -> argparse.ArgumentParser:
    parser = suite_parser("activations", __doc__)
    parser.add_argument("--model-family", default="flux", choices=sorted(FAMILIES),
                        help="flux (FLUX.1), flux2 (FLUX.2) or sd3 (SD3.5): the diffusers transformer measured")
    parser.add_argument("--model", default="cpu", choices=sorted(MODELS["flux"]))
    parser.add_argument("--switch", nargs="*", default=[], metavar="NAME=0|1",
                        help="leapkernels switches of the family (e.g. whole_mlp=1 for FLUX.1); the others stay default")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    add_output_args(parser, "activations_DEVICE.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, argv = parse_suite_args(build_parser(), argv)
    device = torch.device(args.device)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    family = args.model_family
    switches = _parse_switches(args.switch)
    records = run(args.model, dtypes, device, family, switches)
    spec = MODELS[family][args.model]
    config = dict(model_family=family, model=args.model, switches=switches, **spec["config"], image_tokens=spec["latent_side"] ** 2,
                  text_tokens=spec["text_tokens"], batch=1, device=args.device)
    summary = {f"patched_over_eager_{r['dtype']}": r["ratio_vs_eager"] for r in records if r["variant"] == "patched"}
    doc = ResultDoc("activations", machine_info(["activations", *argv]), config, records, summary)
    name = f"activations_{args.device}.json" if family == "flux" else f"activations_{args.device}_{family}.json"
    write_results(*output_paths(args, name), doc, COLUMNS,
                  f"Saved activations: leapkernels-patched vs eager {FAMILIES[family]} ({args.device})", NOTES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
