"""Sampling: the Euler ODE sampler over any VelocityModel, PNG grids, and ``leapalign sample``.

``leapalign sample --model_path MODEL_DIR --checkpoint OUT/checkpoints/step-00000300 --prompt "..."``
loads the pipeline of the folder's family (FLUX.1, FLUX.2, SD3: its ``model_index.json``), applies
the checkpoint's LoRA (``load_lora_weights``) or full transformer weights, and writes one PNG grid.
Guidance and prompt length default to the family's pipeline defaults.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from leapalign.flow import euler_step

__all__ = ["euler_sample", "save_image_grid", "image_grid", "main"]


@torch.no_grad()
def euler_sample(model: Any, cond: Any, batch_size: int, num_steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1]: Euler from ``model.noise`` over ``model.sigmas(num_steps)``."""
    x = model.noise(batch_size, generator)
    sigmas = model.sigmas(num_steps).to(x.device)
    for i in range(num_steps):
        v = model.velocity(x, sigmas[i].to(torch.float32), cond)
        x = euler_step(x, v.to(x.dtype), sigmas[i].item(), sigmas[i + 1].item())
    return model.decode(x).float().clamp(0, 1)


def image_grid(images: torch.Tensor, ncols: int | None = None) -> torch.Tensor:
    """``[B, C, H, W]`` -> one ``[3, rows*H, cols*W]`` image (1-channel images are greyscale)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if c == 1:
        images = images.expand(b, 3, h, w)
    elif c != 3:
        images = images[:, :3] if c > 3 else torch.cat([images, images[:, :1].expand(b, 3 - c, h, w)], 1)
    ncols = ncols or max(1, math.ceil(b**0.5))
    rows = -(-b // ncols)
    grid = images.new_zeros(3, rows * h, ncols * w)
    for i in range(b):
        r, col = divmod(i, ncols)
        grid[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = images[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, ncols: int | None = None) -> Path:
    """Save images in [0, 1] as one PNG grid (parent directories are created)."""
    from PIL import Image

    grid = image_grid(images.detach().float().cpu().clamp(0, 1), ncols)
    arr = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leapalign sample",
                                description="Sample images from a base FLUX.1 / FLUX.2 / SD3 model or a leapalign checkpoint.")
    p.add_argument("--model_path", required=True, help="local diffusers pipeline directory (FLUX.1, FLUX.2 or SD3)")
    p.add_argument("--checkpoint", default=None, help="a leapalign checkpoint directory (lora/ or transformer/ inside)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompt_file", default=None, help=".txt/.json/.jsonl prompt file")
    p.add_argument("--output", required=True, help="PNG file to write")
    p.add_argument("--num_steps", type=int, default=28)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the family's pipeline default: FLUX.1 3.5, FLUX.2 4, SD3 7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max_sequence_length", type=int, default=None,
                   help="prompt tokens (default: the family's pipeline default: 512, SD3 256)")
    p.add_argument("--compile", default="off", choices=("off", "default", "max-autotune"),
                   help="torch.compile the transformer's forward (leapalign.rollout_engine): tens of seconds once, "
                        "then faster steps; pays back over many images")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from leapalign.dtypes import torch_dtype
    from leapalign.prompts import load_prompts

    args = build_parser().parse_args(argv)
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += load_prompts(args.prompt_file)
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompt_file FILE")
    if not args.output.lower().endswith(".png"):
        raise ValueError(f"--output must be a .png file, got {args.output!r}")
    if args.num_steps < 1:
        raise ValueError(f"--num_steps must be >= 1, got {args.num_steps}")
    device = _resolve_device(args.device)
    from leapalign.adapters.families import UnsupportedModelError, read_model_folder

    model_path = Path(args.model_path)
    if not (model_path / "model_index.json").is_file():
        raise FileNotFoundError(f"--model_path={args.model_path!r} is not a diffusers pipeline directory (no model_index.json)")
    try:
        folder = read_model_folder(model_path)
    except UnsupportedModelError as exc:
        raise ValueError(f"--model_path={args.model_path!r}: {exc}") from None
    ckpt = _checkpoint_weights(args.checkpoint) if args.checkpoint else None
    pipe = _load_pipeline(folder, ckpt, torch_dtype(args.dtype)).to(device)
    family = folder.family
    guidance = family.guidance if args.guidance is None else args.guidance
    length = family.max_sequence_length if args.max_sequence_length is None else args.max_sequence_length
    model, cond = _model_and_cond(pipe, family.name, prompts, args.height, args.width, guidance, length, device)
    if args.compile != "off":
        from leapalign.rollout_engine import RolloutEngineConfig, wrap_rollout

        model = wrap_rollout(model, RolloutEngineConfig(compile=args.compile))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    images = euler_sample(model, cond, len(prompts), args.num_steps, gen)
    path = save_image_grid(images, args.output)
    print(f"wrote {path} ({len(prompts)} image(s))", file=sys.stderr)
    return 0


def _load_pipeline(folder: Any, ckpt: Path | None, dtype: torch.dtype) -> Any:
    """The folder's pipeline class, with the checkpoint's LoRA or full transformer weights applied."""
    import diffusers

    pipe = getattr(diffusers, folder.pipeline).from_pretrained(str(folder.path), torch_dtype=dtype)
    if ckpt is not None and ckpt.parent.name == "lora":
        pipe.load_lora_weights(str(ckpt.parent), weight_name=ckpt.name, use_safetensors=True)
    elif ckpt is not None:
        transformer_class = getattr(diffusers, folder.family.transformer)
        pipe.transformer = transformer_class.from_pretrained(str(ckpt.parent), torch_dtype=dtype, use_safetensors=True)
    return pipe


def _model_and_cond(pipe: Any, family: str, prompts: list[str], height: int, width: int, guidance: float,
                    max_sequence_length: int, device: torch.device) -> tuple[Any, Any]:
    """The family's adapter and the prompts' conditioning through the pipeline's own text path."""
    from leapalign.adapters import velocity_model_from_pipeline

    if family == "flux":
        from leapalign.prompts import FluxPromptEncoder

        cond = FluxPromptEncoder(pipe, max_sequence_length=max_sequence_length, device=device).encode(prompts)
        return velocity_model_from_pipeline(pipe, height=height, width=width, guidance=guidance), cond
    model = velocity_model_from_pipeline(pipe, height=height, width=width, guidance=guidance,
                                         max_sequence_length=max_sequence_length)
    return model, model.encode_prompts(prompts)


def _checkpoint_weights(checkpoint: str) -> Path:
    """The safetensors file a checkpoint's deliverable lives in: ``lora/pytorch_lora_weights.safetensors``
    or ``transformer/diffusion_pytorch_model.safetensors``. Only safetensors are read (pickled
    ``.bin``/``.pt`` files could run code when loaded); anything else is refused by name."""
    ckpt = Path(checkpoint)
    lora, full = ckpt / "lora" / "pytorch_lora_weights.safetensors", ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = lora if lora.parent.is_dir() else full
    if not weights.parent.is_dir():
        raise FileNotFoundError(f"--checkpoint={checkpoint!r} holds neither lora/ nor transformer/")
    if not weights.is_file():
        raise FileNotFoundError(
            f"--checkpoint={checkpoint!r}: {weights.parent.name}/ has no {weights.name}; only safetensors weights "
            "are read (pickled .bin/.pt files could run code when loaded)")
    return weights


def _resolve_device(name: str) -> torch.device:
    import re

    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", name):
        raise ValueError(f"--device={name!r} is not supported; expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={name!r} but torch.cuda.is_available() is False")
    return torch.device(name)
