"""Packaging for moe-restore.

The top-level folder ``kernels/`` is installed as the subpackage ``moe_restore.kernels`` and
``benchmarks/`` as ``moe_restore.benchmarks``: no top-level ``kernels`` module is ever installed,
because that name belongs to the ``kernels`` package that diffusers and transformers import.
"""
from setuptools import find_packages, setup

library_packages = find_packages(include=["moe_restore", "moe_restore.*"])

setup(
    name="moe-restore",
    version="0.1.0",
    description="Triton kernels for mixture-of-experts layers and sigmoid-gated selective scans, "
    "and two all-in-one image restoration networks built on them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=library_packages + ["moe_restore.kernels", "moe_restore.benchmarks"],
    package_dir={
        "moe_restore.kernels": "kernels",
        "moe_restore.benchmarks": "benchmarks",
    },
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "einops",
        "numpy",
        "scikit-image>=0.21",  # the built-in sample set (images in its wheel)
        "imageio>=2.28",  # image files, 8- and 16-bit
        "pillow",  # imageio's PNG/JPEG codec
        "tqdm",
    ],
    extras_require={
        "plot": ["matplotlib"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers>=5", "diffusers", "peft", "accelerate",
                 "matplotlib"],
    },
    entry_points={"console_scripts": ["moe-restore = moe_restore.cli:main"]},
)
