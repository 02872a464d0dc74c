"""The native backend's build and load contract: an install never fails for it, and its absence
always comes with a reason (setup.py's build record, read back by leapkernels.native).

These tests need neither a compiler nor the built library: they run setup.py's build step in a
scratch tree where CMake cannot succeed, and the loader against scratch paths.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leapkernels import native

ROOT = Path(__file__).resolve().parents[2]


def _scratch_tree(tmp_path: Path, cmakelists: str | None) -> Path:
    """A copy of setup.py with a minimal package layout (and the given CMakeLists.txt).

    A stand-in ``torch`` package keeps the subprocess from importing the real one (seconds).
    """
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    for pkg in ("leapalign", "leapkernels", "benchmarks", "torch"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "torch" / "__init__.py").write_text(
        "import types\n__version__ = '0.0.0'\nutils = types.SimpleNamespace(cmake_prefix_path='/nonexistent')\n"
    )
    if cmakelists is not None:
        (tmp_path / "CMakeLists.txt").write_text(cmakelists)
    return tmp_path


def _build_py(tree: Path, env: dict[str, str]) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tree / "out")],
        cwd=tree, env=env, capture_output=True, text=True, timeout=300,
    )
    record_path = tree / "out" / "leapkernels" / "_native" / "build.json"
    assert record_path.is_file(), f"no build record; setup.py said:\n{done.stdout}\n{done.stderr}"
    return done.returncode, json.loads(record_path.read_text())


def test_install_succeeds_and_records_why_when_cmake_is_missing(tmp_path):
    tree = _scratch_tree(tmp_path, cmakelists=None)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # the venv's bin: python, no cmake
    code, record = _build_py(tree, env)
    assert code == 0
    assert record["status"] == "skipped" and "cmake was not found" in record["reason"]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake to make a configure step fail")
def test_install_succeeds_and_records_the_error_when_the_build_fails(tmp_path):
    tree = _scratch_tree(tmp_path, cmakelists='message(FATAL_ERROR "no compiler in this test")\n')
    code, record = _build_py(tree, dict(os.environ))
    assert code == 0
    assert record["status"] == "failed"
    assert "no compiler in this test" in record["reason"] and Path(record["log"]).is_file()
    assert not (tree / "out" / "leapkernels" / "_native" / native.LIBRARY_PATH.name).exists()


def test_install_skips_the_build_on_request(tmp_path):
    tree = _scratch_tree(tmp_path, cmakelists=None)
    code, record = _build_py(tree, {**os.environ, "LEAPKERNELS_NATIVE_BUILD": "0"})
    assert code == 0 and record["status"] == "skipped" and "LEAPKERNELS_NATIVE_BUILD=0" in record["reason"]


def _load_from(monkeypatch, tmp_path: Path, record: dict | None, library: bool) -> native.NativeStatus:
    monkeypatch.setattr(native, "LIBRARY_PATH", tmp_path / "libleapkernels_native.so")
    monkeypatch.setattr(native, "BUILD_RECORD", tmp_path / "build.json")
    if record is not None:
        (tmp_path / "build.json").write_text(json.dumps(record))
    if library:
        (tmp_path / "libleapkernels_native.so").write_bytes(b"not a shared library")
    return native._load()


def test_loader_says_the_library_was_never_built(monkeypatch, tmp_path):
    status = _load_from(monkeypatch, tmp_path, None, library=False)
    assert not status.available and "is missing and no build was recorded" in status.reason


def test_loader_repeats_the_recorded_build_failure(monkeypatch, tmp_path):
    record = {"status": "failed", "reason": "csrc/gelu.cpp:3: error: boom", "log": "/x/build.log", "torch_version": "1"}
    status = _load_from(monkeypatch, tmp_path, record, library=False)
    assert not status.available
    assert "the native build failed: csrc/gelu.cpp:3: error: boom (build log: /x/build.log)" in status.reason


def test_loader_refuses_a_library_built_for_another_torch(monkeypatch, tmp_path):
    record = {"status": "built", "reason": "", "log": None, "torch_version": "0.0.1"}
    status = _load_from(monkeypatch, tmp_path, record, library=True)
    assert not status.available
    assert f"built against torch 0.0.1 but torch {torch.__version__} is running" in status.reason


def test_loader_reports_a_library_that_does_not_load(monkeypatch, tmp_path):
    record = {"status": "built", "reason": "", "log": None, "torch_version": torch.__version__}
    status = _load_from(monkeypatch, tmp_path, record, library=True)
    assert not status.available and status.reason.startswith("loading ") and "failed" in status.reason


def test_loader_can_be_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv("LEAPKERNELS_NATIVE", "0")
    status = _load_from(monkeypatch, tmp_path, None, library=False)
    assert not status.available and "LEAPKERNELS_NATIVE=0" in status.reason


def test_the_status_of_this_checkout_is_available_or_explained():
    """Whatever happened here, the backend is either loaded or says why not, never silent."""
    status = native.status()
    assert status.available == native.available()
    assert status.available or status.reason
    assert (native.unavailable_reason() is None) == status.available
