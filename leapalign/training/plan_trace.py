"""One training iteration run through PyTorch's own accounting, on fake or real tensors.

:func:`trace_iteration` runs the trainer's micro-batch (objective -> backward -> grad clip ->
AdamW step -> EMA update) under ``MemTracker`` / ``FSDPMemTracker`` (bytes by category, peak),
``FlopCounterMode`` (FLOPs) and :class:`leapalign.profiling.SavedTensorCounter` (bytes saved for backward, as
:mod:`leapalign.profiling` counts them), and attributes every FLOP and the peak to a phase:

``rollout`` (no-grad velocity calls), ``grad_steps`` (grad-enabled velocity calls),
``decode_reward`` (VAE decode + reward forward), ``backward``, ``optimizer`` (norm, clip, AdamW),
``ema`` and ``objective`` (the glue: noise, leaps, connectors, loss).

On fake tensors (``FakeTensorMode``: shapes, no data) three things need an answer that is not a
tensor, and :class:`ConcreteScalars` gives it: ``.item()`` of a fake tensor (metrics, AdamW's
step count) returns 1; the integer random draws with an explicit generator (leap steps, DRTune's
offset, AlignProp's K) run for real, so ``.tolist()`` works, and the float draws from such a
generator (the noise) also advance it as a real run does, so a seeded plan draws the same steps as
the seeded real run; ops whose tensor inputs are all real (the sigma schedule) stay real. None of these changes a shape, a dtype or an allocation.

With ``skip_nograd=True`` only the first no-grad velocity call runs; the later ones return
``empty_like(x)`` (the output the real call allocates), count the first call's FLOPs again, and
put the first call's transient memory on top of what is held at that moment (a no-grad forward
keeps nothing, so its transient depends only on the shapes). Grad-enabled calls always run.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from leapalign.profiling import SavedTensorCounter

__all__ = ["ConcreteScalars", "IterationSetup", "Trace", "trace_iteration", "PHASES"]

PHASES = ("rollout", "grad_steps", "decode_reward", "objective", "backward", "optimizer", "ema")

_REAL_RANDOM = ("aten::randperm", "aten::randint")
_DRAWS = ("aten::randn", "aten::rand", "aten::normal")


def _tensors(args: Any, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    flat, _ = tree_flatten((args, kwargs))
    return [a for a in flat if isinstance(a, torch.Tensor)]


class ConcreteScalars(TorchDispatchMode):
    """Answers the value questions a training step asks of fake tensors (see the module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - dispatch signature
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            return True if args[0].dtype == torch.bool else (1.0 if args[0].is_floating_point() else 1)
        real = (tensors and not any(isinstance(t, FakeTensor) for t in tensors)) or (
            func.name().startswith(_REAL_RANDOM) and not any(isinstance(t, FakeTensor) for t in tensors)
        )
        if real:
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        fake_draw = active_fake_mode() is not None and not tensors and func.name().startswith(_DRAWS)
        if fake_draw and kwargs.get("generator") is not None:
            with unset_fake_temporarily():  # advance the real generator as the real draw would
                func(*args, **kwargs)
        return func(*args, **kwargs)


@dataclass
class IterationSetup:
    """Everything one micro-batch of the trainer touches, wired as the trainer wires it.

    ``model`` is the adapter (``velocity``/``noise``/``sigmas``/``decode``), ``network`` its
    transformer (FSDP root when sharded), ``frozen`` the other modules whose weights stay resident
    (VAE, reward models), ``params`` the trainable parameters in optimiser order.
    """

    model: Any
    network: nn.Module
    objective: Callable[..., Any]
    reward: Callable[..., torch.Tensor]
    cond: Any
    prompts: list[str]
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    ema: Any = None
    frozen: Sequence[nn.Module] = ()
    grad_accumulation: int = 1
    max_grad_norm: float = 1.0
    autocast_dtype: torch.dtype | None = None
    fsdp: bool = False
    generator: torch.Generator | None = None
    weight_bytes: int = 0  # the network's unsharded weights (what every forward reads)


@dataclass
class Trace:
    """What :func:`trace_iteration` measured (bytes and FLOPs per GPU / rank)."""

    peak_bytes: int
    peak_phase: str
    breakdown: dict[str, int]
    saved_bytes: int
    flops: dict[str, int]
    calls: dict[str, int]
    weight_bytes: int
    saved_by_dtype: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())


def _total(snapshot: dict[Any, dict[Any, int]]) -> int:
    return sum(dev.get("Total", 0) for dev in snapshot.values())


def _categories(snapshot: dict[Any, dict[Any, int]]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for dev in snapshot.values():
        for key, value in dev.items():
            out[str(getattr(key, "value", key))] += value
    return dict(out)


class _Recorder:
    """Phase bookkeeping: FLOPs and the memory peak go to the innermost open phase."""

    def __init__(self, mem: Any, flops: Any) -> None:
        self.mem, self.fc = mem, flops
        self.stack = ["objective"]
        self.flops: dict[str, int] = defaultdict(int)
        self._last_flops = 0
        self.peak = 0
        self.peak_phase = "objective"
        self.peak_snapshot: dict[str, int] = {}

    def sync(self) -> None:
        phase = self.stack[-1]
        total = self.fc.get_total_flops()
        self.flops[phase] += total - self._last_flops
        self._last_flops = total
        snap = self.mem.get_tracker_snapshot("peak")
        if _total(snap) > self.peak:
            self.peak, self.peak_phase, self.peak_snapshot = _total(snap), phase, _categories(snap)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.sync()
        self.stack.append(name)
        try:
            yield
        finally:
            self.sync()
            self.stack.pop()

    def current(self) -> int:
        return _total(self.mem.get_tracker_snapshot("current"))

    def add_virtual(self, phase: str, flops: int, transient: int) -> None:
        """A call that was not run: its FLOPs, and its transient on top of what is held now."""
        self.sync()
        self.flops[phase] += flops
        now = self.mem.get_tracker_snapshot("current")
        if _total(now) + transient > self.peak:
            cats = _categories(now)
            cats["Activation"] = cats.get("Activation", 0) + transient
            cats["Total"] = cats.get("Total", 0) + transient
            self.peak, self.peak_phase, self.peak_snapshot = _total(now) + transient, phase, cats


class _PlannedModel:
    """The adapter as the objective sees it: every call accounted to its phase (see module docstring)."""

    def __init__(self, model: Any, network: nn.Module, rec: _Recorder, skip_nograd: bool) -> None:
        self._model, self._network, self._rec, self._skip = model, network, rec, skip_nograd
        self._first: tuple[int, int] | None = None
        self.calls: dict[str, int] = defaultdict(int)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        with unset_fake_temporarily():  # a real schedule: its values are read, never its memory
            return self._model.sigmas(num_steps)

    def velocity(self, x: torch.Tensor, sigma: Any, cond: Any) -> torch.Tensor:
        rec = self._rec
        if torch.is_grad_enabled():
            self.calls["grad"] += 1
            with rec.phase("grad_steps"):
                return self._model.velocity(x, sigma, cond)
        self.calls["nograd"] += 1
        if self._first is not None and self._skip:
            self.calls["nograd_skipped"] += 1
            rec.add_virtual("rollout", *self._first)
            return torch.empty_like(x)
        rec.sync()
        before_flops, before_mem = rec.fc.get_total_flops(), rec.current()
        rec.mem.window_peak = before_mem
        with rec.phase("rollout"):
            v = self._model.velocity(x, sigma, cond)
        if self._first is None:
            self._first = (rec.fc.get_total_flops() - before_flops, max(rec.mem.window_peak - before_mem, 0))
        return v

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._rec.phase("decode_reward"):
            return self._model.decode(latents)


class _PlannedReward:
    def __init__(self, reward: Callable[..., torch.Tensor], rec: _Recorder) -> None:
        self._reward, self._rec = reward, rec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reward, name)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        with self._rec.phase("decode_reward"):
            return self._reward(images, prompts)


class _Iteration(nn.Module):
    """An empty parent module for the micro-batch: the trackers allow a module to run many times
    inside one parent (the rollout calls the transformer T times), not many times at the top."""

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


class _GlobalPeak:
    """Mixin for PyTorch's memory trackers: keep the global peak only.

    The trackers' ``_update_peak_stats`` also refreshes a peak snapshot of every active module
    after every op -- O(modules) per op, minutes for FLUX.1-dev's ~2,000 modules. The global peak
    (what the plan reports) is kept exactly as the trackers keep it, and ``window_peak`` (the
    highest total since the caller last reset it) measures one call's transient.
    """

    window_peak = 0

    def _update_peak_stats(self, peak_state: Any) -> None:
        from copy import deepcopy

        total = 0
        for dev, dev_snap in self._curr_mem_snap.items():
            total += dev_snap["Total"]
            if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                self._peak_mem[dev] = dev_snap["Total"]
                self._peak_mem_snap[dev] = deepcopy(dev_snap)
        self.window_peak = max(self.window_peak, total)


class _NoHandle:
    def remove(self) -> None:
        return None


def _make_tracker(setup: IterationSetup) -> Any:
    from torch.distributed._tools.mem_tracker import MemTracker

    frozen_params = [p for m in setup.frozen for p in m.parameters()]
    shadows = list(getattr(setup.ema, "shadow", []) or [])
    if setup.fsdp:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        mem = type("PlanFSDPMemTracker", (_GlobalPeak, FSDPMemTracker), {})(setup.network, setup.optimizer)
        mem.track_inputs(tuple(frozen_params) + tuple(shadows))  # "Inputs": split below by known sizes
        return mem
    mem = type("PlanMemTracker", (_GlobalPeak, MemTracker), {})()
    for module in (setup.network, *setup.frozen):  # MemTracker hooks every parameter's gradient at its
        for p in module.parameters():              # first forward; frozen ones cannot take a hook
            if not p.requires_grad:
                mem._param_to_grad_hook_handles[p] = (_NoHandle(), _NoHandle())
    mem.track_external(setup.network, *setup.frozen, setup.optimizer)
    if shadows:
        mem.track_external(*shadows)  # "Other": the EMA and nothing else
    return mem


def _storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        st = local.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += st.nbytes()
    return total


def _breakdown(cats: dict[str, int], setup: IterationSetup) -> dict[str, int]:
    """Tracker categories -> params / grads / optimizer / ema / activations / temporaries."""
    ema = cats.get("Other", 0)
    params = cats.get("Parameter", 0) + cats.get("Buffer", 0) + cats.get("Sharded Param", 0)
    params += cats.get("Unsharded Param", 0) + cats.get("All Gather", 0)
    if setup.fsdp:
        shadow_bytes = _storage_bytes(list(getattr(setup.ema, "shadow", []) or []))
        inputs = cats.get("Inputs", 0)
        ema, params = min(shadow_bytes, inputs), params + max(inputs - shadow_bytes, 0)
    return {
        "params": params,
        "grads": cats.get("Gradient", 0) + cats.get("Sharded Grad", 0) + cats.get("Unsharded Grad", 0)
        + cats.get("Reduce Scatter", 0),
        "optimizer": cats.get("Optstate", 0) + cats.get("OptState", 0),
        "ema": ema,
        "activations": cats.get("Activation", 0),
        "temporaries": cats.get("Temp", 0),
    }


def _optimizer_step(setup: IterationSetup) -> None:
    """The trainer's step tail: global grad norm, clip, AdamW, zero_grad(set_to_none)."""
    grads = [p.grad for p in setup.params if p.grad is not None]
    if grads:
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if setup.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(setup.params, setup.max_grad_norm, norm)
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)


class _NoModuleTracker:
    """Stands in for FlopCounterMode's module tracker: every FLOP counts under "Global" only.

    ``torch.utils.module_tracker.ModuleTracker`` puts grad hooks on every module's inputs and
    outputs and keeps their handles until the counter exits; a handle keeps its tensors alive, so
    the tracked iteration held activations that a real run frees (measured on cpu-bench LoRA:
    peak 45.6 MB with it, 16.9 MB without, and 16.9 MB under MemTracker alone). The plan needs
    FLOPs per phase, never per module.
    """

    parents = frozenset({"Global"})

    def __enter__(self) -> "_NoModuleTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _flop_counter() -> Any:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracker()
    return counter


def trace_iteration(setup: IterationSetup, *, skip_nograd: bool = True) -> Trace:
    """Run one micro-batch and optimiser step of ``setup`` under the trackers (see module docstring).

    With ``grad_accumulation > 1`` this is the last micro-batch of a step: the gradients of the
    earlier ones are already held (the caller allocates them), so the peak is the step's worst.
    """
    mem = _make_tracker(setup)
    flop_counter = _flop_counter()
    rec = _Recorder(mem, flop_counter)
    model = _PlannedModel(setup.model, setup.network, rec, skip_nograd)
    reward = _PlannedReward(setup.reward, rec)
    saved = SavedTensorCounter()
    wrapper = _Iteration()
    autocast = (torch.autocast(_device_type(setup), dtype=setup.autocast_dtype) if setup.autocast_dtype
                else contextlib.nullcontext())

    def micro_batch() -> torch.Tensor:
        with autocast, saved:
            out = setup.objective(model, setup.cond, setup.prompts, reward, generator=setup.generator)
        return out.loss

    with mem, flop_counter, ConcreteScalars():
        loss = wrapper(micro_batch)
        with rec.phase("backward"):
            (loss / setup.grad_accumulation).backward()
        del loss
        with rec.phase("optimizer"):
            _optimizer_step(setup)
        with rec.phase("ema"):
            if setup.ema is not None:
                setup.ema.update()
        rec.sync()
    weight_bytes = setup.weight_bytes or _storage_bytes([p for p in setup.network.parameters()])
    return Trace(
        peak_bytes=rec.peak, peak_phase=rec.peak_phase, breakdown=_breakdown(rec.peak_snapshot, setup),
        saved_bytes=saved.bytes, saved_by_dtype=dict(saved.by_dtype), flops={p: int(rec.flops.get(p, 0)) for p in PHASES}, calls=dict(model.calls),
        weight_bytes=weight_bytes,
    )


def _device_type(setup: IterationSetup) -> str:
    return next(setup.network.parameters()).device.type
