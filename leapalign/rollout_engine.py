"""The rollout engine: a compiled no-grad forward for the T - 2 rollout steps, exact grad steps.

LeapAlign's training cost is its inference cost (DESIGN §6): 23 of an iteration's 25 forwards run
without autograd. :class:`CompiledRollout` wraps any adapter whose network is ``model.transformer``
(FLUX.1, FLUX.2, SD3) and answers ``velocity`` by grad mode:

- autograd off (the rollout, sampling): the adapter's own ``velocity`` with its transformer replaced
  by ``torch.compile(transformer, dynamic=False)`` (inductor; on CUDA with CUDA graphs when
  ``cuda_graphs`` allows). The compiled graph is specialised to the batch shape only: sigmas,
  prompts, weights and the drawn (k, j) are tensor *values*, so one graph serves every iteration;
  a leapkernels-patched transformer traces its fused ops as their PyTorch references, which
  inductor fuses itself.
- autograd on (LeapAlign's two leap steps, every baseline's grad window): ``grad_steps="eager"``
  runs the model itself (the patched eager module: leapkernels' saved-bytes savings stay);
  ``"compiled"`` runs the compiled module with AOTAutograd (its own recompute choices). Measured on
  cpu-bench (T = 25, one thread): compiled grad steps make a LeapAlign iteration ~7 % faster but
  save 35.2 MiB for backward against the patched eager path's 22.4 MiB (eager unpatched: 40.8), so
  ``eager`` is the default.

Nothing else changes: the objectives, the reward and the leap/connector ops see the same
protocol, so the reward sees the final image of the rollout that actually ran, bit for bit.
Compilation is lazy (the first call), so LoRA, patching and sharding applied after wrapping are
what gets compiled. ``compile="off"`` returns the model unwrapped (:func:`wrap_rollout`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "COMPILE_MODES",
    "CUDA_GRAPH_MODES",
    "GRAD_STEP_PATHS",
    "RolloutCompileError",
    "RolloutEngineConfig",
    "CompiledRollout",
    "wrap_rollout",
    "unwrap_rollout",
]

COMPILE_MODES = ("off", "default", "max-autotune")
CUDA_GRAPH_MODES = ("auto", "on", "off")
GRAD_STEP_PATHS = ("eager", "compiled")


class RolloutCompileError(RuntimeError):
    """``torch.compile`` could not build the rollout's forward on this machine (the message says
    why and how to switch it off)."""


@dataclass(frozen=True)
class RolloutEngineConfig:
    """How the rollout runs (validated on construction).

    ``compile``: ``off`` (eager), ``default`` (inductor) or ``max-autotune`` (inductor with kernel
    autotuning: longer compile). ``cuda_graphs``: ``auto`` (on for CUDA tensors, off on CPU),
    ``on`` (CUDA only) or ``off``. ``grad_steps``: the path of the grad-enabled steps, ``eager``
    (the model itself) or ``compiled`` (a compiled module with autograd).
    """

    compile: str = "off"
    cuda_graphs: str = "auto"
    grad_steps: str = "eager"

    def __post_init__(self) -> None:
        for name, allowed in (("compile", COMPILE_MODES), ("cuda_graphs", CUDA_GRAPH_MODES),
                              ("grad_steps", GRAD_STEP_PATHS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"rollout {name} must be one of {allowed}, got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.compile != "off"

    def inductor_mode(self, device: torch.device) -> str | None:
        """``torch.compile``'s ``mode`` for a network on ``device`` (CUDA graphs only on CUDA)."""
        graphs = self.cuda_graphs == "on" or (self.cuda_graphs == "auto" and device.type == "cuda")
        if graphs and device.type != "cuda":
            raise ValueError(f"rollout cuda_graphs='on' needs a CUDA network, got one on {device}")
        if self.compile == "max-autotune":
            return "max-autotune" if graphs else "max-autotune-no-cudagraphs"
        return "reduce-overhead" if graphs else None


class CompiledRollout:
    """A VelocityModel proxy: compiled no-grad forwards, grad-enabled ones on ``grad_steps``' path.

    Every attribute but ``velocity`` is the wrapped model's. ``compile_seconds`` holds the wall
    time of the calls that compiled (first call per grad mode), ``compiled_calls`` / ``eager_calls``
    count the forwards each path ran.
    """

    def __init__(self, model: Any, config: RolloutEngineConfig) -> None:
        if not config.enabled:
            raise ValueError("CompiledRollout needs a compile mode other than 'off' (use wrap_rollout)")
        network = getattr(model, "transformer", None)
        if not isinstance(network, torch.nn.Module):
            raise TypeError(
                f"a compiled rollout needs an adapter whose network is model.transformer (an nn.Module); "
                f"{type(model).__name__} has none: set rollout_compile=off"
            )
        self._model = model
        self.config = config
        self.compile_seconds = 0.0
        self.compiled_calls = 0
        self.eager_calls = 0
        self._compiled_view: Any = None
        self._seen: set[bool] = set()
        param = next(network.parameters(), None)
        self._mode = config.inductor_mode(param.device if param is not None else torch.device("cpu"))
        self._graphs = self._mode in ("reduce-overhead", "max-autotune")

    @property
    def wrapped(self) -> Any:
        """The model this engine runs (what ``unwrap_rollout`` returns)."""
        return self._model

    def _view(self) -> Any:
        """A shallow copy of the adapter whose ``transformer`` is the compiled network (built once;
        dynamo keeps one graph per grad mode under it)."""
        if self._compiled_view is None:
            network = self._model.transformer
            view = copy.copy(self._model)
            if isinstance(view, torch.nn.Module):  # its own registry: the model keeps its eager transformer
                view.__dict__["_modules"] = dict(view._modules)
            view.transformer = torch.compile(network, dynamic=False, mode=self._mode)
            self._compiled_view = view
        return self._compiled_view

    def velocity(self, x: torch.Tensor, sigma: Any, cond: Any) -> torch.Tensor:
        grad = torch.is_grad_enabled()
        if grad and self.config.grad_steps == "eager":
            self.eager_calls += 1
            return self._model.velocity(x, sigma, cond)
        first = grad not in self._seen
        view = self._view()
        if self._graphs and not grad:
            torch.compiler.cudagraph_mark_step_begin()
        start = time.perf_counter()
        try:
            out = view.velocity(x, sigma, cond)
        except Exception as exc:
            if first and _is_compile_failure(exc):
                raise _compile_error(exc, self.config) from exc
            raise
        if first:
            self.compile_seconds += time.perf_counter() - start
            self._seen.add(grad)
        self.compiled_calls += 1
        # CUDA graphs reuse their output buffers at the next replay: hand out a tensor of our own
        return out.clone() if self._graphs and not grad else out

    def __getattr__(self, name: str) -> Any:
        if name == "_model":  # not set yet (copy/pickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self._model, name)

    def __repr__(self) -> str:
        cfg = self.config
        return (f"CompiledRollout({self._model!r}, compile={cfg.compile}, cuda_graphs={cfg.cuda_graphs}, "
                f"grad_steps={cfg.grad_steps})")


def _is_compile_failure(exc: Exception) -> bool:
    """Whether ``exc`` came out of dynamo/inductor (not out of the model's own input checks)."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException) or type(exc).__module__.startswith(("torch._inductor", "torch._dynamo"))


def _compile_error(exc: Exception, config: RolloutEngineConfig) -> RolloutCompileError:
    """An inductor failure (no C++ compiler, an unsupported op...) as one line that names the switch."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return RolloutCompileError(
        f"rollout_compile={config.compile!r}: torch.compile could not build the rollout forward on this machine "
        f"({type(exc).__name__}: {first[:300]}); set rollout_compile=off to run eagerly"
    )


def wrap_rollout(model: Any, config: RolloutEngineConfig | None) -> Any:
    """``model`` run by the engine ``config`` describes; the model itself when compile is off."""
    if config is None or not config.enabled:
        return model
    return CompiledRollout(model, config)


def unwrap_rollout(model: Any) -> Any:
    """The model under a :class:`CompiledRollout` (the argument itself otherwise)."""
    return model.wrapped if isinstance(model, CompiledRollout) else model
