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


def test_backend_imports_none_of_the_backends_that_register_with_it():
    """backend.py knows nothing of native (or any declared backend): no import of leapkernels.*."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(backend.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("leapkernels")], imported


def test_a_declared_backend_is_chosen_by_auto_and_explains_its_absence(monkeypatch):
    """declare_backend: the name becomes a valid choice, auto prefers it on its devices where the
    op has its kernels, and a forced one without kernels raises with the reason it declared."""
    monkeypatch.setattr(backend, "_declared", dict(backend._declared))
    monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    backend.declare_backend("_probe", auto_devices=("cpu",), unavailable_reason=lambda: "probe library not built")
    assert "_probe" in backend.backends()
    reference = backend._registry["gated_residual"]["reference"]
    monkeypatch.setitem(backend._registry, "_probe_op", {"reference": reference})
    assert backend.select_backend(CPU, "_probe_op") == "reference"
    backend.register("_probe_op", "_probe", reference)
    assert backend.select_backend(CPU, "_probe_op") == "_probe"
    backend.unregister("_probe_op", "_probe")
    assert backend.registered("_probe_op") == ("reference",)
    with backend.force_backend("_probe"):
        with pytest.raises(backend.BackendUnavailableError, match=r"\(_probe: probe library not built\)"):
            backend.kernels_for("_probe_op", CPU)
    with pytest.raises(ValueError, match="built-in backend name"):
        backend.declare_backend("triton")
    with pytest.raises(ValueError, match="declare others with declare_backend"):
        backend.register("_probe_op", "_undeclared", reference)
