"""Backend choice: auto rules, the override variable, clear errors, and the registry hook for `native`."""
from __future__ import annotations

import pytest
import torch

import leapkernels as lk
from leapkernels import backend

CPU = torch.device("cpu")


def test_auto_on_cpu_follows_the_interpreter(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "interpreter_enabled", lambda: True)
    assert backend.select_backend(CPU) == "triton"
    monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)
    assert backend.select_backend(CPU) == "reference"
    # without the interpreter, an op with native kernels runs them; one without runs the reference
    fake = backend._registry["gated_residual"]["reference"]
    monkeypatch.setitem(backend._registry, "_with_native", {"reference": fake, "native": fake})
    monkeypatch.setitem(backend._registry, "_without_native", {"reference": fake})
    assert backend.select_backend(CPU, "_with_native") == "native"
    assert backend.select_backend(CPU, "_without_native") == "reference"


def test_env_var_forces_a_backend_and_rejects_unknown_names(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert backend.select_backend(CPU) == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match="LEAPKERNELS_BACKEND must be one of"):
        backend.select_backend(CPU)


def test_forcing_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)
    with pytest.raises(backend.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        lk.grad_scale(torch.randn(2, 3, requires_grad=True), 0.5).sum().backward()


def test_cuda_without_triton_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(backend.BackendUnavailableError, match="import triton"):
        backend.select_backend(torch.device("cuda"))


def test_native_is_a_registry_hook(monkeypatch):
    """An op without a `native` kernel set names itself when native is forced; registering one
    makes it the choice (isolated from whatever `leapkernels.native.register_all()` added)."""
    reference = backend._registry["gated_residual"]["reference"]
    monkeypatch.setitem(backend._registry, "_probe_op", {"reference": reference})
    with backend.force_backend("native"):
        with pytest.raises(backend.BackendUnavailableError, match="'_probe_op' has no 'native' backend"):
            backend.kernels_for("_probe_op", CPU)
    calls = []
    fake = backend.KernelSet(lambda *a: calls.append("fwd") or reference.forward(*a), reference.backward)
    monkeypatch.setitem(backend._registry, "gated_residual", {**backend._registry["gated_residual"], "native": fake})
    x = torch.randn(2, 5, 7)
    with backend.force_backend("native"):
        lk.gated_residual(x, torch.ones(2, 7), x)
    assert calls == ["fwd"]


def test_every_op_registers_triton_and_reference():
    for op in ("leap_connector", "grad_scale", "modulated_layernorm", "gated_residual", "qk_norm_rope", "gelu_tanh"):
        assert {"triton", "reference"} <= set(backend.registered(op)), op
