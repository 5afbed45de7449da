"""Packaging for moe-restore.

The top-level folder ``kernels/`` is installed as the subpackage ``moe_restore.kernels`` and
``benchmarks/`` as ``moe_restore.benchmarks``: no top-level ``kernels`` module is ever installed,
because that name belongs to the ``kernels`` package that diffusers and transformers import.
``tests/`` (its helpers, and the op and op-property tests of ``tests/ops`` and ``tests/properties``) is
installed as ``moe_restore.benchmarks.kernel_tests`` (plain files, not imported by the library), so that the GPU run (``python -m moe_restore.benchmarks.gpu_run``) finds the kernel tests
in a non-editable install on a machine with no source checkout.

Supported range, both ends tested by ``.ci/run`` from the pins in ``.ci/constraints-*.txt``:
oldest torch 2.11, Triton 3.6, transformers 5.17; newest torch 2.13 (2.14.1's CUDA wheel pins
Triton 3.8), Triton 3.9.0, transformers 5.25.0, numpy 2.4.6. The lower bounds below are that
oldest end; the upper bounds are the next major versions, which nothing here has been tried with.
"""
from setuptools import find_packages, setup

library_packages = find_packages(include=["moe_restore", "moe_restore.*"])
KERNEL_TESTS = {"moe_restore.benchmarks.kernel_tests": "tests",
                "moe_restore.benchmarks.kernel_tests.ops": "tests/ops",
                "moe_restore.benchmarks.kernel_tests.properties": "tests/properties"}

setup(
    name="moe-restore",
    version="0.1.0",
    description="Triton kernels for mixture-of-experts layers and sigmoid-gated selective scans, "
    "and two all-in-one image restoration networks built on them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=library_packages + ["moe_restore.kernels", "moe_restore.benchmarks", *KERNEL_TESTS],
    package_dir={
        "moe_restore.kernels": "kernels",
        "moe_restore.benchmarks": "benchmarks",
        **KERNEL_TESTS,
    },
    install_requires=[
        "torch>=2.11,<3",
        "triton>=3.6,<4; platform_system == 'Linux'",
        "einops",
        "numpy",
        "scikit-image>=0.21",  # the built-in sample set (images in its wheel)
        "imageio>=2.28",  # image files, 8- and 16-bit
        "pillow",  # imageio's PNG/JPEG codec
        "tqdm",
    ],
    extras_require={
        "plot": ["matplotlib"],
        "gpu-run": ["pytest", "pytest-benchmark", "hypothesis"],  # what the GPU run's kernel tests need
        "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers>=5.17,<6", "diffusers", "peft",
                 "accelerate", "matplotlib"],
    },
    entry_points={"console_scripts": ["moe-restore = moe_restore.cli:main"]},
)
