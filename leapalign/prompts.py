"""Prompt sources (what to train on) and prompt encoders (prompts -> the adapter's conditioning).

The trainer is model-agnostic: a :class:`PromptEncoder` is anything with ``encode(prompts) -> cond``
where ``cond`` is what the :class:`~leapalign.adapters.base.VelocityModel` takes.
:class:`FluxPromptEncoder` runs a ``FluxPipeline``'s text encoders **once per distinct prompt**,
keeps the embeddings on the CPU and can then drop the text encoders (T5-XXL alone is ~9 GB in
bf16) so training holds only the transformer, the VAE and the reward.

Prompt order is a pure function of ``(seed, position)`` (one fresh permutation per epoch), so a
resumed run sees exactly the prompts the uninterrupted run would have, on any number of processes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import torch

__all__ = ["PromptFileError", "load_prompts", "PromptSource", "PromptEncoder", "FluxPromptEncoder"]


class PromptFileError(ValueError):
    """A prompt file is missing, empty or malformed; the message names the file and the line."""


def load_prompts(path: str | Path) -> list[str]:
    """Read prompts from ``.txt`` (one per non-blank line), ``.json`` (a list of strings, or of
    ``{"prompt": ...}``) or ``.jsonl`` (one ``{"prompt": ...}`` or string per line)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt_file={str(path)!r} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"prompt_file={str(path)!r} is not UTF-8 text: {exc}") from exc
    suffix = path.suffix.lower()
    prompts: list[str] = []
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"prompt_file={str(path)!r} is not valid JSON: {exc}") from exc
        if not isinstance(data, list):
            raise PromptFileError(f"prompt_file={str(path)!r} must hold a JSON list of prompts, got {type(data).__name__}")
        for i, item in enumerate(data):
            prompts.append(_prompt_of(item, f"{path}: item {i}"))
    elif suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptFileError(f"prompt_file={str(path)!r} line {lineno} is not valid JSON: {exc}") from exc
            prompts.append(_prompt_of(item, f"{path}: line {lineno}"))
    elif suffix in (".txt", ""):
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        raise PromptFileError(f"prompt_file={str(path)!r}: expected a .txt, .json or .jsonl file, got {suffix!r}")
    if not prompts:
        raise PromptFileError(f"prompt_file={str(path)!r} holds no prompts")
    return prompts


def _prompt_of(item: Any, where: str) -> str:
    if isinstance(item, dict):
        item = item.get("prompt")
    if not isinstance(item, str) or not item.strip():
        raise PromptFileError(f"{where}: expected a non-empty string or {{\"prompt\": \"...\"}}, got {item!r}")
    return item.strip()


class PromptSource:
    """A fixed prompt list read in a seeded order: one random permutation per epoch.

    ``prompts_at(positions)`` maps global sample positions (0, 1, 2, ... over the whole run) to
    prompts; the trainer gives each process its own slice of each global batch.
    """

    def __init__(self, prompts: Sequence[str], seed: int = 0, shuffle: bool = True) -> None:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("PromptSource needs at least one prompt, got an empty list")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} must be a non-empty string, got {p!r}")
        self.prompts = prompts
        self.seed = int(seed)
        self.shuffle = shuffle
        self._perms: dict[int, list[int]] = {}

    @classmethod
    def from_file(cls, path: str | Path, seed: int = 0, shuffle: bool = True) -> "PromptSource":
        return cls(load_prompts(path), seed=seed, shuffle=shuffle)

    def __len__(self) -> int:
        return len(self.prompts)

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perms[epoch] = torch.randperm(len(self.prompts), generator=gen).tolist()
            else:
                self._perms[epoch] = list(range(len(self.prompts)))
            if len(self._perms) > 4:  # only the current epochs are ever asked for
                del self._perms[min(self._perms)]
        return self._perms[epoch]

    def prompts_at(self, positions: Iterable[int]) -> list[str]:
        n = len(self.prompts)
        return [self.prompts[self._perm(pos // n)[pos % n]] for pos in positions]


@runtime_checkable
class PromptEncoder(Protocol):
    """Anything that turns prompts into the conditioning its VelocityModel takes."""

    def encode(self, prompts: Sequence[str]) -> Any: ...


class FluxPromptEncoder:
    """Cached CLIP-pooled + T5 embeddings from a ``FluxPipeline`` as ``FluxConditioning``.

    Each distinct prompt is encoded once (``pipe.encode_prompt``, through a
    :class:`~leapalign.adapters.prompt_cache.PromptEmbeddingCache`); embeddings live on the CPU and
    move to ``device`` per batch. After :meth:`release_text_encoders` the pipeline's tokenizers and
    text encoders are dropped and only cached prompts can be encoded.
    """

    def __init__(
        self,
        pipe: Any,
        max_sequence_length: int = 512,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 8,
    ) -> None:
        from leapalign.adapters.prompt_cache import PromptEmbeddingCache

        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "text_encoder_2", None) is None:
            raise ValueError("FluxPromptEncoder needs a pipeline with text_encoder and text_encoder_2 loaded")
        self.pipe = pipe
        self.max_sequence_length = int(max_sequence_length)
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.cache = PromptEmbeddingCache(self._encode_uncached, pipe, ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
                                          batch_size=batch_size)

    @property
    def released(self) -> bool:
        return self.cache.released

    def __len__(self) -> int:
        return len(self.cache)

    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc_device = next(self.pipe.text_encoder_2.parameters()).device
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=enc_device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def precompute(self, prompts: Iterable[str]) -> None:
        """Encode every prompt not yet cached, ``batch_size`` at a time."""
        self.cache.precompute(prompts)

    def encode(self, prompts: Sequence[str]):
        """``FluxConditioning`` for ``prompts`` (encoding the missing ones first if still possible)."""
        from leapalign.adapters.flux import FluxConditioning

        embeds, pooled = self.cache.get(list(prompts))
        transformer = getattr(self.pipe, "transformer", None)
        device = self.device if self.device is not None else getattr(transformer, "device", None)
        dtype = self.dtype if self.dtype is not None else getattr(transformer, "dtype", None)
        return FluxConditioning(prompt_embeds=embeds.to(device, dtype), pooled_prompt_embeds=pooled.to(device, dtype))

    def release_text_encoders(self) -> None:
        """Drop the pipeline's text encoders and tokenizers; the embedding cache stays."""
        self.cache.release()
