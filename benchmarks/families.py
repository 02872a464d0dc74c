"""FLUX.2 and SD3 workloads for the suites (``--model-family flux2|sd3``): the same methods, batch,
seed and reward as FLUX.1's :func:`benchmarks.workload.build_workload`, on each family's tiny model.

The models are the ones the adapter tests build (:mod:`leapalign.adapters.tiny_configs`): FLUX.2
klein base (1 double + 1 single block, 2 heads x 16, true classifier-free guidance: every step one
batched ``[uncond; cond]`` forward) and SD3.5 (2 joint blocks with dual attention and RMS QK-norm,
2 heads x 8, patch 2, CFG), at 32x32 pixels -- 256 image tokens each (their VAEs do not down-sample)
-- with random prompt embeddings of the shapes their text paths give (16 text tokens; SD3: CLIP's
tokens first). LoRA, when asked, goes on the family's default targets, as the trainer puts it.
"""
from __future__ import annotations

from typing import Any

import torch

from benchmarks.workload import Workload, WorkloadConfig, benchmark_reward

__all__ = ["FAMILY_MODELS", "build_family_workload", "kernels_available", "random_conditioning"]

#: ``--model-family`` -> what its workload is (recorded in each result).
FAMILY_MODELS = {
    "flux2": "tiny FLUX.2 klein base (CFG 4.0), 32x32 px, 256 image + 16 text tokens",
    "sd3": "tiny SD3.5 (dual attention, QK RMSNorm, CFG 5.0), 32x32 px, 256 image + 16 text tokens",
}
SIZE = 32
TEXT_LEN = 16


def kernels_available(family: str) -> bool:
    """Whether leapkernels can patch this family's transformer (``apply_leapkernels`` dispatches on the class)."""
    import leapkernels

    from leapalign.adapters.families import family_named

    return family_named(family).transformer in leapkernels.supported_models()


def _model(family: str, dtype: torch.dtype, seed: int) -> Any:
    from leapalign.adapters import tiny_configs
    from leapalign.adapters.flux2 import Flux2VelocityModel
    from leapalign.adapters.sd3 import SD3VelocityModel

    if family == "flux2":
        return Flux2VelocityModel(tiny_configs.tiny_flux2_transformer("klein", dtype=dtype, seed=seed),
                                  vae=tiny_configs.tiny_flux2_vae(dtype=dtype, seed=seed + 1), height=SIZE, width=SIZE,
                                  guidance=4.0, cfg=True)
    if family == "sd3":
        return SD3VelocityModel(tiny_configs.tiny_sd3_transformer(dtype=dtype, seed=seed),
                                vae=tiny_configs.tiny_sd3_vae(dtype=dtype, seed=seed + 1), height=SIZE, width=SIZE,
                                guidance=5.0)
    raise ValueError(f"--model-family={family!r}: expected one of {sorted(FAMILY_MODELS)} (or flux, the default)")


def random_conditioning(model: Any, family: str, batch: int, generator: torch.Generator) -> Any:
    """Random prompt embeddings (and CFG negatives) of the family's shapes, in the model's dtype/device."""
    tcfg = model.transformer.config

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=generator.device).to(model.dtype)

    if family == "flux2":
        from leapalign.adapters.flux2 import Flux2Conditioning

        return Flux2Conditioning(draw(batch, TEXT_LEN, tcfg.joint_attention_dim), draw(batch, TEXT_LEN, tcfg.joint_attention_dim))
    from leapalign.adapters.sd3 import SD3Conditioning

    embeds, pooled = (batch, TEXT_LEN, tcfg.joint_attention_dim), (batch, tcfg.pooled_projection_dim)
    return SD3Conditioning(draw(*embeds), draw(*pooled), draw(*embeds), draw(*pooled))


def build_family_workload(config: WorkloadConfig, family: str, kernels: bool = False) -> Workload:
    """The family's tiny model, conditioning and the benchmark reward, built in the order of FLUX.1's
    workload: build (seeded) -> device -> LoRA -> leapkernels patch."""
    from peft import LoraConfig

    from leapalign.adapters.families import family_named, lora_target_modules
    from leapalign.dtypes import torch_dtype

    device = torch.device(config.device)
    model = _model(family, torch_dtype(config.dtype, "--dtype"), config.seed)
    model.transformer.to(device)
    model.vae.to(device)
    if config.lora_rank is not None:
        model.transformer.requires_grad_(False)
        targets = lora_target_modules(family_named(family), model.transformer)
        model.transformer.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank,
                                                 init_lora_weights="gaussian", target_modules=targets))
    if kernels:
        if not kernels_available(family):
            raise RuntimeError(f"leapkernels has no fused blocks for {type(model.transformer).__name__} yet")
        import leapkernels

        leapkernels.apply_leapkernels(model.transformer)
    gen = torch.Generator(device=device).manual_seed(config.seed + 1000)
    cond = random_conditioning(model, family, config.batch_size, gen)
    info = {
        "model_family": family,
        "model_description": FAMILY_MODELS[family],
        "transformer_params": sum(p.numel() for p in model.transformer.parameters()),
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        "image_tokens": model.seq_len,
        "text_tokens": TEXT_LEN,
        "image_size": f"{model.height}x{model.width}",
        "cfg": bool(model.do_cfg),
        "vae": True,
    }
    prompts = [f"benchmark prompt {i}" for i in range(config.batch_size)]
    return Workload(model, cond, prompts, benchmark_reward, config, kernels, info)
