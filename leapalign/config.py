"""Moved to :mod:`leapalign.training.config`; this alias stays until ``benchmarks/workload.py``
imports from there (or ``from leapalign import LeapAlignConfig``). Part of the training layer:
nothing in the core may import it."""
from leapalign.training.config import *  # noqa: F401,F403
from leapalign.training.config import __all__  # noqa: F401
