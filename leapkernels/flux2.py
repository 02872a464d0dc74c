"""Swap the fused ops into a diffusers ``Flux2Transformer2DModel`` (FLUX.2 dev / klein), and undo it exactly.

`apply_leapkernels_to_flux2` replaces, per instance (never per class):
    * each ``Flux2TransformerBlock.forward`` by a copy of diffusers' 0.42 code calling the fused
      ops where its switches say so: modulated LayerNorm for the four modulations (``norm1``,
      ``norm1_context``, ``norm2``, ``norm2_context``); `gated_linear` for the attention
      ``to_out`` / ``to_add_out`` closings; `gated_mlp` for the SwiGLU feed-forwards (the whole
      ``residual + gate * linear_out(swiglu(linear_in(x)))`` saving only ``x``;
      `gated_swiglu_linear` from ``linear_in``'s output when a projection is LoRA-wrapped);
    * each ``Flux2SingleTransformerBlock.forward`` likewise (the parallel block: one modulation;
      with a plain ``to_qkv_mlp_proj`` its q/k/v rows feed the attention and its MLP rows a
      `gated_mlp` closed by ``to_out`` with the attention as prefix, so none of the fused
      projection's 9 widths a token is saved; otherwise `gated_swiglu_linear` on its MLP half);
    * the processors: ``Flux2AttnProcessor`` by `LeapFluxAttnProcessor` (q/k projection + RMSNorm
      + RoPE in one Function, recomputing the projection), ``Flux2ParallelSelfAttnProcessor`` by
      `LeapFlux2ParallelProcessor`; attention itself still goes through diffusers'
      ``dispatch_attention_fn`` with the processor's backend;
    * ``norm_out.forward`` (AdaLayerNormContinuous) by `ada_layernorm_continuous`.
Cost of the memory saved: backward recomputes the q/k projections, the MLP up projections and
the gated projections' outputs (one forward-size matmul each) and the activations.
`revert_flux2` deletes the instance attributes and restores the processors: bit-identical model.

Per-token modulations (KV-cache "extract" mode blends reference-token modulations in) and the
KV-cache processors run diffusers' eager arithmetic. Projections wrapped by LoRA or hooked are
called as modules. Verified against the diffusers releases in `VERIFIED_DIFFUSERS`
(tests/kernels/test_flux2_patch.py: patched vs unpatched outputs and every gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leapkernels.flux_attention import LeapFluxAttnProcessor, norm_rope, plain_linear, same_dtype_device
from leapkernels.ops.gated_mlp import gated_mlp
from leapkernels.ops.qk_norm_rope import linear_qk_norm_rope
from leapkernels.fusions import (
    OPTIONS,
    activation,
    ada_continuous_forward,
    branch_out,
    check_ada_continuous,
    check_affine_free_layernorm,
    check_diffusers_version,
    gate,
    is_patched,
    mlp_residual,
    modulate,
    per_sample,
    restore,
    swap_forward,
    swap_processor,
)

Rope = tuple[torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class Flux2PatchOptions:
    """Which fusions a patched FLUX.2 uses (all on by default)."""

    modulated_layernorm: bool = True
    gated_residual: bool = True
    qk_norm_rope: bool = True
    swiglu: bool = True
    norm_out: bool = True


def _mods(temb_mod: torch.Tensor, sets: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """diffusers' ``Flux2Modulation.split``, each chunk as ``[B, D]`` rows where it is per sample."""
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    return tuple(tuple(per_sample(t) for t in group) for group in Flux2Modulation.split(temb_mod, sets))


def _ff_residual(opts: Flux2PatchOptions, ff: nn.Module, residual: torch.Tensor, g: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:
    """``residual + g * Flux2FeedForward(x)``: the whole branch in one `gated_mlp` (saves ``x``) where
    the projections are plain, else linear_in, then SwiGLU + linear_out + gate fused."""
    return mlp_residual(opts.gated_residual, opts.swiglu, residual, g, x, ff.linear_in, ff.linear_out, "swiglu")


def _rows(linear: nn.Module, start: int, stop: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``start:stop`` of a fused projection's weight and bias (views of the parameters)."""
    return linear.weight[start:stop], (linear.bias[start:stop] if linear.bias is not None else None)


def _sliced_qkv(attn: nn.Module, x: torch.Tensor, rope: Rope, fuse_qk: bool) -> tuple[torch.Tensor, ...]:
    """q, k (RMSNorm + RoPE) and v from the q/k/v rows of a plain ``to_qkv_mlp_proj``: with ``fuse_qk``
    each q/k projection is recomputed in backward (`linear_qk_norm_rope`), so nothing of the fused
    projection's 3 + 6 widths a token is saved but ``x``."""
    inner, hd = attn.inner_dim, attn.head_dim
    heads = []
    for i, norm in ((0, attn.norm_q), (1, attn.norm_k)):
        w, b = _rows(attn.to_qkv_mlp_proj, i * inner, (i + 1) * inner)
        if fuse_qk and norm.weight is not None and same_dtype_device(x, w, norm.weight) and \
                (rope is None or rope[0].shape[0] == x.shape[1]):
            cos, sin = rope if rope is not None else (None, None)
            eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
            heads.append(linear_qk_norm_rope(x, w, b, norm.weight, cos, sin, eps, hd))
        elif fuse_qk:
            heads.append(norm_rope(norm, F.linear(x, w, b).unflatten(-1, (-1, hd)), rope, slice(None)))
        else:
            from diffusers.models.embeddings import apply_rotary_emb

            t = norm(F.linear(x, w, b).unflatten(-1, (-1, hd)))
            heads.append(apply_rotary_emb(t, rope, sequence_dim=1) if rope is not None else t)
    return heads[0], heads[1], F.linear(x, *_rows(attn.to_qkv_mlp_proj, 2 * inner, 3 * inner)).unflatten(-1, (-1, hd))


def _single_mlp(opts: Flux2PatchOptions, attn: nn.Module, residual: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                attention: torch.Tensor) -> torch.Tensor:
    """``residual + g * to_out(cat([attention, swiglu(mlp rows of to_qkv_mlp_proj (x))]))``: one
    `gated_mlp` (saves ``x``) where ``to_out`` is plain, else the pre-activation and `branch_out`."""
    w_in, b_in = _rows(attn.to_qkv_mlp_proj, 3 * attn.inner_dim, None)
    out = attn.to_out
    if plain_linear(out) and g.dim() == 2 and same_dtype_device(residual, g, x, w_in, out.weight, attention):
        return gated_mlp(residual, g, x, w_in, b_in, out.weight, out.bias, attention, "swiglu")
    return branch_out(opts.gated_residual, opts.swiglu, residual, g, F.linear(x, w_in, b_in), out, act="swiglu",
                      prefix=attention)


# ----------------------------------------------------------------------------- processors
class LeapFlux2ParallelProcessor:
    """diffusers' ``Flux2ParallelSelfAttnProcessor`` (0.42) with RMSNorm + RoPE fused (``fuse_qk``)
    on q/k views of the fused projection, and the SwiGLU fused (``fuse_act``).
    ``leap_defer_out_projection=True`` returns ``(attention, mlp pre-activation)`` instead of
    ``to_out(cat([attention, swiglu(mlp)]))``, for the block to close with `gated_swiglu_linear`;
    with ``fuse_mlp`` and a plain ``to_qkv_mlp_proj`` it computes q/k/v from its rows alone and
    returns ``(attention, None)``: the block runs the MLP from its input (`gated_mlp`)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, fuse_qk: bool = True, fuse_act: bool = True, fuse_mlp: bool = True) -> None:
        self.fuse_qk, self.fuse_act, self.fuse_mlp = fuse_qk, fuse_act, fuse_mlp

    def _slices(self, attn: nn.Module, x: torch.Tensor, defer: bool) -> bool:
        proj = attn.to_qkv_mlp_proj
        return (defer and self.fuse_mlp and plain_linear(proj) and same_dtype_device(x, proj.weight)
                and proj.weight.shape[0] == 3 * attn.inner_dim + attn.mlp_hidden_dim * attn.mlp_mult_factor)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Rope = None, leap_defer_out_projection: bool = False):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        if self._slices(attn, hidden_states, leap_defer_out_projection):
            query, key, value = _sliced_qkv(attn, hidden_states, image_rotary_emb, self.fuse_qk)
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                        parallel_config=self._parallel_config)
            return out.flatten(2, 3).to(query.dtype), None
        proj = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = proj.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)  # as diffusers: TP-sharded or not
        qkv, mlp = torch.split(proj, [local_qkv, proj.shape[-1] - local_qkv], dim=-1)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        if self.fuse_qk:
            query = norm_rope(attn.norm_q, query, image_rotary_emb, slice(None))
            key = norm_rope(attn.norm_k, key, image_rotary_emb, slice(None))
        else:
            query, key = attn.norm_q(query), attn.norm_k(key)
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if leap_defer_out_projection:
            return out, mlp
        return attn.to_out(torch.cat([out, activation("swiglu", self.fuse_act, mlp)], dim=-1))


# ----------------------------------------------------------------------------- patched forwards
def _double_block_forward(self: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                          temb_mod_img: torch.Tensor, temb_mod_txt: torch.Tensor, image_rotary_emb: Rope = None,
                          joint_attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' Flux2TransformerBlock.forward (0.42), with the fused ops switched in."""
    opts: Flux2PatchOptions = getattr(self, OPTIONS)
    mod, fuse_gate = opts.modulated_layernorm, opts.gated_residual
    (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = _mods(temb_mod_img, 2)
    (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = _mods(temb_mod_txt, 2)
    norm_hidden_states = modulate(mod, self.norm1, hidden_states, scale_msa, shift_msa)
    norm_encoder_hidden_states = modulate(mod, self.norm1_context, encoder_hidden_states, c_scale_msa, c_shift_msa)
    joint_attention_kwargs = dict(joint_attention_kwargs or {})
    defer = fuse_gate and isinstance(self.attn.processor, LeapFluxAttnProcessor)
    if defer:  # the processor returns the attention before to_out / to_add_out: fused below
        joint_attention_kwargs["leap_defer_out_projection"] = True
    attn_output, context_attn_output = self.attn(
        hidden_states=norm_hidden_states, encoder_hidden_states=norm_encoder_hidden_states,
        image_rotary_emb=image_rotary_emb, **joint_attention_kwargs,
    )
    if defer:
        hidden_states = branch_out(fuse_gate, False, hidden_states, gate_msa, attn_output, self.attn.to_out[0],
                                   dropout_after=self.attn.to_out[1])
    else:
        hidden_states = gate(fuse_gate, hidden_states, gate_msa, attn_output)
    norm_hidden_states = modulate(mod, self.norm2, hidden_states, scale_mlp, shift_mlp)
    hidden_states = _ff_residual(opts, self.ff, hidden_states, gate_mlp, norm_hidden_states)

    if defer:
        encoder_hidden_states = branch_out(fuse_gate, False, encoder_hidden_states, c_gate_msa, context_attn_output,
                                           self.attn.to_add_out)
    else:
        encoder_hidden_states = gate(fuse_gate, encoder_hidden_states, c_gate_msa, context_attn_output)
    norm_encoder_hidden_states = modulate(mod, self.norm2_context, encoder_hidden_states, c_scale_mlp, c_shift_mlp)
    encoder_hidden_states = _ff_residual(opts, self.ff_context, encoder_hidden_states, c_gate_mlp,
                                         norm_encoder_hidden_states)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _single_block_forward(self: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                          temb_mod: torch.Tensor, image_rotary_emb: Rope = None,
                          joint_attention_kwargs: dict[str, Any] | None = None, split_hidden_states: bool = False,
                          text_seq_len: int | None = None):
    """diffusers' Flux2SingleTransformerBlock.forward (0.42), with the fused ops switched in."""
    opts: Flux2PatchOptions = getattr(self, OPTIONS)
    if encoder_hidden_states is not None:
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    ((mod_shift, mod_scale, mod_gate),) = _mods(temb_mod, 1)
    norm_hidden_states = modulate(opts.modulated_layernorm, self.norm, hidden_states, mod_scale, mod_shift)
    joint_attention_kwargs = dict(joint_attention_kwargs or {})
    defer = opts.gated_residual and isinstance(self.attn.processor, LeapFlux2ParallelProcessor)
    if defer:
        joint_attention_kwargs["leap_defer_out_projection"] = True
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **joint_attention_kwargs)
    if defer:
        attention, mlp = attn_output
        if mlp is None:  # the processor left the MLP half to the block: run it from the block's input
            hidden_states = _single_mlp(opts, self.attn, hidden_states, mod_gate, norm_hidden_states, attention)
        else:
            hidden_states = branch_out(opts.gated_residual, opts.swiglu, hidden_states, mod_gate, mlp, self.attn.to_out,
                                       act="swiglu", prefix=attention)
    else:
        hidden_states = gate(opts.gated_residual, hidden_states, mod_gate, attn_output)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    if split_hidden_states:
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return hidden_states


# ----------------------------------------------------------------------------- apply / revert
def _check_flux2(transformer: nn.Module) -> None:
    from diffusers.models.transformers.transformer_flux2 import Flux2SwiGLU

    for i, block in enumerate(transformer.transformer_blocks):
        for name in ("norm1", "norm1_context", "norm2", "norm2_context"):
            check_affine_free_layernorm(getattr(block, name), f"transformer_blocks.{i}.{name}")
        for name in ("ff", "ff_context"):
            if type(getattr(block, name).act_fn) is not Flux2SwiGLU:
                raise NotImplementedError(f"transformer_blocks.{i}.{name} is not a SwiGLU Flux2FeedForward")
    for i, block in enumerate(transformer.single_transformer_blocks):
        check_affine_free_layernorm(block.norm, f"single_transformer_blocks.{i}.norm")
        if type(block.attn.mlp_act_fn) is not Flux2SwiGLU:
            raise NotImplementedError(f"single_transformer_blocks.{i}.attn.mlp_act_fn is not Flux2SwiGLU")
    check_ada_continuous(transformer.norm_out, "norm_out")


def _modules(transformer: nn.Module) -> list[nn.Module]:
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    return blocks + [b.attn for b in blocks] + [transformer.norm_out]


def apply_leapkernels_to_flux2(
    transformer: nn.Module, modulated_layernorm: bool = True, gated_residual: bool = True, qk_norm_rope: bool = True,
    swiglu: bool = True, norm_out: bool = True, *, allow_unverified_diffusers: bool = False,
) -> Flux2PatchOptions:
    """Patch a diffusers ``Flux2Transformer2DModel`` in place with the fused ops; returns the options.

    Switches: ``modulated_layernorm`` (the block modulations), ``gated_residual`` (the gated
    closings, with their projections), ``qk_norm_rope`` (q/k RMSNorm + RoPE in the processors),
    ``swiglu`` (SwiGLU, with its down projection), ``norm_out``. Patching a patched model replaces
    the previous options. Undo with `revert_flux2` (or `leapkernels.revert_leapkernels`).
    """
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2AttnProcessor,
        Flux2ParallelSelfAttnProcessor,
        _get_qkv_projections,
    )

    check_diffusers_version(allow_unverified_diffusers)
    _check_flux2(transformer)
    if is_patched(transformer):
        revert_flux2(transformer)
    opts = Flux2PatchOptions(modulated_layernorm, gated_residual, qk_norm_rope, swiglu, norm_out)
    for block in transformer.transformer_blocks:
        swap_forward(block, _double_block_forward, opts)
        if (qk_norm_rope or gated_residual) and type(block.attn.processor) is Flux2AttnProcessor:
            swap_processor(block.attn, LeapFluxAttnProcessor(fuse_qk=qk_norm_rope, projections=_get_qkv_projections))
    for block in transformer.single_transformer_blocks:
        swap_forward(block, _single_block_forward, opts)
        if type(block.attn.processor) is Flux2ParallelSelfAttnProcessor and (qk_norm_rope or gated_residual or swiglu):
            swap_processor(block.attn, LeapFlux2ParallelProcessor(qk_norm_rope, swiglu, gated_residual and swiglu))
    if norm_out:
        swap_forward(transformer.norm_out, ada_continuous_forward, opts)
    return opts


def revert_flux2(transformer: nn.Module) -> None:
    """Undo `apply_leapkernels_to_flux2`: original forwards and processors, bit-identical outputs."""
    restore(_modules(transformer))
