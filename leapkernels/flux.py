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
    * ``norm_out.forward`` (AdaLayerNormContinuous, chunks scale, shift) by `ada_layernorm_continuous`.
`revert_leapkernels` deletes the instance attributes and restores the processors, so the model
is the unpatched one again, bit for bit.

Cost of the memory saved (DESIGN §3: <= 0.5x eager's saved bytes): backward recomputes the q/k
projections and each gated projection's output (one extra forward-size matmul each) and GELU.

Projections are always *called* as modules (LoRA / hooks keep working) unless they are a plain
``nn.Linear`` with no hooks: only then is the weight read directly by a fused op. Any input the
fused ops cannot take (mixed dtypes, say from layerwise casting) runs the eager arithmetic.
Works under diffusers' gradient checkpointing (the patched forwards are deterministic).

The forwards are copies of diffusers' own, so they are right only for the diffusers releases
their parity tests (tests/kernels/test_flux_patch.py: patched vs unpatched outputs and every
gradient) were run against: `VERIFIED_DIFFUSERS`. Any other installed diffusers is refused
unless the caller opts in with ``allow_unverified_diffusers=True`` (then a warning).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn

from leapkernels.flux_attention import LeapFluxAttnProcessor
from leapkernels.fusions import (
    OPTIONS,
    VERIFIED_DIFFUSERS,
    UnverifiedDiffusersError,
    ada_continuous_forward,
    branch_out,
    check_ada_continuous,
    check_diffusers_version,
    gate,
    gelu_feed_forward_residual,
    mlp_residual,
    modulate,
    restore,
    swap_forward,
    swap_processor,
)

__all__ = [
    "FluxPatchOptions", "apply_leapkernels_to_flux", "revert_leapkernels", "is_patched", "patch_options",
    "check_diffusers_version", "VERIFIED_DIFFUSERS", "UnverifiedDiffusersError",
]


@dataclass(frozen=True)
class FluxPatchOptions:
    """Which fusions a patched Flux uses (all on by default)."""

    modulated_layernorm: bool = True
    gated_residual: bool = True
    qk_norm_rope: bool = True
    gelu: bool = True
    norm_out: bool = True
    whole_mlp: bool = False
    """The up projections join the MLP fusions (`gated_mlp`: only the block-side input is saved, the
    pre-activation is recomputed in backward). Off by default for FLUX.1 (the committed plan and
    memory results were measured without it); FLUX.2 and SD3 always do it."""


# ----------------------------------------------------------------------------- shared pieces
def _modulate(opts: FluxPatchOptions, norm: nn.LayerNorm, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return modulate(opts.modulated_layernorm, norm, x, scale, shift)


def _gate(opts: FluxPatchOptions, x: torch.Tensor, g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return gate(opts.gated_residual, x, g, y)


def _branch_out(opts: FluxPatchOptions, residual: torch.Tensor, g: torch.Tensor, x: torch.Tensor, linear: nn.Module, *,
                gelu: bool = False, **kwargs: Any) -> torch.Tensor:
    """``residual + g * linear(cat([prefix, gelu?(x)]))`` as fused as the switches allow (`fusions.branch_out`)."""
    return branch_out(opts.gated_residual, opts.gelu, residual, g, x, linear, act="gelu" if gelu else None, **kwargs)


def _feed_forward_residual(opts: FluxPatchOptions, ff: nn.Module, residual: torch.Tensor, g: torch.Tensor,
                           x: torch.Tensor) -> torch.Tensor:
    return gelu_feed_forward_residual(opts.gated_residual, opts.gelu, ff, residual, g, x, whole=opts.whole_mlp)


def _ada_zero(opts: FluxPatchOptions, norm: nn.Module, x: torch.Tensor, temb: torch.Tensor, chunks: int):
    """AdaLayerNormZero (6 chunks) / AdaLayerNormZeroSingle (3): shift, scale, gate, ..."""
    emb = norm.linear(norm.silu(temb))
    parts = emb.chunk(chunks, dim=1)
    shift_msa, scale_msa = parts[0], parts[1]
    return (_modulate(opts, norm.norm, x, scale_msa, shift_msa),) + parts[2:]


# ----------------------------------------------------------------------------- patched forwards
Rope = Optional[tuple[torch.Tensor, torch.Tensor]]  # diffusers' image_rotary_emb: (cos, sin)


def _double_block_forward(self: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                          temb: torch.Tensor, image_rotary_emb: Rope = None,
                          joint_attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' FluxTransformerBlock.forward (0.42), with the fused ops switched in."""
    opts: FluxPatchOptions = getattr(self, OPTIONS)
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


def _single_block_forward(self: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                          temb: torch.Tensor, image_rotary_emb: Rope = None,
                          joint_attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' FluxSingleTransformerBlock.forward (0.42), with the fused ops switched in."""
    opts: FluxPatchOptions = getattr(self, OPTIONS)
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = _ada_zero(opts, self.norm, hidden_states, temb, 3)
    mlp_pre_activation = None if opts.whole_mlp else self.proj_mlp(norm_hidden_states)
    joint_attention_kwargs = joint_attention_kwargs or {}
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **joint_attention_kwargs)
    if opts.whole_mlp:
        hidden_states = mlp_residual(opts.gated_residual, opts.gelu, residual, gate, norm_hidden_states, self.proj_mlp,
                                     self.proj_out, "gelu", prefix=attn_output)
    else:
        hidden_states = _branch_out(opts, residual, gate, mlp_pre_activation, self.proj_out, gelu=True, prefix=attn_output)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return encoder_hidden_states, hidden_states


# ----------------------------------------------------------------------------- apply / revert
def _check_flux(transformer: nn.Module) -> None:
    from diffusers.models.activations import GELU

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
    check_ada_continuous(transformer.norm_out, "norm_out")


def _blocks(transformer: nn.Module) -> list[nn.Module]:
    return list(getattr(transformer, "transformer_blocks", [])) + list(getattr(transformer, "single_transformer_blocks", []))


def is_patched(transformer: nn.Module) -> bool:
    """Whether `apply_leapkernels_to_flux` is in effect on ``transformer``."""
    return any(hasattr(b, OPTIONS) for b in _blocks(transformer))


def apply_leapkernels_to_flux(
    transformer: nn.Module,
    modulated_layernorm: bool = True,
    gated_residual: bool = True,
    qk_norm_rope: bool = True,
    gelu: bool = True,
    norm_out: bool = True,
    whole_mlp: bool = False,
    *,
    allow_unverified_diffusers: bool = False,
) -> FluxPatchOptions:
    """Patch a diffusers ``FluxTransformer2DModel`` in place with the fused ops; returns the options.

    Switches: ``modulated_layernorm`` (AdaLN-Zero and norm2 modulations), ``gated_residual``
    (the four gated adds per block), ``qk_norm_rope`` (attention processors), ``gelu`` (GELU and
    GELU + down projection), ``norm_out`` (final AdaLayerNormContinuous), ``whole_mlp`` (the up
    projections join the GELU fusions: `gated_mlp`, only their input saved; ~0.27x instead of
    ~0.42x of eager's saved bytes at 1,088 tokens in bf16). Patching a patched model replaces the
    previous options. Undo with `revert_leapkernels`.

    The diffusers installed must be one of `VERIFIED_DIFFUSERS` (raises `UnverifiedDiffusersError`
    otherwise); ``allow_unverified_diffusers=True`` patches any version, with a warning.
    """
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    check_diffusers_version(allow_unverified_diffusers)
    _check_flux(transformer)
    if is_patched(transformer):
        revert_leapkernels(transformer)
    opts = FluxPatchOptions(modulated_layernorm, gated_residual, qk_norm_rope, gelu, norm_out, whole_mlp)
    for block in transformer.transformer_blocks:
        swap_forward(block, _double_block_forward, opts)
    for block in transformer.single_transformer_blocks:
        swap_forward(block, _single_block_forward, opts)
    if qk_norm_rope or gated_residual:
        for block in _blocks(transformer):
            if type(block.attn.processor) is FluxAttnProcessor:  # IP-adapter and custom processors keep their own path
                swap_processor(block.attn, LeapFluxAttnProcessor(fuse_qk=qk_norm_rope))
    if norm_out:
        swap_forward(transformer.norm_out, ada_continuous_forward, opts)
    return opts


def revert_leapkernels(transformer: nn.Module) -> None:
    """Undo `apply_leapkernels_to_flux`: original forwards and processors, bit-identical outputs."""
    blocks = _blocks(transformer)
    restore(blocks + [b.attn for b in blocks] + [transformer.norm_out])


def patch_options(transformer: nn.Module) -> dict[str, bool] | None:
    """The switches in effect on a patched ``transformer`` (``None`` if unpatched)."""
    for block in _blocks(transformer):
        if hasattr(block, OPTIONS):
            return asdict(getattr(block, OPTIONS))
    return None
