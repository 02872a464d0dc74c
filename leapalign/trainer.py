"""Moved to :mod:`leapalign.training.trainer`; this alias stays until ``leapalign.shapes`` and
``benchmarks`` import from there (or ``from leapalign import LeapAlignTrainer``). Part of the
training layer: nothing in the core may import it."""
from leapalign.training.trainer import *  # noqa: F401,F403
from leapalign.training.trainer import __all__  # noqa: F401
