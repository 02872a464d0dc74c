"""What every suite runs: the methods, the model, the batch and the seed — defined once.

Figures are only comparable when every suite and every method sees the same model, the same batch
and the same seed; this module is the one place that builds them. The model is always a named
config of :mod:`leapalign.models.tiny_flux` (``cpu-bench`` by default, DESIGN issue 5 item 7) or
the FLUX.1-dev architecture with random weights (``flux-dev``, GPU only).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = [
    "Method",
    "METHODS",
    "DEFAULT_METHODS",
    "THROUGHPUT_METHODS",
    "ENGINE_METHODS",
    "SamplingIteration",
    "Workload",
    "WorkloadConfig",
    "build_workload",
    "add_lora",
    "build_method_objective",
    "benchmark_reward",
    "run_iteration",
    "IterationResult",
    "resolve_methods",
]


@dataclass(frozen=True)
class Method:
    """A benchmarked method: an objective from ``leapalign.objectives.build_objective`` + options.

    ``kernels`` runs it on a transformer patched with ``leapkernels.apply_leapkernels_to_flux``.
    ``options`` are passed to ``build_objective`` next to the step count. ``compile``,
    ``cuda_graphs`` and ``grad_steps`` choose the rollout engine (``leapalign.rollout_engine``; ``off``: eager).
    The objective ``sampling`` is plain no-grad Euler sampling + decode (no loss, no backward).
    """

    name: str
    objective: str
    label: str
    options: Mapping[str, Any] = field(default_factory=dict)
    kernels: bool = False
    compile: str = "off"
    cuda_graphs: str = "auto"
    grad_steps: str = "eager"


# Every method uses the same loss, ``-mean(r)`` (``hinge_lambda=None``), so that a hinge that is
# inactive for one method's samples never changes what the benchmark measures.
_SAME_LOSS = {"hinge_lambda": None}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("leapalign", "leapalign", "LeapAlign (eager)", {**_SAME_LOSS, "use_kernels": False}),
        Method("leapalign+kernels", "leapalign", "LeapAlign + leapkernels", {**_SAME_LOSS, "use_kernels": True},
               kernels=True),
        Method("bptt", "full_backprop", "naive full BPTT", {**_SAME_LOSS}),
        Method("bptt_ckpt", "full_backprop", "full BPTT + per-step checkpointing", {**_SAME_LOSS, "checkpoint": True}),
        Method("draft_k", "draft_k", "DRaFT-K (K=1)", {**_SAME_LOSS, "k": 1}),
        Method("drtune", "drtune", "DRTune (K=2)", {**_SAME_LOSS, "k": 2}),
        Method("refl", "refl", "ReFL", {**_SAME_LOSS}),
        Method("draft_lv", "draft_lv", "DRaFT-LV (n=2)", {**_SAME_LOSS, "n": 2}),
        Method("alignprop", "alignprop", "AlignProp (random truncation, checkpointed)", {**_SAME_LOSS}),
    )
}
# The rollout engine (issue 15): compiled no-grad rollouts next to the eager ones, and plain sampling.
# Named on request only (``all`` is METHODS: these compile, and sampling has no backward).
ENGINE_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("leapalign+compiled", "leapalign", "LeapAlign, compiled rollout", {**_SAME_LOSS, "use_kernels": False},
               compile="default"),
        Method("leapalign+kernels+compiled", "leapalign", "LeapAlign + leapkernels, compiled rollout (trainer default)",
               {**_SAME_LOSS, "use_kernels": True}, kernels=True, compile="default"),
        Method("leapalign+kernels+compiled-nographs", "leapalign", "LeapAlign + leapkernels, compiled rollout, no CUDA graphs",
               {**_SAME_LOSS, "use_kernels": True}, kernels=True, compile="default", cuda_graphs="off"),
        Method("leapalign+compiled-grad", "leapalign", "LeapAlign, compiled rollout and compiled grad steps",
               {**_SAME_LOSS, "use_kernels": False}, compile="default", grad_steps="compiled"),
        Method("drtune+compiled", "drtune", "DRTune (K=2), compiled rollout", {**_SAME_LOSS, "k": 2}, compile="default"),
        Method("refl+compiled", "refl", "ReFL, compiled rollout", {**_SAME_LOSS}, compile="default"),
        Method("sampling", "sampling", "no-grad Euler sampling + decode (eager)"),
        Method("sampling+compiled", "sampling", "no-grad Euler sampling + decode (compiled)", compile="default"),
        Method("sampling+compiled-nographs", "sampling", "no-grad Euler sampling + decode (compiled, no CUDA graphs)",
               compile="default", cuda_graphs="off"),
    )
}
# The list; DRaFT-LV and AlignProp run on request (``--methods ... draft_lv alignprop``).
DEFAULT_METHODS: tuple[str, ...] = ("leapalign", "leapalign+kernels", "bptt", "bptt_ckpt", "draft_k", "drtune", "refl")
# The throughput suite's default: the seven, the trainer's default rollout (compiled) and plain sampling both ways.
THROUGHPUT_METHODS: tuple[str, ...] = DEFAULT_METHODS + ("leapalign+kernels+compiled", "sampling", "sampling+compiled")


def resolve_methods(names: Sequence[str]) -> list[Method]:
    """Method names -> :class:`Method` (METHODS and ENGINE_METHODS); ``all`` expands to METHODS."""
    if list(names) == ["all"]:
        return list(METHODS.values())
    known = {**METHODS, **ENGINE_METHODS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} in --methods; expected names from {sorted(known)} or 'all'")
    return [known[n] for n in names]


@dataclass(frozen=True)
class WorkloadConfig:
    """Everything that fixes one iteration's work except the method and T (recorded in each JSON)."""

    model: str = "cpu-bench"
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 1
    seed: int = 0
    lora_rank: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(model=self.model, device=self.device, dtype=self.dtype, batch_size=self.batch_size,
                    seed=self.seed, lora_rank=self.lora_rank)


def benchmark_reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """A cheap differentiable reward (contrast around mid-grey), so that the reward is not what is measured.

    Its cost is the same for every method and negligible next to the transformer; real reward models
    add a constant, method-independent amount of memory and time.
    """
    del prompts
    flat = images.float().flatten(1)
    return (flat - 0.5).abs().mean(dim=1)


@dataclass
class Workload:
    """One model + one batch of conditioning + the reward; ``generator()`` re-seeds every iteration."""

    model: Any
    cond: Any
    prompts: list[str]
    reward: Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
    config: WorkloadConfig
    kernels: bool
    info: dict[str, Any]
    engines: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    def generator(self) -> torch.Generator:
        """A fresh generator from the workload seed: every iteration draws the same noise and the same (k, j)."""
        return torch.Generator(device=self.device).manual_seed(self.config.seed)

    def use_kernels(self, on: bool) -> None:
        """Patch (``on``) or revert the transformer in place, so eager and patched methods share one model.

        Sharing matters on GPU: two copies of FLUX.1-dev (24 GB each in bf16) do not fit beside
        the activations of an iteration on an 80 GB card.
        """
        if on == self.kernels:
            return
        from leapkernels import apply_leapkernels_to_flux, revert_leapkernels

        if on:
            apply_leapkernels_to_flux(self.model.transformer)
        else:
            revert_leapkernels(self.model.transformer)
        self.kernels = on

    def rollout_model(self, method: Method) -> Any:
        """The model ``method`` runs: ``self.model``, or the method's rollout engine, kept for the whole
        run (its compiled graphs are reused by every repeat; dynamo shares a graph between engines
        whose network is in the same state, so a later method may find its graph compiled)."""
        if method.compile == "off":
            return self.model
        key = method.name
        if key not in self.engines:
            from leapalign.rollout_engine import CompiledRollout, RolloutEngineConfig

            self.engines[key] = CompiledRollout(self.model, RolloutEngineConfig(
                compile=method.compile, cuda_graphs=method.cuda_graphs, grad_steps=method.grad_steps))
        return self.engines[key]

    def zero_grad(self) -> None:
        for p in self.model.trainable_parameters():
            p.grad = None


def _count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def add_lora(transformer: torch.nn.Module, rank: int) -> None:
    """Freeze ``transformer`` and add peft LoRA adapters of ``rank`` on diffusers' Flux LoRA targets.

    The same targets and init as the trainer (``leapalign.training.config.FLUX_LORA_TARGET_MODULES``,
    alpha = rank, gaussian init) so benchmark and training iterations do the same work.
    """
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    from peft import LoraConfig

    from leapalign.training.config import FLUX_LORA_TARGET_MODULES

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=list(FLUX_LORA_TARGET_MODULES)))


def build_workload(config: WorkloadConfig, kernels: bool = False) -> Workload:
    """Build the model, conditioning and reward for ``config``; patch the transformer if ``kernels``.

    Order: build (seeded) -> move to the device -> add LoRA -> patch with leapkernels, so the eager
    and the patched workload hold bit-identical weights.
    """
    from leapalign.dtypes import torch_dtype
    from leapalign.models import tiny_flux

    device = torch.device(config.device)
    dtype = torch_dtype(config.dtype, "--dtype")
    if config.model == "flux-dev":
        from benchmarks.flux_dev import flux_dev_velocity_model

        model = flux_dev_velocity_model(dtype=dtype, device=device, seed=config.seed)
    else:
        model = tiny_flux.tiny_flux_velocity_model(config.model, dtype=dtype, seed=config.seed)
        model.transformer.to(device)
        if model.vae is not None:
            model.vae.to(device)
    text_len = tiny_flux.tiny_flux_spec(config.model).text_len
    transformer = model.transformer
    if config.lora_rank is not None:
        add_lora(transformer, config.lora_rank)
    if kernels:
        from leapkernels import apply_leapkernels_to_flux

        apply_leapkernels_to_flux(transformer)  # every fused op on
    gen = torch.Generator(device=device).manual_seed(config.seed + 1000)
    cond = tiny_flux.random_flux_conditioning(
        transformer, config.batch_size, text_len=text_len, generator=gen, dtype=dtype, device=device
    )
    prompts = [f"benchmark prompt {i}" for i in range(config.batch_size)]
    info = {
        "transformer_params": _count_params(transformer),
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        "image_tokens": _image_tokens(model),
        "text_tokens": text_len,
        "image_size": f"{model.height}x{model.width}",
        "vae": model.vae is not None,
    }
    return Workload(model, cond, prompts, benchmark_reward, config, kernels, info)


def _image_tokens(model: Any) -> int | None:
    """Packed image tokens per sample, read off one noise draw (shape ``[1, N, C]``)."""
    try:
        return int(model.noise(1, None).shape[1])
    except Exception:  # noqa: BLE001 - informational only
        return None


def build_method_objective(method: Method, steps: int) -> Any:
    """``build_objective(method.objective, num_steps=steps, **method.options)``; `SamplingIteration` for ``sampling``."""
    if method.objective == "sampling":
        return SamplingIteration(steps)
    from leapalign.objectives import build_objective

    return build_objective(method.objective, num_steps=steps, **method.options)


class SamplingIteration:
    """Plain no-grad Euler sampling of ``num_steps`` steps + decode, shaped as an objective call (its
    loss is a constant leaf, so ``backward()`` costs nothing): the inference a LeapAlign iteration is
    compared with."""

    def __init__(self, num_steps: int) -> None:
        self.num_steps = num_steps

    def __call__(self, model: Any, cond: Any, prompts: Sequence[str], reward: Any, generator: Any = None) -> Any:
        from leapalign.flow import rollout
        from leapalign.objectives.base import ObjectiveOutput

        sigmas, noise = model.sigmas(self.num_steps), model.noise(len(prompts), generator)
        with torch.no_grad():
            images = model.decode(rollout(model, cond, noise, sigmas).x0)
        loss = torch.zeros((), requires_grad=True)
        return ObjectiveOutput(loss=loss, rewards=torch.zeros(len(prompts)), images=images)


@dataclass
class IterationResult:
    """One iteration's outcome: loss value, the saved-bytes counter (or None) and its two timed halves."""

    loss: float
    saved: Any
    forward_s: float
    backward_s: float
    metrics: dict[str, float]

    @property
    def seconds(self) -> float:
        return self.forward_s + self.backward_s


def run_iteration(
    objective: Any,
    workload: Workload,
    model: Any | None = None,
    saved_counter: Callable[[], Any] | None = None,
    sync: Callable[[], None] | None = None,
    around_backward: Callable[[bool], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> IterationResult:
    """One training iteration without the optimiser step: objective forward, then ``loss.backward()``.

    ``saved_counter`` (a context-manager factory, e.g. ``leapalign.profiling.SavedTensorCounter``)
    wraps the forward only: it counts what autograd saves for the backward that follows.
    ``model`` overrides ``workload.model`` (a timing proxy); ``around_backward(True/False)`` is called
    just before and after ``backward()``; ``clock`` reads the time (wall by default).
    """
    sync = sync or (lambda: None)
    workload.zero_grad()
    counter_cm = saved_counter() if saved_counter is not None else contextlib.nullcontext()
    sync()
    t0 = clock()
    with counter_cm as counter:
        out = objective(model if model is not None else workload.model, workload.cond, workload.prompts,
                        workload.reward, workload.generator())
    sync()
    t1 = clock()
    if around_backward is not None:
        around_backward(True)
    out.loss.backward()
    sync()
    t2 = clock()
    if around_backward is not None:
        around_backward(False)
    loss = float(out.loss.detach())
    metrics = dict(out.metrics)
    del out
    return IterationResult(loss=loss, saved=counter, forward_s=t1 - t0, backward_s=t2 - t1, metrics=metrics)
