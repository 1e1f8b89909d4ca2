"""liger-kernel's Triton kernels in Megatron-Core's local layer spec (CUDA only).

liger-kernel ships Megatron-Core modules of its own (``liger_kernel.megatron``):
an RMSNorm with the norm-builder signature, which drops straight into the
spec's norm slots, and a SwiGLU with ``bias_swiglu_impl``'s signature. The
latter is reached here through the MLP's activation slot
(``MLPSubmodules.activation_func`` with ``use_te_activation_func``, the slot
Megatron-Core calls with the whole ``[gate | up]`` fc1 output), which needs
the small adapter below. Everything is imported lazily: liger-kernel needs
Triton and a GPU. Their equality with the unfused modules is checked on a GPU
by tests/gpu/.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.module import MegatronModule


def rms_norm_class():
    """liger's ``LigerMegatronRMSNorm`` (the norm slots' signature; marks the weight for sequence parallelism)."""
    from liger_kernel.megatron import LigerMegatronRMSNorm

    return LigerMegatronRMSNorm


class LigerSwiGLU(MegatronModule):
    """``silu(gate) * up`` of the fc1 output ``[..., 2 * ffn/TP]`` in one Triton kernel (no bias: our models have none).

    A ``MegatronModule``: Megatron-Core's MLP asks each of its children for a
    sharded state dict (this one's is empty), so checkpoints keep the unfused
    model's keys.
    """

    def __init__(self, config):
        super().__init__(config=config)
        self.swiglu = self.kernel()

    @staticmethod
    def kernel() -> torch.nn.Module:
        from liger_kernel.megatron import LigerMegatronSwiGLU

        return LigerMegatronSwiGLU()  # no fallback: an unsupported call raises instead of changing numerics

    def forward(self, fc1_output: torch.Tensor) -> torch.Tensor:
        return self.swiglu(fc1_output)
