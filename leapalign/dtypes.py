"""dtype names as they appear in configs and on command lines, and the torch dtypes they mean.

One table for the whole project: the trainer config, ``leapalign sample`` and the benchmarks all
spell dtypes the same way (``float32 | bfloat16 | float16``; the short ``fp32 | bf16 | fp16`` are
accepted too), and all reject an unknown name with the same message.
"""
from __future__ import annotations

import torch

__all__ = ["DTYPE_NAMES", "torch_dtype"]

#: The names a config may give, in the order help texts list them.
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def torch_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``what`` names the setting in the error message."""
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"{what}={name!r} is not a supported dtype; expected one of {sorted(_DTYPES)}") from None
