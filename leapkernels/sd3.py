"""Swap the fused ops into a diffusers ``SD3Transformer2DModel`` (SD3, SD3.5), and undo it exactly.

`apply_leapkernels_to_sd3` replaces, per instance (never per class):
    * each ``JointTransformerBlock.forward`` by a copy of diffusers' 0.42 code calling the fused
      ops where its switches say so: modulated LayerNorm for AdaLN-Zero (``norm1``, SD3.5's
      ``SD35AdaLayerNormZeroX`` with its second modulation, ``norm1_context``) and ``norm2`` /
      ``norm2_context``; `gated_linear` for the attention closings (``to_out``, ``to_add_out``,
      SD3.5's ``attn2.to_out``); `gated_mlp` for the tanh-GELU feed-forwards (up projection +
      GELU + down projection + gate, saving only the input; `gated_linear` from the
      pre-activation when a projection is LoRA-wrapped); the last block's ``norm1_context``
      (AdaLayerNormContinuous) by `ada_layernorm_continuous`;
    * every ``JointAttnProcessor2_0`` by `LeapJointAttnProcessor`: with SD3.5's RMS QK-norm, q/k
      projection + RMSNorm in one Function recomputing the projection in backward; the
      projections before ``to_out`` / ``to_add_out`` returned to the block to fuse;
    * ``norm_out.forward`` (AdaLayerNormContinuous) by `ada_layernorm_continuous`.
`revert_sd3` deletes the instance attributes and restores the processors: bit-identical model.

Attention itself is ``F.scaled_dot_product_attention`` exactly as diffusers' processor calls it.
Projections wrapped by LoRA or hooked are called as modules; chunked feed-forward
(``enable_forward_chunking``) runs diffusers' own. Verified against the diffusers releases in
`VERIFIED_DIFFUSERS` (tests/kernels/test_sd3_patch.py: patched vs unpatched outputs and every gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leapkernels.flux_attention import project_norm_rope
from leapkernels.fusions import (
    OPTIONS,
    ada_continuous_forward,
    branch_out,
    check_ada_continuous,
    check_affine_free_layernorm,
    check_diffusers_version,
    gate,
    gelu_feed_forward_residual,
    is_patched,
    modulate,
    restore,
    swap_forward,
    swap_processor,
)


@dataclass(frozen=True)
class SD3PatchOptions:
    """Which fusions a patched SD3 uses (all on by default)."""

    modulated_layernorm: bool = True
    gated_residual: bool = True
    qk_norm: bool = True
    gelu: bool = True
    norm_out: bool = True


# ----------------------------------------------------------------------------- processor
def _heads(attn: nn.Module, x: torch.Tensor, added: bool, fuse_qk: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v of ``x`` as ``[B, S, H, Dh]`` heads, the q/k norm applied (fused when asked)."""
    names = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k") if added else \
        ("to_q", "to_k", "to_v", "norm_q", "norm_k")
    to_q, to_k, to_v, norm_q, norm_k = (getattr(attn, n) for n in names)
    hd = attn.inner_dim // attn.heads
    out = []
    for proj, norm in ((to_q, norm_q), (to_k, norm_k)):
        if norm is not None and fuse_qk:
            out.append(project_norm_rope(proj, norm, x, hd, None, slice(None)))
        else:
            t = proj(x).unflatten(-1, (-1, hd))
            out.append(norm(t) if norm is not None else t)
    return out[0], out[1], to_v(x).unflatten(-1, (-1, hd))


class LeapJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (0.42) with the q/k projection + RMS QK-norm fused
    (``fuse_qk``). ``leap_defer_out_projection=True`` returns the attention output(s) before
    ``to_out`` / ``to_add_out`` so the block can close them with `gated_linear`."""

    def __init__(self, fuse_qk: bool = True) -> None:
        self.fuse_qk = fuse_qk

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, leap_defer_out_projection: bool = False):
        batch, n_img = hidden_states.shape[:2]
        query, key, value = _heads(attn, hidden_states, False, self.fuse_qk)
        if encoder_hidden_states is not None:  # image tokens first, then text (unlike Flux)
            eq, ek, ev = _heads(attn, encoder_hidden_states, True, self.fuse_qk)
            query, key, value = (torch.cat([a, b], dim=1) for a, b in ((query, eq), (key, ek), (value, ev)))
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             dropout_p=0.0, is_causal=False)  # diffusers ignores the mask too
        out = out.transpose(1, 2).reshape(batch, -1, attn.inner_dim).to(query.dtype)
        if encoder_hidden_states is None:
            return out if leap_defer_out_projection else attn.to_out[1](attn.to_out[0](out))
        out, context = out[:, :n_img], out[:, n_img:]
        if leap_defer_out_projection:
            return out, context
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](out)), context


# ----------------------------------------------------------------------------- patched forward
def _close_attention(opts: SD3PatchOptions, attn: nn.Module, deferred: bool, residual: torch.Tensor, g: torch.Tensor,
                     out: torch.Tensor, context: bool = False) -> torch.Tensor:
    """``residual + g * projection(out)``: fused with the projection when the processor deferred it."""
    if not deferred:
        return gate(opts.gated_residual, residual, g, out)
    if context:
        return branch_out(opts.gated_residual, False, residual, g, out, attn.to_add_out)
    return branch_out(opts.gated_residual, False, residual, g, out, attn.to_out[0], dropout_after=attn.to_out[1])


def _feed_forward(opts: SD3PatchOptions, block: nn.Module, ff: nn.Module, residual: torch.Tensor, g: torch.Tensor,
                  x: torch.Tensor) -> torch.Tensor:
    if block._chunk_size is not None:
        from diffusers.models.attention import _chunked_feed_forward

        return gate(opts.gated_residual, residual, g, _chunked_feed_forward(ff, x, block._chunk_dim, block._chunk_size))
    return gelu_feed_forward_residual(opts.gated_residual, opts.gelu, ff, residual, g, x, whole=True)


def _joint_block_forward(self: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                         temb: torch.Tensor, joint_attention_kwargs: dict[str, Any] | None = None):
    """diffusers' JointTransformerBlock.forward (0.42), with the fused ops switched in."""
    opts: SD3PatchOptions = getattr(self, OPTIONS)
    mod = opts.modulated_layernorm
    kwargs = dict(joint_attention_kwargs or {})
    chunks = self.norm1.linear(self.norm1.silu(temb)).chunk(9 if self.use_dual_attention else 6, dim=1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
    norm_hidden_states = modulate(mod, self.norm1.norm, hidden_states, scale_msa, shift_msa)
    if self.use_dual_attention:  # SD35AdaLayerNormZeroX: a second modulation of the same input
        shift_msa2, scale_msa2, gate_msa2 = chunks[6:]
        norm_hidden_states2 = modulate(mod, self.norm1.norm, hidden_states, scale_msa2, shift_msa2)
    if self.context_pre_only:
        norm_encoder_hidden_states = self.norm1_context(encoder_hidden_states, temb)
    else:
        c = self.norm1_context.linear(self.norm1_context.silu(temb)).chunk(6, dim=1)
        (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = c
        norm_encoder_hidden_states = modulate(mod, self.norm1_context.norm, encoder_hidden_states, c_scale_msa, c_shift_msa)
    defer = opts.gated_residual and isinstance(self.attn.processor, LeapJointAttnProcessor)
    attn_output, context_attn_output = self.attn(hidden_states=norm_hidden_states,
                                                 encoder_hidden_states=norm_encoder_hidden_states,
                                                 **kwargs, **({"leap_defer_out_projection": True} if defer else {}))
    hidden_states = _close_attention(opts, self.attn, defer, hidden_states, gate_msa, attn_output)
    if self.use_dual_attention:
        defer2 = opts.gated_residual and isinstance(self.attn2.processor, LeapJointAttnProcessor)
        attn_output2 = self.attn2(hidden_states=norm_hidden_states2, **kwargs,
                                  **({"leap_defer_out_projection": True} if defer2 else {}))
        hidden_states = _close_attention(opts, self.attn2, defer2, hidden_states, gate_msa2, attn_output2)
    norm_hidden_states = modulate(mod, self.norm2, hidden_states, scale_mlp, shift_mlp)
    hidden_states = _feed_forward(opts, self, self.ff, hidden_states, gate_mlp, norm_hidden_states)
    if self.context_pre_only:
        return None, hidden_states
    encoder_hidden_states = _close_attention(opts, self.attn, defer, encoder_hidden_states, c_gate_msa,
                                             context_attn_output, context=True)
    norm_encoder_hidden_states = modulate(mod, self.norm2_context, encoder_hidden_states, c_scale_mlp, c_shift_mlp)
    encoder_hidden_states = _feed_forward(opts, self, self.ff_context, encoder_hidden_states, c_gate_mlp,
                                          norm_encoder_hidden_states)
    return encoder_hidden_states, hidden_states


# ----------------------------------------------------------------------------- apply / revert
def _check_attention(attn: nn.Module, where: str) -> None:
    from diffusers.models.normalization import RMSNorm

    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        norm = getattr(attn, name, None)
        if norm is None:
            continue
        if not isinstance(norm, (RMSNorm, nn.RMSNorm)) or getattr(norm, "bias", None) is not None:
            raise NotImplementedError(f"{where}.{name} is a {type(norm).__name__}; leapkernels fuses SD3's qk_norm "
                                      "'rms_norm' (per-head RMSNorm) or none")


def _check_sd3(transformer: nn.Module) -> None:
    from diffusers.models.activations import GELU
    from diffusers.models.normalization import AdaLayerNormContinuous

    for i, block in enumerate(transformer.transformer_blocks):
        where = f"transformer_blocks.{i}"
        if getattr(block.norm1, "emb", None) is not None:
            raise NotImplementedError(f"{where}.norm1 embeds class labels (AdaLayerNormZero with num_embeddings)")
        check_affine_free_layernorm(block.norm1.norm, f"{where}.norm1.norm")
        if isinstance(block.norm1_context, AdaLayerNormContinuous):
            check_ada_continuous(block.norm1_context, f"{where}.norm1_context")
        else:
            check_affine_free_layernorm(block.norm1_context.norm, f"{where}.norm1_context.norm")
        for name in ("norm2", "norm2_context"):
            if getattr(block, name) is not None:
                check_affine_free_layernorm(getattr(block, name), f"{where}.{name}")
        for name in ("ff", "ff_context"):
            ff = getattr(block, name)
            if ff is not None and not (isinstance(ff.net[0], GELU) and ff.net[0].approximate == "tanh"):
                raise NotImplementedError(f"{where}.{name} is not a tanh-GELU FeedForward")
        for name in ("attn", "attn2"):
            if getattr(block, name) is not None:
                _check_attention(getattr(block, name), f"{where}.{name}")
    check_ada_continuous(transformer.norm_out, "norm_out")


def _attentions(transformer: nn.Module) -> list[nn.Module]:
    return [a for b in transformer.transformer_blocks for a in (b.attn, b.attn2) if a is not None]


def apply_leapkernels_to_sd3(
    transformer: nn.Module, modulated_layernorm: bool = True, gated_residual: bool = True, qk_norm: bool = True,
    gelu: bool = True, norm_out: bool = True, *, allow_unverified_diffusers: bool = False,
) -> SD3PatchOptions:
    """Patch a diffusers ``SD3Transformer2DModel`` in place with the fused ops; returns the options.

    Switches: ``modulated_layernorm`` (AdaLN-Zero, SD3.5's second modulation, norm2, the last
    block's continuous context norm), ``gated_residual`` (the gated closings, with their
    projections), ``qk_norm`` (q/k projection + RMS QK-norm), ``gelu`` (GELU, with its down
    projection), ``norm_out``. Patching a patched model replaces the previous options. Undo with
    `revert_sd3` (or `leapkernels.revert_leapkernels`).
    """
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    check_diffusers_version(allow_unverified_diffusers)
    _check_sd3(transformer)
    if is_patched(transformer):
        revert_sd3(transformer)
    opts = SD3PatchOptions(modulated_layernorm, gated_residual, qk_norm, gelu, norm_out)
    for block in transformer.transformer_blocks:
        swap_forward(block, _joint_block_forward, opts)
        if block.context_pre_only and modulated_layernorm:
            swap_forward(block.norm1_context, ada_continuous_forward, opts)
    if qk_norm or gated_residual:
        for attn in _attentions(transformer):
            if type(attn.processor) is JointAttnProcessor2_0:  # fused-QKV, IP-adapter, custom: their own path
                swap_processor(attn, LeapJointAttnProcessor(fuse_qk=qk_norm))
    if norm_out:
        swap_forward(transformer.norm_out, ada_continuous_forward, opts)
    return opts


def revert_sd3(transformer: nn.Module) -> None:
    """Undo `apply_leapkernels_to_sd3`: original forwards and processors, bit-identical outputs."""
    blocks = list(transformer.transformer_blocks)
    restore(blocks + [b.norm1_context for b in blocks] + _attentions(transformer) + [transformer.norm_out])
