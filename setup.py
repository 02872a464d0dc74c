"""Install leapalign and leapkernels.

`pip install -e .[test]` is what `make test` runs. Install `torch==2.13.0` first on CPU-only
machines: an unpinned `torch` pulls a multi-GB CUDA build.

Every build also tries the native CPU backend of leapkernels (`build_native`): CMake compiles
`csrc/` against the installed torch (`torch.utils.cmake_prefix_path`) into
`leapkernels/_native/libleapkernels_native.so`. It never downloads anything and never fails the
install: without cmake, a C++ compiler or an importable torch, or when compilation fails, it
writes `leapkernels/_native/build.json` saying why, and `leapkernels.native` reports that reason.
`LEAPKERNELS_NATIVE_BUILD=0` skips it.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
NATIVE_LIBRARY = "libleapkernels_native.so"


def _torch_for_build() -> tuple[str, str]:
    """(cmake prefix path, version) of the torch the library will be loaded into.

    pip's build isolation hides the environment's packages from this process, so when `import
    torch` fails here the same interpreter is asked in isolated mode (-I: no PYTHONPATH, hence
    none of pip's overlay), which sees the environment's own site-packages.
    """
    try:
        import torch

        return torch.utils.cmake_prefix_path, torch.__version__
    except ImportError:
        pass
    query = "import torch; print(torch.utils.cmake_prefix_path); print(torch.__version__)"
    done = subprocess.run([sys.executable, "-I", "-c", query], capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or len(lines) < 2:
        raise RuntimeError("torch is not importable at build time (install torch first)")
    return lines[-2], lines[-1]


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build_native(output_dir: Path) -> dict:
    """Build the native library into ``output_dir``; return (and write there) the build record."""
    output_dir.mkdir(parents=True, exist_ok=True)
    build_dir = ROOT / "build" / "native"
    log_path = build_dir / "build.log"
    record = {"status": "skipped", "reason": "", "torch_version": None, "log": None}

    def finish(status: str, reason: str) -> dict:
        record.update(status=status, reason=reason)
        if status != "built":
            (output_dir / NATIVE_LIBRARY).unlink(missing_ok=True)
        (output_dir / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"leapkernels native backend: {status}{': ' + reason if reason else ''}", file=sys.stderr)
        return record

    if os.environ.get("LEAPKERNELS_NATIVE_BUILD", "1").strip().lower() in ("0", "false", "off", "no"):
        return finish("skipped", "LEAPKERNELS_NATIVE_BUILD=0 at install time")
    cmake = shutil.which("cmake")
    if cmake is None:
        return finish("skipped", "cmake was not found on PATH at install time")
    compiler = _compiler()
    if compiler is None:
        return finish("skipped", "no C++ compiler (c++, g++, clang++ or $CXX) was found at install time")
    try:
        prefix, torch_version = _torch_for_build()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return finish("skipped", str(exc))
    record["torch_version"] = torch_version
    build_dir.mkdir(parents=True, exist_ok=True)
    # A library left from an earlier build must not outlive a failed one (ninja relinks it if the
    # objects are up to date).
    (output_dir / NATIVE_LIBRARY).unlink(missing_ok=True)
    configure = [
        cmake, "-S", str(ROOT), "-B", str(build_dir), f"-DCMAKE_PREFIX_PATH={prefix}",
        f"-DCMAKE_CXX_COMPILER={compiler}", "-DCMAKE_BUILD_TYPE=Release",
        f"-DLEAPKERNELS_NATIVE_OUTPUT_DIR={output_dir}",
    ]
    if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja"]
    jobs = str(max(1, min(os.cpu_count() or 1, 8)))
    record["log"] = str(log_path)
    with open(log_path, "w") as log:
        for step in (configure, [cmake, "--build", str(build_dir), "--parallel", jobs]):
            log.write("$ " + " ".join(step) + "\n")
            log.flush()
            if subprocess.run(step, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                break
        else:
            if (output_dir / NATIVE_LIBRARY).is_file():
                return finish("built", "")
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if "error:" in line or "CMake Error" in line), len(lines) - 1)
    return finish("failed", " ".join(lines[first : first + 2])[:500] or "cmake failed")


class build_py_with_native(build_py):
    """build_py, then the native library next to the package (in the source tree when editable)."""

    def run(self) -> None:
        super().run()
        package_root = ROOT if self.editable_mode else Path(self.build_lib)
        build_native(package_root / "leapkernels" / "_native")

setup(
    name="leapalign",
    version="0.1.0",
    description="LeapAlign post-training of flow-matching text-to-image models on fused Triton kernels",
    # benchmarks/ is a folder of the repository (`python -m benchmarks` from its root), never installed.
    packages=find_packages(include=["leapalign", "leapalign.*", "leapkernels", "leapkernels.*"]),
    package_data={"leapalign": ["assets/*.safetensors", "assets/*.json"]},
    cmdclass={"build_py": build_py_with_native},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        # leapkernels.flux forks diffusers' Flux block forwards: only the releases its parity tests
        # verified are accepted (leapkernels.flux.VERIFIED_DIFFUSERS); CI tests the newest of them.
        "diffusers>=0.42.1,<0.43",
        "transformers>=4.40",
        "peft>=0.12",
        "accelerate>=0.30",
        "safetensors>=0.4",
        "pytest-benchmark>=4.0",
        "nvidia-ml-py>=12.0",
        "pyyaml>=6.0",
        "pydantic>=2.6",
        "packaging>=23.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "numpy>=1.24",
        "tomli>=2.0; python_version < '3.11'",
    ],
    extras_require={
        "test": ["pytest>=8.0", "hypothesis>=6.100", "pytest-xdist>=3.5", "pytest-timeout>=2.3"],
        "flash": ["flash-attn>=2.6"],
        "rewards": ["open_clip_torch>=2.24"],
    },
    entry_points={"console_scripts": ["leapalign=leapalign.cli:main"]},
)
