"""CLIP score and PickScore through transformers' ``CLIPModel`` loaded from a local directory.

Both are ``scale * cos(image_embed, text_embed)``; they differ only in the checkpoint and the
default scale: CLIP score uses ``scale=1`` (cosine similarity), PickScore uses the model's own
``logit_scale.exp()`` (the official scoring, ~20 for typical images). Text embeddings are computed
once per prompt and cached (no gradient flows to the text side). Images are preprocessed in torch
(:func:`clip_preprocess`), so the reward is differentiable end to end.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from leapalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess

__all__ = ["ContrastiveReward", "CLIPReward", "clip_score", "pick_score"]


class ContrastiveReward(torch.nn.Module):
    """``scale * cos(image features, text features)`` from a frozen two-tower model in ``self.model``.

    What CLIP score, PickScore and HPSv2.1 share: torch preprocessing (differentiable), unit-norm
    features, text features cached per prompt without gradient. Subclasses set ``model``,
    ``image_size`` (and ``mean``/``std``/``scale`` where they differ from OpenAI CLIP's and 1) and
    write the two towers, :meth:`image_features` and :meth:`text_features`.
    """

    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    scale: float = 1.0
    image_size: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[B, D]``, computed once per distinct prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            feats = self.text_features(missing)
            feats = feats / feats.norm(dim=-1, keepdim=True)
            for p, f in zip(missing, feats):
                self._text_cache[p] = f
        return torch.stack([self._text_cache[p] for p in prompts])

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        pixels = clip_preprocess(images.to(self.device), self.image_size, self.mean, self.std, dtype=dtype)
        img = self.image_features(pixels).float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = self.text_embeddings(prompts).float()
        return self.scale * (img * txt).sum(-1)


class CLIPReward(ContrastiveReward):
    """``(images [B,3,H,W] in [0,1], prompts) -> [B]`` scores from a frozen ``CLIPModel``.

    Args:
        path: local directory holding the ``CLIPModel`` (config.json + weights).
        tokenizer_path: where the tokenizer lives (PickScore ships its processor separately);
            defaults to ``path``.
        scale: multiply the cosine by this; ``"logit_scale"`` uses the model's learned temperature.
        dtype / device: where the reward model runs.
        gradient_checkpointing: checkpoint the vision tower's layers (saves activation memory).
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer_path: str | Path | None = None,
        scale: float | str = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"reward model path={str(path)!r} is not a directory (expected a local CLIPModel)")
        tok_path = Path(tokenizer_path) if tokenizer_path is not None else path
        if not tok_path.is_dir():
            raise FileNotFoundError(f"tokenizer_path={str(tok_path)!r} is not a directory")
        self.model = CLIPModel.from_pretrained(str(path), dtype=dtype).eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.train()  # transformers only checkpoints in train mode; CLIP has no dropout at p=0
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok_path))
        self.image_size = int(self.model.config.vision_config.image_size)
        self.mean, self.std = _processor_stats(tok_path, path)
        if isinstance(scale, str):
            if scale != "logit_scale":
                raise ValueError(f"scale must be a number or 'logit_scale', got {scale!r}")
            self.scale = float(self.model.logit_scale.exp())
        else:
            self.scale = float(scale)
        self._text_cache: dict[str, torch.Tensor] = {}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(pixel_values=pixels))

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        feats = self.model.get_text_features(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
        )
        return _as_tensor(feats)


def clip_score(path: str | Path, **kwargs) -> CLIPReward:
    """CLIP score: cosine similarity between image and prompt (``scale`` 1 unless given)."""
    return CLIPReward(path, **kwargs)


def pick_score(path: str | Path, **kwargs) -> CLIPReward:
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos`` from the PickScore_v1 CLIPModel."""
    kwargs.setdefault("scale", "logit_scale")
    return CLIPReward(path, **kwargs)


def _as_tensor(out) -> torch.Tensor:
    """transformers 5 may return a ModelOutput from ``get_*_features``; take its pooled embedding."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise TypeError(f"unexpected CLIP features output {type(out).__name__}")


def _processor_stats(*dirs: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std from a ``preprocessor_config.json`` if one exists, else OpenAI CLIP's."""
    for d in dirs:
        cfg = d / "preprocessor_config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            if "image_mean" in data and "image_std" in data:
                return tuple(data["image_mean"]), tuple(data["image_std"])
    return CLIP_MEAN, CLIP_STD
