"""Tiny text side of the shapes world: a word-level tokenizer and a small learned encoder.

The tokenizer is deterministic and closed over the world's vocabulary (plus ``<pad>`` and
``<unk>``): no download, no merges. The encoder (embeddings + positions + a small pre-norm
transformer) plays T5's and CLIP's parts for the tiny Flux model: it returns per-token
``encoder_hidden_states [B, L, D]`` and ``pooled_projections [B, P]`` (masked mean -> linear), and is
trained jointly with the image model by :mod:`leapalign.shapes.pretrain`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from leapalign.shapes.world import COLORS, COUNT_WORDS, RELATIONS, SHAPES

__all__ = ["VOCAB", "PAD_ID", "UNK_ID", "ShapesTokenizer", "TextEncoderConfig", "ShapesTextEncoder"]

PAD_ID, UNK_ID = 0, 1
VOCAB: tuple[str, ...] = (
    ("<pad>", "<unk>", "a", "and")
    + tuple(COUNT_WORDS.values())
    + tuple(w for s in SHAPES for w in (s, s + "s"))
    + tuple(COLORS)
    + tuple(dict.fromkeys(w for r in RELATIONS for w in r.split()))
)


class ShapesTokenizer:
    """Whitespace word tokenizer over :data:`VOCAB`; pads (right) to ``max_length``.

    ``strict=True`` (default) raises on a word outside the vocabulary instead of mapping it to
    ``<unk>``: a typo in a prompt should fail loudly, not silently condition on ``<unk>``.
    """

    def __init__(self, max_length: int = 8) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self.vocab = VOCAB
        self.ids = {w: i for i, w in enumerate(VOCAB)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, prompts: Sequence[str], strict: bool = True) -> torch.Tensor:
        """``[B, max_length]`` int64 token ids."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, got a single str; wrap it in a list")
        out = torch.full((len(prompts), self.max_length), PAD_ID, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            words = prompt.lower().split()
            if len(words) > self.max_length:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words; the tokenizer takes at most {self.max_length}")
            for i, w in enumerate(words):
                if w not in self.ids and strict:
                    raise ValueError(f"word {w!r} in prompt {prompt!r} is not in the shapes vocabulary {self.vocab[2:]}")
                out[b, i] = self.ids.get(w, UNK_ID)
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Inverse of :meth:`encode` for in-vocabulary prompts (pads dropped)."""
        return [" ".join(self.vocab[i] for i in row.tolist() if i != PAD_ID) for row in ids]


@dataclass
class TextEncoderConfig:
    """Sizes of :class:`ShapesTextEncoder`; ``dim`` is Flux's ``joint_attention_dim``."""

    vocab_size: int = len(VOCAB)
    max_length: int = 8
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ff_mult: int = 2
    pooled_dim: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


class ShapesTextEncoder(nn.Module):
    """Token ids ``[B, L]`` -> ``(encoder_hidden_states [B, L, dim], pooled [B, pooled_dim])``."""

    def __init__(self, config: TextEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or TextEncoderConfig()
        c = self.config
        self.token_embedding = nn.Embedding(c.vocab_size, c.dim)
        self.position_embedding = nn.Parameter(torch.randn(c.max_length, c.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            c.dim, c.num_heads, c.dim * c.ff_mult, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.dim)
        self.pool_proj = nn.Linear(c.dim, c.pooled_dim)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.ndim != 2 or input_ids.shape[1] != self.config.max_length:
            raise ValueError(f"input_ids must be [B, {self.config.max_length}], got shape {tuple(input_ids.shape)}")
        h = self.token_embedding(input_ids) + self.position_embedding
        h = self.norm(self.layers(h))  # pads attend too (Flux's T5 is unmasked as well); they are fixed tokens
        mask = (input_ids != PAD_ID).to(h.dtype).unsqueeze(-1)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return h, self.pool_proj(pooled)
