"""megatron_exact: effective-context-weighted (EXACT) long-context CPT on Megatron-Core."""

from pathlib import Path

from setuptools import find_packages, setup

# Tested ranges. torch is pinned by the Makefile for CPU installs (TORCH=...);
# an open torch requirement here would pull a multi-GB CUDA build on CPU machines
# where torch is not yet installed, so install torch first (the Makefile does).
INSTALL_REQUIRES = [
    "torch>=2.6",
    "megatron-core>=0.16.1,<0.17",
    "numpy>=1.26",
    "psutil>=5.9",  # dist_checkpointing.save needs it but does not declare it
    "transformers>=4.51,<6",
    "safetensors>=0.4",
    "tokenizers>=0.21",
    "sentencepiece>=0.2",
    "tiktoken>=0.7",
    "nltk>=3.9",
    "zstandard>=0.22",
    "pyyaml>=6",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "tensorboard>=2.16",
    "wonderwords>=2.2",  # offline word lists for RULER/NoLiMa-style evaluation
]

EXTRAS_REQUIRE = {
    # GPU fast path; detected at run time, never needed on CPU. NVIDIA apex is
    # built from source on clusters; the PyPI package called "apex" is unrelated.
    "gpu": ["transformer-engine[pytorch]>=2.0"],
    # lm-evaluation-harness with its HF model backend; 0.4.13 tested with transformers 5.24.
    "eval": ["lm-eval[hf]>=0.4.13,<0.5"],
    # The tests run the harness offline on a tiny model, so `make test` installs it.
    "test": ["pytest>=8", "pytest-timeout>=2.3", "lm-eval[hf]>=0.4.13,<0.5"],
}

setup(
    name="megatron_exact",
    version="0.1.0",
    description="EXACT: effective-context allocation for long-context continued pretraining on Megatron-Core",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_exact", "megatron_exact.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["megatron-exact-train=megatron_exact.train:main"]},
)
