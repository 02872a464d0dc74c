"""Argument checks shared by the ops: every error names the argument, what came, what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    value: object,
    *,
    like: torch.Tensor | None = None,
    like_name: str = "",
    ndim: int | None = None,
    same_dtype: bool = True,
) -> torch.Tensor:
    """Check ``value`` is a floating tensor; with ``like``, on its device (and dtype)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if like is not None:
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but {like_name} is on {like.device}; expected the same device")
        if same_dtype and value.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but {like_name} has {like.dtype}; expected the same dtype")
    return value


def check_shape(name: str, value: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    """Raise unless ``value.shape == expected`` (``what`` says where ``expected`` comes from)."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(value.shape)}")


def per_sample(
    name: str, value: float | torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A scalar or ``[batch]`` coefficient as a ``[batch]`` ``dtype`` tensor on ``device`` (detached)."""
    if isinstance(value, torch.Tensor):
        if value.device != device and value.numel() != 1:
            raise ValueError(f"{name} is on {value.device}; expected {device} (or a scalar)")
        if value.dim() <= 1 and value.numel() == 1:
            return value.detach().reshape(()).to(device=device, dtype=dtype).expand(batch).contiguous()
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a scalar or have shape ({batch},) (one per sample), got {tuple(value.shape)}")
        return value.detach().to(dtype).contiguous()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((batch,), float(value), device=device, dtype=dtype)
    raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[B, N]`` (one row per sample) with unit column stride, copying only if needed."""
    rows = t.reshape(t.shape[0], -1)
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its last dim is unit-stride (what the row kernels index), else a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()
