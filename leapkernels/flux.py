"""Swap the fused ops into a diffusers ``FluxTransformer2DModel``, and undo it exactly.

`apply_leapkernels_to_flux` replaces, per instance (never per class):
    * each ``FluxTransformerBlock.forward`` and ``FluxSingleTransformerBlock.forward`` by a copy
      of diffusers' own that calls the fused ops (modulated LayerNorm, gated residual, GELU +
      down projection) where its switches say so and diffusers' eager arithmetic elsewhere;
    * each block's attention processor (plain ``FluxAttnProcessor`` only) by one whose q/k path is
      the fused RMSNorm + RoPE; attention itself still goes through diffusers'
      ``dispatch_attention_fn`` with the processor's backend;
    * ``norm_out.forward`` (AdaLayerNormContinuous) by the fused modulated LayerNorm.
`revert_leapkernels` deletes the instance attributes and restores the processors, so the model
is the unpatched one again, bit for bit.

Projections are always *called* as modules (LoRA / hooks keep working); the one place a weight
is read directly is the GELU + down projection fusion, and only when that Linear is a plain
``nn.Linear`` with no hooks; otherwise GELU alone is fused and the module is called. Any input
the fused ops cannot take (mixed dtypes, say from layerwise casting) runs the eager arithmetic.
Works under diffusers' gradient checkpointing (the patched forwards are deterministic).
"""
from __future__ import annotations

import types
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leapkernels.ops.gated_residual import gated_residual
from leapkernels.ops.gelu import gelu_linear, gelu_tanh
from leapkernels.ops.modulated_layernorm import modulated_layernorm
from leapkernels.ops.qk_norm_rope import qk_norm_rope

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


def _gelu_then(opts: FluxPatchOptions, h: torch.Tensor, down: nn.Module, prefix: torch.Tensor | None = None,
               dropout: nn.Module | None = None) -> torch.Tensor:
    """``down(cat([prefix, dropout(gelu(h))]))`` with as much fused as the modules allow."""
    inactive_dropout = dropout is None or not dropout.training or dropout.p == 0
    fusable = prefix is None or _same(prefix, h)
    if opts.gelu and _plain_linear(down) and inactive_dropout and fusable and _same(h, down.weight):
        return gelu_linear(h, down.weight, down.bias, prefix)
    a = gelu_tanh(h) if opts.gelu else F.gelu(h, approximate="tanh")
    if dropout is not None:
        a = dropout(a)
    if prefix is not None:
        a = torch.cat([prefix, a], dim=-1)
    return down(a)


def _feed_forward(opts: FluxPatchOptions, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers ``FeedForward(activation_fn="gelu-approximate")``: net = [GELU(proj), Dropout, Linear, ...]."""
    net = ff.net
    out = _gelu_then(opts, net[0].proj(x), net[2], dropout=net[1])
    for module in net[3:]:
        out = module(out)
    return out


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
    joint_attention_kwargs = joint_attention_kwargs or {}
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

    hidden_states = _gate(opts, hidden_states, gate_msa, attn_output)
    norm_hidden_states = _modulate(opts, self.norm2, hidden_states, scale_mlp, shift_mlp)
    ff_output = _feed_forward(opts, self.ff, norm_hidden_states)
    hidden_states = _gate(opts, hidden_states, gate_mlp, ff_output)
    if len(attention_outputs) == 3:
        hidden_states = hidden_states + ip_attn_output

    encoder_hidden_states = _gate(opts, encoder_hidden_states, c_gate_msa, context_attn_output)
    norm_encoder_hidden_states = _modulate(opts, self.norm2_context, encoder_hidden_states, c_scale_mlp, c_shift_mlp)
    context_ff_output = _feed_forward(opts, self.ff_context, norm_encoder_hidden_states)
    encoder_hidden_states = _gate(opts, encoder_hidden_states, c_gate_mlp, context_ff_output)
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
    projected = _gelu_then(opts, mlp_pre_activation, self.proj_out, prefix=attn_output)
    hidden_states = _gate(opts, residual, gate, projected)
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
def _norm_rope(norm: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, rows: slice) -> torch.Tensor:
    """``apply_rotary_emb(norm(x), rope[rows])`` fused (RMSNorm + interleaved RoPE)."""
    from diffusers.models.embeddings import apply_rotary_emb

    weight = norm.weight if norm.weight is not None else torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    cos, sin = (rope[0][rows], rope[1][rows]) if rope is not None else (None, None)
    if _same(x, weight) and (cos is None or (cos.device == x.device and cos.shape[0] == x.shape[1])):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return qk_norm_rope(x, weight, cos, sin, eps)
    x = norm(x)
    return apply_rotary_emb(x, (cos, sin), sequence_dim=1) if cos is not None else x


class LeapFluxAttnProcessor:
    """diffusers' FluxAttnProcessor (0.42) with q/k RMSNorm + RoPE fused; attention dispatch unchanged."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        joint = attn.added_kv_proj_dim is not None and isinstance(encoder_query, torch.Tensor)
        if joint:
            txt = encoder_query.shape[1]
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([_norm_rope(attn.norm_added_q, encoder_query, image_rotary_emb, slice(0, txt)),
                               _norm_rope(attn.norm_q, query, image_rotary_emb, slice(txt, None))], dim=1)
            key = torch.cat([_norm_rope(attn.norm_added_k, encoder_key, image_rotary_emb, slice(0, txt)),
                             _norm_rope(attn.norm_k, key, image_rotary_emb, slice(txt, None))], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        else:
            query = _norm_rope(attn.norm_q, query, image_rotary_emb, slice(None))
            key = _norm_rope(attn.norm_k, key, image_rotary_emb, slice(None))

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
    if qk_norm_rope:
        for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
            original = block.attn.processor
            if type(original) is not FluxAttnProcessor:
                continue  # IP-adapter and custom processors keep their own q/k path
            processor = LeapFluxAttnProcessor()
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
