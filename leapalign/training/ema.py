"""Exponential moving average of the trainable weights (paper: decay 0.995).

The EMA is what evaluation samples and what the exported LoRA / full weights hold; the raw
weights keep training. Shadows are fp32 (or the given dtype) copies shaped like the parameters,
so under FSDP2 they are DTensor shards like the parameters and the update is purely local.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

__all__ = ["EMA"]


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimiser step."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float, dtype: torch.dtype = torch.float32) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.params = list(params)
        self.decay = float(decay)
        with torch.no_grad():
            self.shadow = [p.detach().to(dtype).clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.dtype), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, params: Sequence[torch.nn.Parameter] | None = None) -> None:
        for s, p in zip(self.shadow, params if params is not None else self.params):
            p.copy_(s.to(p.dtype))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the parameters (evaluation, export); restore after."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "shadow": [s for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):  # type: ignore[arg-type]
            raise ValueError(f"EMA state has {len(shadow)} tensors, the model has {len(self.shadow)} trainable ones")  # type: ignore[arg-type]
        for s, t in zip(self.shadow, shadow):  # type: ignore[arg-type]
            if tuple(s.shape) != tuple(t.shape):
                raise ValueError(f"EMA tensor shape {tuple(t.shape)} does not match parameter shape {tuple(s.shape)}")
            s.copy_(t)
        self.decay = float(state["decay"])  # type: ignore[arg-type]
