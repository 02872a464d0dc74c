"""Swap the fused ops into a diffusers ``FluxTransformer2DModel``, and undo it exactly.

`apply_leapkernels_to_flux` replaces, per instance (never per class):
    * each ``FluxTransformerBlock.forward`` and ``FluxSingleTransformerBlock.forward`` by a copy
      of diffusers' 0.42 code that calls the fused ops where its switches say so and diffusers'
      eager arithmetic elsewhere: modulated LayerNorm for every AdaLN(-Zero) and ``norm2``;
      `gated_linear` for every branch closing ``residual + gate * proj(...)`` (attention
      ``to_out``/``to_add_out``, the FeedForward down projections with their GELU, the single
      blocks' ``proj_out`` over ``cat([attention, gelu(mlp)])``), saving neither GELU's output
      nor the projection's;
    * each block's attention processor (plain ``FluxAttnProcessor`` only) by
      `LeapFluxAttnProcessor`: q/k projection + RMSNorm + RoPE in one Function that recomputes
      the projection in backward; attention itself still goes through diffusers'
      ``dispatch_attention_fn`` with the processor's backend;
    * ``norm_out.forward`` (AdaLayerNormContinuous, chunks scale, shift) by the modulated LayerNorm.
`revert_leapkernels` deletes the instance attributes and restores the processors, so the model
is the unpatched one again, bit for bit.

Cost of the memory saved (DESIGN §3: <= 0.5x eager's saved bytes): backward recomputes the q/k
projections and each gated projection's output (one extra forward-size matmul each) and GELU.

Projections are always *called* as modules (LoRA / hooks keep working) unless they are a plain
``nn.Linear`` with no hooks: only then is the weight read directly by a fused op. Any input the
fused ops cannot take (mixed dtypes, say from layerwise casting) runs the eager arithmetic.
Works under diffusers' gradient checkpointing (the patched forwards are deterministic).
"""
from __future__ import annotations

import types
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leapkernels.ops.gated_linear import gated_linear
from leapkernels.ops.gated_residual import gated_residual
from leapkernels.ops.gelu import gelu_linear, gelu_tanh
from leapkernels.ops.modulated_layernorm import modulated_layernorm
from leapkernels.ops.qk_norm_rope import linear_qk_norm_rope, qk_norm_rope

_OPTIONS = "_leapkernels_options"
_ORIGINAL_PROCESSOR = "_leapkernels_original_processor"


@dataclass(frozen=True)
class FluxPatchOptions:
    """Which fusions a patched Flux uses (all on by default)."""

    modulated_layernorm: bool = True
    gated_residual: bool = True
    qk_norm_rope: bool = True
    gelu: bool = True
    norm_out: bool = True


# ----------------------------------------------------------------------------- shared pieces
def _same(*tensors: torch.Tensor) -> bool:
    """Whether the fused ops can take these tensors together (one dtype, one device)."""
    return all(t.dtype == tensors[0].dtype and t.device == tensors[0].device for t in tensors[1:])


def _modulate(opts: FluxPatchOptions, norm: nn.LayerNorm, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    if opts.modulated_layernorm and _same(x, scale, shift):
        return modulated_layernorm(x, scale, shift, norm.eps)
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


def _gate(opts: FluxPatchOptions, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if opts.gated_residual and _same(x, gate, y) and x.shape == y.shape:
        return gated_residual(x, gate, y)
    return x + gate.unsqueeze(1) * y


def _plain_linear(module: nn.Module) -> bool:
    """A bare ``nn.Linear`` whose weight may be read directly (no LoRA wrapper, no hooks)."""
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in module.__dict__
    )


def _inactive(dropout: nn.Module | None) -> bool:
    return dropout is None or not dropout.training or dropout.p == 0


def _branch_out(
    opts: FluxPatchOptions,
    residual: torch.Tensor,
    gate: torch.Tensor,
    x: torch.Tensor,
    linear: nn.Module,
    *,
    gelu: bool = False,
    prefix: torch.Tensor | None = None,
    dropout: nn.Module | None = None,
    dropout_after: nn.Module | None = None,
) -> torch.Tensor:
    """``residual + gate * dropout_after(linear(cat([prefix, dropout(gelu?(x))])))``, as fused as allowed.

    Plain Linear + gated_residual on: one `gated_linear` (saves neither GELU's output nor the
    projection's). Otherwise `gelu_linear` (GELU + projection), else module calls; then the gate.
    """
    operands = (x, linear.weight) + ((prefix,) if prefix is not None else ())
    fusable = _plain_linear(linear) and _inactive(dropout) and _inactive(dropout_after) and _same(*operands)
    if opts.gated_residual and fusable and _same(residual, gate, x) and residual.shape[:2] == x.shape[:2]:
        if gelu and not opts.gelu:
            x, gelu = F.gelu(x, approximate="tanh"), False
        return gated_linear(residual, gate, x, linear.weight, linear.bias, prefix, gelu)
    if gelu and opts.gelu and fusable:
        y = gelu_linear(x, linear.weight, linear.bias, prefix)
    else:
        a = (gelu_tanh(x) if opts.gelu else F.gelu(x, approximate="tanh")) if gelu else x
        if dropout is not None:
            a = dropout(a)
        if prefix is not None:
            a = torch.cat([prefix, a], dim=-1)
        y = linear(a.contiguous())
        if dropout_after is not None:
            y = dropout_after(y)
    return _gate(opts, residual, gate, y)


def _feed_forward_residual(opts: FluxPatchOptions, ff: nn.Module, residual: torch.Tensor, gate: torch.Tensor,
                           x: torch.Tensor) -> torch.Tensor:
    """``residual + gate * FeedForward(x)`` for diffusers' tanh-GELU FeedForward
    (net = [GELU(proj), Dropout, Linear] + optional extras, which are then called as modules)."""
    net = ff.net
    h = net[0].proj(x)
    if len(net) == 3:
        return _branch_out(opts, residual, gate, h, net[2], gelu=True, dropout=net[1])
    a = gelu_tanh(h) if opts.gelu else F.gelu(h, approximate="tanh")
    out = net[2](net[1](a))
    for module in net[3:]:
        out = module(out)
    return _gate(opts, residual, gate, out)


def _ada_zero(opts: FluxPatchOptions, norm: nn.Module, x: torch.Tensor, temb: torch.Tensor, chunks: int):
    """AdaLayerNormZero (6 chunks) / AdaLayerNormZeroSingle (3): shift, scale, gate, ..."""
    emb = norm.linear(norm.silu(temb))
    parts = emb.chunk(chunks, dim=1)
    shift_msa, scale_msa = parts[0], parts[1]
    return (_modulate(opts, norm.norm, x, scale_msa, shift_msa),) + parts[2:]


# ----------------------------------------------------------------------------- patched forwards
def _double_block_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' FluxTransformerBlock.forward (0.42), with the fused ops switched in."""
    opts: FluxPatchOptions = getattr(self, _OPTIONS)
    norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_zero(opts, self.norm1, hidden_states, temb, 6)
    norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _ada_zero(
        opts, self.norm1_context, encoder_hidden_states, temb, 6
    )
    joint_attention_kwargs = dict(joint_attention_kwargs or {})
    defer = opts.gated_residual and isinstance(self.attn.processor, LeapFluxAttnProcessor)
    if defer:  # the processor returns the attention before to_out / to_add_out: fused below
        joint_attention_kwargs["leap_defer_out_projection"] = True
    attention_outputs = self.attn(
        hidden_states=norm_hidden_states,
        encoder_hidden_states=norm_encoder_hidden_states,
        image_rotary_emb=image_rotary_emb,
        **joint_attention_kwargs,
    )
    if len(attention_outputs) == 2:
        attn_output, context_attn_output = attention_outputs
    elif len(attention_outputs) == 3:
        attn_output, context_attn_output, ip_attn_output = attention_outputs

    if defer:
        hidden_states = _branch_out(opts, hidden_states, gate_msa, attn_output, self.attn.to_out[0],
                                    dropout_after=self.attn.to_out[1])
    else:
        hidden_states = _gate(opts, hidden_states, gate_msa, attn_output)
    norm_hidden_states = _modulate(opts, self.norm2, hidden_states, scale_mlp, shift_mlp)
    hidden_states = _feed_forward_residual(opts, self.ff, hidden_states, gate_mlp, norm_hidden_states)
    if len(attention_outputs) == 3:
        hidden_states = hidden_states + ip_attn_output

    if defer:
        encoder_hidden_states = _branch_out(opts, encoder_hidden_states, c_gate_msa, context_attn_output,
                                            self.attn.to_add_out)
    else:
        encoder_hidden_states = _gate(opts, encoder_hidden_states, c_gate_msa, context_attn_output)
    norm_encoder_hidden_states = _modulate(opts, self.norm2_context, encoder_hidden_states, c_scale_mlp, c_shift_mlp)
    encoder_hidden_states = _feed_forward_residual(
        opts, self.ff_context, encoder_hidden_states, c_gate_mlp, norm_encoder_hidden_states
    )
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _single_block_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' FluxSingleTransformerBlock.forward (0.42), with the fused ops switched in."""
    opts: FluxPatchOptions = getattr(self, _OPTIONS)
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = _ada_zero(opts, self.norm, hidden_states, temb, 3)
    mlp_pre_activation = self.proj_mlp(norm_hidden_states)
    joint_attention_kwargs = joint_attention_kwargs or {}
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **joint_attention_kwargs)
    hidden_states = _branch_out(opts, residual, gate, mlp_pre_activation, self.proj_out, gelu=True, prefix=attn_output)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return encoder_hidden_states, hidden_states


def _norm_out_forward(self: nn.Module, x: torch.Tensor, conditioning_embedding: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous.forward: chunk order (scale, shift)."""
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    if _same(x, scale, shift):
        return modulated_layernorm(x, scale, shift, self.norm.eps)
    return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


# ----------------------------------------------------------------------------- attention processor
def _rope_rows(rope: tuple[torch.Tensor, torch.Tensor] | None, rows: slice):
    return (rope[0][rows], rope[1][rows]) if rope is not None else (None, None)


def _norm_rope(norm: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, rows: slice) -> torch.Tensor:
    """``apply_rotary_emb(norm(x), rope[rows])`` fused (RMSNorm + interleaved RoPE)."""
    from diffusers.models.embeddings import apply_rotary_emb

    weight = norm.weight if norm.weight is not None else torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    cos, sin = _rope_rows(rope, rows)
    if _same(x, weight) and (cos is None or (cos.device == x.device and cos.shape[0] == x.shape[1])):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return qk_norm_rope(x, weight, cos, sin, eps)
    x = norm(x)
    return apply_rotary_emb(x, (cos, sin), sequence_dim=1) if cos is not None else x


def _project_norm_rope(proj: nn.Module, norm: nn.Module, x: torch.Tensor, head_dim: int,
                       rope: tuple[torch.Tensor, torch.Tensor] | None, rows: slice) -> torch.Tensor:
    """``apply_rotary_emb(norm(proj(x) as heads), rope[rows])``; plain Linear: the projection is
    recomputed in backward instead of saved (`linear_qk_norm_rope`)."""
    cos, sin = _rope_rows(rope, rows)
    weight = norm.weight
    if (_plain_linear(proj) and weight is not None and _same(x, proj.weight, weight)
            and (cos is None or (cos.device == x.device and cos.shape[0] == x.shape[1]))):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return linear_qk_norm_rope(x, proj.weight, proj.bias, weight, cos, sin, eps, head_dim)
    return _norm_rope(norm, proj(x).unflatten(-1, (-1, head_dim)), rope, rows)


class LeapFluxAttnProcessor:
    """diffusers' FluxAttnProcessor (0.42) with the q/k path fused (projection + RMSNorm + RoPE,
    when ``fuse_qk``); attention still goes through ``dispatch_attention_fn`` with this processor's
    backend. ``leap_defer_out_projection=True`` (joint attention only) returns the attention output
    before ``to_out`` / ``to_add_out`` so the block can fuse them with its gated residual."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, fuse_qk: bool = True) -> None:
        self.fuse_qk = fuse_qk

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
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        hd = attn.head_dim
        joint = attn.added_kv_proj_dim is not None and encoder_hidden_states is not None
        txt = encoder_hidden_states.shape[1] if joint else 0
        img_rows, txt_rows = slice(txt, None), slice(0, txt)
        if self.fuse_qk and not attn.fused_projections:
            value = attn.to_v(hidden_states).unflatten(-1, (-1, hd))
            query = _project_norm_rope(attn.to_q, attn.norm_q, hidden_states, hd, image_rotary_emb, img_rows)
            key = _project_norm_rope(attn.to_k, attn.norm_k, hidden_states, hd, image_rotary_emb, img_rows)
            if joint:
                e = encoder_hidden_states
                query = torch.cat([_project_norm_rope(attn.add_q_proj, attn.norm_added_q, e, hd, image_rotary_emb, txt_rows), query], dim=1)
                key = torch.cat([_project_norm_rope(attn.add_k_proj, attn.norm_added_k, e, hd, image_rotary_emb, txt_rows), key], dim=1)
                value = torch.cat([attn.add_v_proj(e).unflatten(-1, (-1, hd)), value], dim=1)
        else:  # diffusers' own q/k path
            query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
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
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

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


# ----------------------------------------------------------------------------- apply / revert
def _check_flux(transformer: nn.Module) -> None:
    from diffusers.models.activations import GELU
    from diffusers.models.normalization import AdaLayerNormContinuous

    for name in ("transformer_blocks", "single_transformer_blocks", "norm_out"):
        if not hasattr(transformer, name):
            raise TypeError(
                f"transformer must be a diffusers FluxTransformer2DModel (no attribute {name!r}); "
                f"got {type(transformer).__name__}"
            )
    for i, block in enumerate(transformer.transformer_blocks):
        for ff_name in ("ff", "ff_context"):
            net = getattr(block, ff_name).net
            if not (isinstance(net[0], GELU) and net[0].approximate == "tanh" and len(net) >= 3):
                raise NotImplementedError(f"transformer_blocks.{i}.{ff_name} is not a tanh-GELU FeedForward")
        for norm_name in ("norm1", "norm1_context"):
            norm = getattr(block, norm_name)
            if norm.emb is not None or not isinstance(norm.norm, nn.LayerNorm) or norm.norm.weight is not None:
                raise NotImplementedError(f"transformer_blocks.{i}.{norm_name} is not an affine-free LayerNorm AdaLN-Zero")
    for i, block in enumerate(transformer.single_transformer_blocks):
        if not (isinstance(block.act_mlp, nn.GELU) and block.act_mlp.approximate == "tanh"):
            raise NotImplementedError(f"single_transformer_blocks.{i}.act_mlp is not a tanh GELU")
        if not isinstance(block.norm.norm, nn.LayerNorm) or block.norm.norm.weight is not None:
            raise NotImplementedError(f"single_transformer_blocks.{i}.norm is not an affine-free LayerNorm AdaLN-Zero")
    norm_out = transformer.norm_out
    if not isinstance(norm_out, AdaLayerNormContinuous) or not isinstance(norm_out.norm, nn.LayerNorm) \
            or norm_out.norm.weight is not None:
        raise NotImplementedError("norm_out is not an affine-free LayerNorm AdaLayerNormContinuous")


def is_patched(transformer: nn.Module) -> bool:
    """Whether `apply_leapkernels_to_flux` is in effect on ``transformer``."""
    blocks = list(getattr(transformer, "transformer_blocks", [])) + list(getattr(transformer, "single_transformer_blocks", []))
    return any(hasattr(b, _OPTIONS) for b in blocks)


def apply_leapkernels_to_flux(
    transformer: nn.Module,
    modulated_layernorm: bool = True,
    gated_residual: bool = True,
    qk_norm_rope: bool = True,
    gelu: bool = True,
    norm_out: bool = True,
) -> FluxPatchOptions:
    """Patch a diffusers ``FluxTransformer2DModel`` in place with the fused ops; returns the options.

    Switches: ``modulated_layernorm`` (AdaLN-Zero and norm2 modulations), ``gated_residual``
    (the four gated adds per block), ``qk_norm_rope`` (attention processors), ``gelu`` (GELU and
    GELU + down projection), ``norm_out`` (final AdaLayerNormContinuous). Patching a patched model
    replaces the previous options. Undo with `revert_leapkernels`.
    """
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    _check_flux(transformer)
    if is_patched(transformer):
        revert_leapkernels(transformer)
    opts = FluxPatchOptions(modulated_layernorm, gated_residual, qk_norm_rope, gelu, norm_out)
    for block in transformer.transformer_blocks:
        setattr(block, _OPTIONS, opts)
        block.forward = types.MethodType(_double_block_forward, block)
    for block in transformer.single_transformer_blocks:
        setattr(block, _OPTIONS, opts)
        block.forward = types.MethodType(_single_block_forward, block)
    if qk_norm_rope or gated_residual:
        for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
            original = block.attn.processor
            if type(original) is not FluxAttnProcessor:
                continue  # IP-adapter and custom processors keep their own q/k path
            processor = LeapFluxAttnProcessor(fuse_qk=qk_norm_rope)
            processor._attention_backend = original._attention_backend
            processor._parallel_config = original._parallel_config
            setattr(block.attn, _ORIGINAL_PROCESSOR, original)
            block.attn.processor = processor
    if norm_out:
        setattr(transformer.norm_out, _OPTIONS, opts)
        transformer.norm_out.forward = types.MethodType(_norm_out_forward, transformer.norm_out)
    return opts


def revert_leapkernels(transformer: nn.Module) -> None:
    """Undo `apply_leapkernels_to_flux`: original forwards and processors, bit-identical outputs."""
    modules = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks) + [transformer.norm_out]
    for module in modules:
        if hasattr(module, _OPTIONS):
            delattr(module, _OPTIONS)
            module.__dict__.pop("forward", None)
        attn = getattr(module, "attn", None)
        if attn is not None and hasattr(attn, _ORIGINAL_PROCESSOR):
            attn.processor = getattr(attn, _ORIGINAL_PROCESSOR)
            delattr(attn, _ORIGINAL_PROCESSOR)


def patch_options(transformer: nn.Module) -> dict[str, bool] | None:
    """The switches in effect on a patched ``transformer`` (``None`` if unpatched)."""
    for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
        if hasattr(block, _OPTIONS):
            return asdict(getattr(block, _OPTIONS))
    return None
