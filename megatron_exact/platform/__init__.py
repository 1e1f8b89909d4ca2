"""Platform selection: GPU (NCCL, optional Transformer Engine) or CPU (gloo)."""

from __future__ import annotations

import importlib.util

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def has_transformer_engine() -> bool:
    """Transformer Engine is the GPU fast path; it is useless (and unimportable) without CUDA."""
    return has_cuda() and importlib.util.find_spec("transformer_engine") is not None


def distributed_backend() -> str:
    return "nccl" if has_cuda() else "gloo"


def setup_platform() -> str:
    """Prepare torch for Megatron-Core on this machine; call before building models.

    Returns the device type, ``"cuda"`` or ``"cpu"``. On a machine without
    CUDA this installs :mod:`megatron_exact.platform.cpu`.
    """
    if has_cuda():
        return "cuda"
    from megatron_exact.platform import cpu

    cpu.install()
    return "cpu"
