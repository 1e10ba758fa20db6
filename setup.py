"""Packaging for smile-fast. Tool settings (ruff, pytest) live in pyproject.toml.

Runtime requirements are loose on purpose (torch >= 2.6): the same code runs on the pinned CI
stack and on the GPU machine's own torch.
"""

from setuptools import find_packages, setup

setup(
    name="smile-fast",
    version="0.1.0",
    description="Fast, faithful SMILE (sample-to-feature mixup) fine-tuning for pre-trained image classifiers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["smile_fast", "smile_fast.*"]),
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "numpy>=1.24",
        "pillow>=9.0",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "scipy>=1.9",  # Stanford Cars' devkit annotations are MATLAB .mat files
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "dev": ["pytest>=7.3", "pytest-benchmark>=4", "ruff>=0.5", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["smile-fast=smile_fast.cli:console_main"]},
)
