"""Install leapalign and leapkernels.

`pip install -e .[test]` is what `make test` runs. Install `torch==2.13.0` first on CPU-only
machines: an unpinned `torch` pulls a multi-GB CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="leapalign",
    version="0.1.0",
    description="LeapAlign post-training of flow-matching text-to-image models on fused Triton kernels",
    packages=find_packages(include=["leapalign", "leapalign.*", "leapkernels", "leapkernels.*", "benchmarks"]),
    package_data={"leapalign": ["assets/*.safetensors", "assets/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "diffusers>=0.35",
        "transformers>=4.40",
        "peft>=0.12",
        "accelerate>=0.30",
        "safetensors>=0.4",
        "pytest-benchmark>=4.0",
        "nvidia-ml-py>=12.0",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "numpy>=1.24",
    ],
    extras_require={
        "test": ["pytest>=8.0", "hypothesis>=6.100", "pytest-xdist>=3.5", "pytest-timeout>=2.3"],
        "flash": ["flash-attn>=2.6"],
        "rewards": ["open_clip_torch>=2.24"],
    },
    entry_points={"console_scripts": ["leapalign=leapalign.cli:main"]},
)
