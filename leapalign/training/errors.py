"""The errors a training run reports, by who can fix them.

User errors (:class:`ConfigError` and its subclasses) are what ``leapalign train`` prints as one
line with exit code 2: a bad value, a checkpoint that cannot be read, an output folder held by
another run, a reward without a gradient. :class:`NonFiniteLossError` ends a run that started well
(exit code 1).
"""
from __future__ import annotations

__all__ = ["ConfigError", "CheckpointError", "RunDirError", "RewardGradientError", "NonFiniteLossError"]


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range; the message names the field."""


class CheckpointError(ConfigError, RuntimeError):
    """A checkpoint cannot be found, read, trusted or written; the message names the path."""


class RunDirError(ConfigError):
    """The output folder cannot be used: not writable, a file, or held by another run."""


class RewardGradientError(ConfigError):
    """The reward gave the loss no gradient (detached, ``.item()``, numpy, ``torch.no_grad``)."""


class NonFiniteLossError(RuntimeError):
    """Too many optimiser steps in a row had a NaN/Inf loss or gradient (each one was skipped)."""
