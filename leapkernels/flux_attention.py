"""diffusers' FluxAttnProcessor (0.42) with the q/k path fused, for `leapkernels.flux`'s patch.

q/k projection + per-head RMSNorm + interleaved RoPE run in one Function that recomputes the
projection in backward (`linear_qk_norm_rope`) when the projection is a plain ``nn.Linear``;
otherwise the projection module is called (LoRA, hooks) and only norm + RoPE are fused. Attention
itself still goes through diffusers' ``dispatch_attention_fn`` with the processor's backend.
"""
from __future__ import annotations

import torch
from torch import nn

from leapkernels.ops.qk_norm_rope import linear_qk_norm_rope, qk_norm_rope


def same_dtype_device(*tensors: torch.Tensor) -> bool:
    """Whether the fused ops can take these tensors together (one dtype, one device)."""
    return all(t.dtype == tensors[0].dtype and t.device == tensors[0].device for t in tensors[1:])


def plain_linear(module: nn.Module) -> bool:
    """A bare ``nn.Linear`` whose weight may be read directly (no LoRA wrapper, no hooks)."""
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in module.__dict__
    )


def _rope_rows(rope: tuple[torch.Tensor, torch.Tensor] | None, rows: slice):
    return (rope[0][rows], rope[1][rows]) if rope is not None else (None, None)


def norm_rope(norm: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, rows: slice) -> torch.Tensor:
    """``apply_rotary_emb(norm(x), rope[rows])`` fused (RMSNorm + interleaved RoPE)."""
    from diffusers.models.embeddings import apply_rotary_emb

    weight = norm.weight if norm.weight is not None else torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    cos, sin = _rope_rows(rope, rows)
    if same_dtype_device(x, weight) and (cos is None or (cos.device == x.device and cos.shape[0] == x.shape[1])):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return qk_norm_rope(x, weight, cos, sin, eps)
    x = norm(x)
    return apply_rotary_emb(x, (cos, sin), sequence_dim=1) if cos is not None else x


def project_norm_rope(proj: nn.Module, norm: nn.Module, x: torch.Tensor, head_dim: int,
                       rope: tuple[torch.Tensor, torch.Tensor] | None, rows: slice) -> torch.Tensor:
    """``apply_rotary_emb(norm(proj(x) as heads), rope[rows])``; plain Linear: the projection is
    recomputed in backward instead of saved (`linear_qk_norm_rope`)."""
    cos, sin = _rope_rows(rope, rows)
    weight = norm.weight
    if (plain_linear(proj) and weight is not None and same_dtype_device(x, proj.weight, weight)
            and (cos is None or (cos.device == x.device and cos.shape[0] == x.shape[1]))):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return linear_qk_norm_rope(x, proj.weight, proj.bias, weight, cos, sin, eps, head_dim)
    return norm_rope(norm, proj(x).unflatten(-1, (-1, head_dim)), rope, rows)


def _fused_qkv(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
               rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as heads with the q/k path fused (text tokens first in joint attention)."""
    hd = attn.head_dim
    joint = attn.added_kv_proj_dim is not None and encoder_hidden_states is not None
    txt = encoder_hidden_states.shape[1] if joint else 0
    img_rows, txt_rows = slice(txt, None), slice(0, txt)
    value = attn.to_v(hidden_states).unflatten(-1, (-1, hd))
    query = project_norm_rope(attn.to_q, attn.norm_q, hidden_states, hd, rope, img_rows)
    key = project_norm_rope(attn.to_k, attn.norm_k, hidden_states, hd, rope, img_rows)
    if joint:
        e = encoder_hidden_states
        query = torch.cat([project_norm_rope(attn.add_q_proj, attn.norm_added_q, e, hd, rope, txt_rows), query], dim=1)
        key = torch.cat([project_norm_rope(attn.add_k_proj, attn.norm_added_k, e, hd, rope, txt_rows), key], dim=1)
        value = torch.cat([attn.add_v_proj(e).unflatten(-1, (-1, hd)), value], dim=1)
    return query, key, value


def _diffusers_qkv(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                   rope: tuple[torch.Tensor, torch.Tensor] | None, projections=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as heads by diffusers' own q/k path (FluxAttnProcessor / Flux2AttnProcessor, 0.42);
    ``projections``: the model module's ``_get_qkv_projections`` (FLUX.1's by default)."""
    from diffusers.models.embeddings import apply_rotary_emb

    if projections is None:
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections as projections

    hd = attn.head_dim
    query, key, value, encoder_query, encoder_key, encoder_value = projections(
        attn, hidden_states, encoder_hidden_states
    )
    query, key, value = (t.unflatten(-1, (-1, hd)) for t in (query, key, value))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if attn.added_kv_proj_dim is not None:
        encoder_query, encoder_key, encoder_value = (
            t.unflatten(-1, (-1, hd)) for t in (encoder_query, encoder_key, encoder_value)
        )
        query = torch.cat([attn.norm_added_q(encoder_query), query], dim=1)
        key = torch.cat([attn.norm_added_k(encoder_key), key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
    if rope is not None:
        query = apply_rotary_emb(query, rope, sequence_dim=1)
        key = apply_rotary_emb(key, rope, sequence_dim=1)
    return query, key, value


class LeapFluxAttnProcessor:
    """diffusers' FluxAttnProcessor (0.42) with the q/k path fused (projection + RMSNorm + RoPE,
    when ``fuse_qk``); attention still goes through ``dispatch_attention_fn`` with this processor's
    backend. ``leap_defer_out_projection=True`` (joint attention only) returns the attention output
    before ``to_out`` / ``to_add_out`` so the block can fuse them with its gated residual.

    FLUX.2's double-block ``Flux2AttnProcessor`` is the same computation on a module with the same
    attributes; ``projections`` is then FLUX.2's ``_get_qkv_projections`` (the unfused path)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, fuse_qk: bool = True, projections=None) -> None:
        self.fuse_qk = fuse_qk
        self.projections = projections

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        leap_defer_out_projection: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if self.fuse_qk and not attn.fused_projections:
            query, key, value = _fused_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        else:
            query, key, value = _diffusers_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb, self.projections)

        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            if leap_defer_out_projection:
                return hidden_states, encoder_hidden_states
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


