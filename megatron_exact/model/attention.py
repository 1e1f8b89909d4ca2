"""Document-masked causal attention over packed (THD) batches, without Transformer Engine.

Megatron-Core 0.16.1's local ``DotProductAttention`` refuses packed sequences
and allocates from a CUDA buffer, so without Transformer Engine (CPU, or a
GPU without TE) the layer spec selects this module instead. It computes
causal attention separately for every document described by
``PackedSeqParams.cu_seqlens_*``: no token attends across a document
boundary and no dense ``S x S`` mask is ever built (memory is linear in the
packed length; the largest score block is one document's).

On a GPU, with bf16/fp16 activations and no context parallelism, the whole
packed row goes through one call of torch's variable-length flash attention
(``torch.nn.attention.varlen``, when this torch has it) instead of one call
per document: the same computation without a Python loop over documents.

Context parallelism: each CP rank holds chunks ``r`` and ``2*CP-1-r`` of every
(padded) document, the layout Transformer Engine uses. Keys and values are
all-gathered across the CP group (the backward pass reduce-scatters their
gradients) and each local query chunk attends causally to the keys of its
document up to and including its own chunk.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def _load_varlen_attention() -> Optional[Callable]:
    """torch's flash varlen attention, adapted to one signature, or None if this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    native_gqa = "enable_gqa" in params

    def causal_varlen(query, key, value, cu_seqlens, max_seqlen, scale):
        if native_gqa:
            extra = {"enable_gqa": True}
        else:
            group = query.shape[1] // key.shape[1]
            key, value, extra = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1), {}
        return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, **causal, **extra)

    return causal_varlen


_VARLEN_ATTENTION = _load_varlen_attention()


class PackedDocumentAttention(MegatronModule):
    """Core attention (q, k, v -> context) for packed documents; plugs into ``SelfAttention``."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        cp_comm_type: Optional[str] = None,
        softmax_scale: Optional[float] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"PackedDocumentAttention is causal only, got {attn_mask_type}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = pg_collection.cp
        self.cp_size = self.cp_group.size() if self.cp_group is not None else 1
        kv_channels = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(kv_channels)
        self.dropout_p = config.attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by PackedDocumentAttention")
        if packed_seq_params is None:
            # [s, b, h, d]: every sample is one document.
            if self.cp_size > 1:
                raise ValueError("context parallelism needs packed (THD) batches; see megatron_exact.model.packing")
            s, b = query.shape[:2]
            group = query.shape[2] // key.shape[2]
            q = query.permute(1, 2, 0, 3)
            k = key.repeat_interleave(group, dim=2).permute(1, 2, 0, 3)
            v = value.repeat_interleave(group, dim=2).permute(1, 2, 0, 3)
            out = self._attend(q, k, v, is_causal=True)  # [b, h, s, d]
            return out.permute(2, 0, 1, 3).reshape(s, b, -1)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"unsupported qkv_format {packed_seq_params.qkv_format!r}")
        cu_seqlens = packed_seq_params.cu_seqlens_q_padded
        if cu_seqlens is None:
            cu_seqlens = packed_seq_params.cu_seqlens_q
        query, key, value = (t.reshape(t.shape[0], t.shape[-2], t.shape[-1]) for t in (query, key, value))
        if self.cp_size == 1:
            out = self._per_document(query, key, value, cu_seqlens, packed_seq_params.max_seqlen_q)
        else:
            out = self._per_document_context_parallel(query, key, value, cu_seqlens)
        return out.reshape(out.shape[0], -1)

    # -- helpers -----------------------------------------------------------------
    @staticmethod
    def _heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1)  # [t, h, d] -> [h, t, d]

    @staticmethod
    def _kv_heads_first(key: torch.Tensor, value: torch.Tensor, num_heads: int):
        # GQA: consecutive query heads share one kv head (Megatron's grouping).
        group = num_heads // key.shape[1]
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
        return key.transpose(0, 1), value.transpose(0, 1)

    def _attend(self, q, k, v, *, is_causal=False, attn_mask=None) -> torch.Tensor:
        # SDPA's fused kernels (CPU flash included) take only 4-D [b, h, t, d]; 3-D input falls
        # back to the math kernel, which materialises and saves the whole [h, t, t] score matrix.
        unbatched = q.dim() == 3
        if unbatched:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, scale=self.softmax_scale
                )
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.softmax_scale)
        return out.squeeze(0) if unbatched else out

    def _per_document(self, query, key, value, cu_seqlens, max_seqlen: Optional[int] = None) -> torch.Tensor:
        dropout = self.training and self.dropout_p > 0.0
        if _VARLEN_ATTENTION is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and not dropout:
            cu = cu_seqlens.to(query.device, torch.int32)
            if max_seqlen is None:
                max_seqlen = int(cu.diff().max())  # a device sync: pack_batch gives it as a number
            return _VARLEN_ATTENTION(query, key, value, cu, max_seqlen, self.softmax_scale)
        bounds = cu_seqlens.tolist()
        q_all, (k_all, v_all) = self._heads_first(query), self._kv_heads_first(key, value, query.shape[1])
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                outputs.append(self._attend(q_all[:, start:end], k_all[:, start:end], v_all[:, start:end], is_causal=True))
        return torch.cat(outputs, dim=1).transpose(0, 1)

    def _per_document_context_parallel(self, query, key, value, cu_seqlens_padded) -> torch.Tensor:
        cp, rank = self.cp_size, self.cp_group.rank()
        # [cp * t_local, heads, dim], rank-major; backward reduce-scatters the gradient.
        key_all = tensor_parallel.gather_from_sequence_parallel_region(key, group=self.cp_group)
        value_all = tensor_parallel.gather_from_sequence_parallel_region(value, group=self.cp_group)
        local_tokens = query.shape[0]
        padded = cu_seqlens_padded.tolist()
        q_all = self._heads_first(query)
        outputs = []
        for start, end in zip(padded[:-1], padded[1:]):
            doc_len = end - start
            if doc_len == 0:
                continue
            chunk = doc_len // (2 * cp)
            local_start = start // cp
            # Rebuild this document's keys/values in natural order from every rank's two chunks.
            order = []
            for c in range(2 * cp):
                owner, second_half = (c, 0) if c < cp else (2 * cp - 1 - c, 1)
                first = owner * local_tokens + local_start + second_half * chunk
                order.append(torch.arange(first, first + chunk))
            order = torch.cat(order)
            k_doc, v_doc = self._kv_heads_first(key_all[order], value_all[order], query.shape[1])
            for half, chunk_id in ((0, rank), (1, 2 * cp - 1 - rank)):
                q_lo = local_start + half * chunk
                visible = (chunk_id + 1) * chunk
                mask = causal_lower_right(chunk, visible)
                outputs.append(self._attend(q_all[:, q_lo:q_lo + chunk], k_doc[:, :visible], v_doc[:, :visible], attn_mask=mask))
        return torch.cat(outputs, dim=1).transpose(0, 1)
