"""Per-prompt cache of what a pipeline's own text-encoding path returns.

The FLUX.2 and SD3 adapters' ``encode_prompts`` read from it: each distinct prompt runs through the
pipeline's ``encode_prompt`` once (in chunks), its rows live on the CPU, and after
:meth:`PromptEmbeddingCache.release` the pipeline's text encoders and tokenizers are dropped while
cached prompts stay servable (the trainer precomputes its prompt list before LoRA / FSDP setup).
"""
from __future__ import annotations

import gc
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = ["PromptEmbeddingCache", "AdapterPromptEncoder"]


class PromptEmbeddingCache:
    """``encode(prompts) -> tuple of [B, ...] tensors``, cached per prompt, row by row.

    Args:
        encode: the pipeline's encoding path for a list of prompts (one row per prompt per tensor).
        pipe: the pipeline whose ``release_names`` components :meth:`release` sets to ``None``.
        release_names: the text encoders and tokenizers to drop.
        batch_size: prompts per ``encode`` call when filling the cache.
    """

    def __init__(
        self,
        encode: Callable[[list[str]], tuple[torch.Tensor, ...]],
        pipe: Any,
        release_names: Sequence[str],
        batch_size: int = 8,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._encode = encode
        self._pipe = pipe
        self._release_names = tuple(release_names)
        self.batch_size = int(batch_size)
        self._rows: dict[str, tuple[torch.Tensor, ...]] = {}
        self.released = False

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._rows

    @torch.no_grad()
    def precompute(self, prompts: Iterable[str]) -> None:
        """Encode every prompt not cached yet, ``batch_size`` at a time."""
        prompts = list(prompts)
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings, got {type(bad[0]).__name__}")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._rows]
        if not missing:
            return
        if self.released:
            raise RuntimeError(
                f"{len(missing)} prompt(s) were never encoded and the text encoders were released "
                f"(first: {missing[0]!r}); encode every prompt before release_text_encoders()"
            )
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            outputs = self._encode(chunk)
            for i, prompt in enumerate(chunk):
                self._rows[prompt] = tuple(t[i].detach().cpu().clone() for t in outputs)

    def get(self, prompts: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """The cached rows of ``prompts`` stacked into batches (encoding the missing ones first)."""
        self.precompute(prompts)
        rows = [self._rows[p] for p in prompts]
        return tuple(torch.stack(parts) for parts in zip(*rows))

    def release(self) -> None:
        """Drop the pipeline's text encoders and tokenizers; the cache stays."""
        for name in self._release_names:
            if getattr(self._pipe, name, None) is not None:
                setattr(self._pipe, name, None)
        self.released = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class AdapterPromptEncoder:
    """An adapter's own text path behind :class:`leapalign.prompts.FluxPromptEncoder`'s interface.

    ``encode(prompts) -> cond``, ``precompute(prompts)``, ``release_text_encoders()`` and
    ``released``, so a trainer treats FLUX.1's separate encoder and the FLUX.2 / SD3 adapters'
    built-in ones alike. ``model`` is a ``Flux2VelocityModel`` or ``SD3VelocityModel`` built by
    ``from_pipeline`` with the pipeline's text encoders.
    """

    def __init__(self, model: Any) -> None:
        cache = getattr(model, "prompt_cache", None)
        if cache is None:
            raise ValueError(
                f"{type(model).__name__} has no text path (its pipeline had no text encoders); pass conditioning "
                "built from prompt embeddings instead"
            )
        self.model = model
        self.cache: PromptEmbeddingCache = cache

    @property
    def released(self) -> bool:
        return self.cache.released

    def __len__(self) -> int:
        return len(self.cache)

    def precompute(self, prompts: Iterable[str]) -> None:
        self.cache.precompute(prompts)

    def encode(self, prompts: Sequence[str]) -> Any:
        return self.model.encode_prompts(prompts)

    def release_text_encoders(self) -> None:
        self.cache.release()
