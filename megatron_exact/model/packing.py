"""The one place where a micro-batch of the batch contract becomes model input.

Input (the batch contract of :mod:`megatron_exact.data.dataset`): ``tokens``, ``labels``, ``loss_mask``,
``position_ids`` of shape ``[b, S]`` and ``cu_seqlens`` of shape ``[b, S+1]``
(document boundaries inside each sample, padded with ``S``).

Output: one packed THD row ``[1, T]`` with a single ``PackedSeqParams`` over
every document of every sample, as Megatron-Core's packed path expects. With
context parallelism every document is padded (loss_mask 0) to a multiple of
``2*CP`` (``2*CP*TP`` with sequence parallelism) and each CP rank keeps chunks
``r`` and ``2*CP-1-r`` of every document, the split Transformer Engine's
``thd_get_partitioned_indices`` makes. ``position_ids`` keep the true
within-document positions, so the effective context EXACT needs survives the
split.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron.core.packed_seq_params import PackedSeqParams

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclasses.dataclass
class PackedBatch:
    tokens: torch.Tensor  # [1, T_local] int64
    labels: torch.Tensor  # [1, T_local] int64
    loss_mask: torch.Tensor  # [1, T_local] float32
    position_ids: torch.Tensor  # [1, T_local] int64: effective context of each target
    packed_seq_params: PackedSeqParams
    source_index: torch.Tensor  # [T_local] int64: index of each kept position in the flattened batch; -1: padding

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]


def document_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    """Lengths of the documents of every sample, in order (the fixed-length padding dropped)."""
    lengths = []
    for row in cu_seqlens.tolist():
        lengths.extend(end - start for start, end in zip(row[:-1], row[1:]) if end > start)
    return lengths


def pad_multiple(context_parallel_size: int = 1, tensor_model_parallel_size: int = 1, sequence_parallel: bool = False) -> int:
    """Every document is padded to a multiple of this many tokens."""
    multiple = 2 * context_parallel_size if context_parallel_size > 1 else 1
    if sequence_parallel and tensor_model_parallel_size > 1:
        multiple = 2 * context_parallel_size * tensor_model_parallel_size
    return multiple


def pack_batch(
    batch: dict,
    *,
    context_parallel_size: int = 1,
    context_parallel_rank: int = 0,
    tensor_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
) -> PackedBatch:
    """Flatten ``batch`` to one packed row and keep this CP rank's share of it."""
    cp, rank = context_parallel_size, context_parallel_rank
    multiple = pad_multiple(cp, tensor_model_parallel_size, sequence_parallel)
    lengths = document_lengths(batch["cu_seqlens"])
    padded_lengths = [-(-n // multiple) * multiple for n in lengths]
    flat = {key: batch[key].reshape(-1) for key in BATCH_KEYS}
    if sum(lengths) != flat["tokens"].numel():
        raise ValueError(f"cu_seqlens cover {sum(lengths)} tokens but the batch holds {flat['tokens'].numel()}")

    # Source index of every position of the padded layout this rank keeps (-1: padding).
    keep = []
    source_start = 0
    for length, padded in zip(lengths, padded_lengths):
        source = torch.full((padded,), -1, dtype=torch.long)
        source[:length] = torch.arange(source_start, source_start + length)
        source_start += length
        if cp > 1:
            chunks = source.view(2 * cp, padded // (2 * cp))
            source = torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])
        keep.append(source)
    index = torch.cat(keep)
    is_pad = index < 0
    gather = index.clamp(min=0)

    def take(name, pad_value):
        values = flat[name][gather]
        return values.masked_fill(is_pad, pad_value).unsqueeze(0)

    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_padded = torch.tensor([0] + padded_lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    max_len = max(padded_lengths)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )
    return PackedBatch(
        tokens=take("tokens", 0),
        labels=take("labels", 0),
        loss_mask=take("loss_mask", 0.0),
        position_ids=take("position_ids", 0),
        packed_seq_params=params,
        source_index=index,
    )


def batch_from_documents(documents: list[list[int]], seq_length: int) -> dict:
    """A one-sample batch of the contract from whole documents (used by tests and tools).

    ``documents`` are token lists whose lengths sum to ``seq_length + 1``: as in
    a Megatron sample, labels are the inputs shifted by one, and a target whose
    label starts the next document is masked.
    """
    lengths = [len(d) for d in documents]
    if sum(lengths) != seq_length + 1 or min(lengths) < 1:
        raise ValueError(f"need non-empty documents holding seq_length + 1 = {seq_length + 1} tokens, got {lengths}")
    flat = torch.tensor([t for d in documents for t in d], dtype=torch.long)
    ends = torch.tensor(lengths).cumsum(0)
    # Input spans: the final token is only a label, so the last span is one shorter (maybe empty).
    input_ends = ends.clamp(max=seq_length)
    input_lengths = torch.diff(input_ends, prepend=torch.zeros(1, dtype=torch.long))
    input_lengths = input_lengths[input_lengths > 0]
    positions = torch.cat([torch.arange(int(n)) for n in input_lengths])
    loss_mask = torch.ones(seq_length)
    loss_mask[ends[:-1] - 1] = 0.0  # the last input of a document predicts the next document's first token
    cu = torch.full((seq_length + 1,), seq_length, dtype=torch.int32)
    cu[1 : len(input_lengths) + 1] = input_lengths.cumsum(0).int()
    cu[0] = 0
    return {
        "tokens": flat[:-1].unsqueeze(0),
        "labels": flat[1:].unsqueeze(0),
        "loss_mask": loss_mask.unsqueeze(0),
        "position_ids": positions.unsqueeze(0),
        "cu_seqlens": cu.unsqueeze(0),
    }
