"""HPSv2.1 (Wu et al. 2023) through open_clip, from a local checkpoint (optional extra).

``pip install leapalign[rewards]`` (open_clip_torch). The score is the dot product of the
unit-norm image and text features of an open_clip ViT-H-14 fine-tuned by HPS (~0.25-0.35 for
typical images), exactly as ``hpsv2.score``. open_clip is imported only when this reward is built.
"""
from __future__ import annotations

from pathlib import Path

import torch

from leapalign.rewards.clip import ContrastiveReward

__all__ = ["HPSv2Reward"]


class HPSv2Reward(ContrastiveReward):
    """``(images [B,3,H,W] in [0,1], prompts) -> [B]`` HPSv2.1 scores from ``checkpoint``.

    Args:
        path: the HPS checkpoint file (``HPS_v2.1_compressed.pt``: a dict with ``state_dict`` or a
            bare state dict).
        architecture: open_clip model name (HPSv2 uses ``ViT-H-14``).
    """

    def __init__(
        self,
        path: str | Path,
        architecture: str = "ViT-H-14",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        try:
            import open_clip
        except ImportError as exc:
            raise ImportError(
                "the 'hps' reward needs open_clip: pip install 'leapalign[rewards]' (or open_clip_torch)"
            ) from exc
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"HPS checkpoint path={str(path)!r} is not a file (expected HPS_v2.1_compressed.pt)")
        model = open_clip.create_model(architecture, pretrained=None, precision="fp32")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        model.load_state_dict(state)
        self.model = model.to(dtype=dtype).eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        if gradient_checkpointing and hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(True)
        self.tokenizer = open_clip.get_tokenizer(architecture)
        size = getattr(self.model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._text_cache: dict[str, torch.Tensor] = {}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()
