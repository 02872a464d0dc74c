"""``python -m benchmarks SUITE [ARGS...]`` — one entry point, one module per suite.

Suites: memory, throughput, kernels, kernels_native, activations, plot, gpu, study, screen, aot, plan, plan_check.
``python -m benchmarks SUITE --help``
lists each suite's options. Suite modules are imported only when chosen, so ``plot`` never imports
the model code and ``activations`` (owned by the kernels work) stays independent.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

SUITES: dict[str, tuple[str, str]] = {
    "memory": ("benchmarks.memory", "bytes saved for backward and peak memory per method x T"),
    "throughput": ("benchmarks.throughput", "iteration time, images/s, rollout vs gradient split per method x T"),
    "kernels": ("benchmarks.kernels", "each fused op vs eager PyTorch vs torch.compile"),
    "kernels_native": ("benchmarks.kernels_native", "the native C++ CPU backend of the fused ops, measured on CPU"),
    "activations": ("benchmarks.activations", "saved activations of patched vs eager Flux"),
    "plot": ("benchmarks.plot", "PNG charts from the JSON results"),
    "gpu": ("benchmarks.gpu_suite", "the whole GPU suite in one call (CUDA tests + every suite, tiny and FLUX.1-dev)"),
    "study": ("benchmarks.study", "shapes world: LeapAlign vs baselines at equal wall-clock, alpha and leap sweeps"),
    "screen": ("benchmarks.screen", "shapes world: the demo with one change its flags do not offer (objective, config, prompts, scorer ensemble)"),
    "aot": ("benchmarks.aot", "every Triton kernel compiled ahead of time (no GPU): registers, spills, vector access"),
    "plan": ("benchmarks.plan", "FLUX.1-dev planned (fake tensors, no GPU): peak memory, FLOPs, roofline per method x resolution"),
    "plan_check": ("benchmarks.plan_check", "FLUX.1-dev: naive BPTT's plan extrapolated in T vs a full trace, field by field"),
}


def _usage() -> str:
    lines = ["usage: python -m benchmarks SUITE [ARGS...]", "", "suites:"]
    width = max(len(name) for name in SUITES) + 2
    lines += [f"  {name:<{width}} {what}" for name, (_, what) in SUITES.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    suite, rest = argv[0], argv[1:]
    if suite not in SUITES:
        print(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUITES[suite][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
