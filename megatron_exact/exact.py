"""EXACT: effective-context buckets and long-tail weights (pure math).

This module is deliberately free of Megatron imports so the formulas can be
tested and reused (stats tool, loss, evaluation) on their own.

Definitions:
- effective context ``l`` of a target = position id of its input token
  (positions restart at every document start);
- bucket 0 holds ``l`` in [0, 8); bucket ``b >= 1`` holds [2^(b+2), 2^(b+3));
- tail = buckets whose lower edge is >= ``tau``;
- over the non-empty tail buckets: ``q_b = c_b / sum_T c``,
  ``r_b = (q_b + eps)^-gamma``, ``r_bar = sum_T q r``,
  ``w_b = 1 + alpha * r_b / r_bar``; every other bucket has weight 1.
  Hence ``sum_T q_b (w_b - 1) = alpha``.
"""

from __future__ import annotations

import math

import torch

DEFAULT_ALPHA = 0.15
DEFAULT_GAMMA = 0.5
DEFAULT_EPS = 1e-6

# Bucket 0 covers [0, 2**_FIRST_EDGE_LOG2) = [0, 8).
_FIRST_EDGE_LOG2 = 3


def num_buckets(max_context: int) -> int:
    """Number of buckets needed to hold every effective context < ``max_context``."""
    if max_context <= 2**_FIRST_EDGE_LOG2:
        return 1
    return int(math.ceil(math.log2(max_context))) - _FIRST_EDGE_LOG2 + 1


def bucket_lower_edges(n_buckets: int) -> torch.Tensor:
    """Lower edge ``a_b`` of each bucket: ``a_0 = 0``, ``a_b = 2^(b+2)``."""
    edges = torch.tensor([2 ** (b + _FIRST_EDGE_LOG2 - 1) for b in range(n_buckets)], dtype=torch.long)
    edges[0] = 0
    return edges


def bucket_index(effective_context: torch.Tensor) -> torch.Tensor:
    """Bucket of each effective context (a LongTensor of the same shape).

    ``floor(log2(l)) - 2`` for ``l >= 8`` and 0 below, computed with integer
    bit tricks so there is no floating-point rounding at the edges.
    """
    ctx = torch.as_tensor(effective_context).long()
    if (ctx < 0).any():
        raise ValueError("effective context must be non-negative")
    # floor(log2(l)) for l >= 1 via frexp on float64 is exact for l < 2^53.
    _, exponent = torch.frexp(ctx.clamp(min=1).double())
    floor_log2 = exponent.long() - 1
    return (floor_log2 - (_FIRST_EDGE_LOG2 - 1)).clamp(min=0)


def bucket_counts(effective_context: torch.Tensor, loss_mask: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Number of supervised targets (``loss_mask != 0``) per bucket, int64 of length ``n_buckets``.

    Contexts beyond the last bucket are an error: the caller sizes ``n_buckets``
    from the sequence length, so an overflow means inconsistent inputs.
    """
    buckets = bucket_index(effective_context).reshape(-1)
    supervised = torch.as_tensor(loss_mask).reshape(-1) != 0
    buckets = buckets[supervised]
    if buckets.numel() and int(buckets.max()) >= n_buckets:
        raise ValueError(f"effective context needs bucket {int(buckets.max())} but only {n_buckets} buckets exist")
    return torch.bincount(buckets, minlength=n_buckets)


def bucket_weights(
    counts: torch.Tensor,
    *,
    tau: float,
    alpha: float = DEFAULT_ALPHA,
    gamma: float = DEFAULT_GAMMA,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """One EXACT weight per bucket from per-bucket supervised-target counts.

    Returns float32. Non-tail and empty buckets get exactly 1.0; with an empty
    tail all weights are 1.0. Weights never carry gradient.
    """
    counts = torch.as_tensor(counts).detach().to(torch.float64).reshape(-1)
    n = counts.numel()
    weights = torch.ones(n, dtype=torch.float64)
    tail = (bucket_lower_edges(n).double() >= tau) & (counts > 0)
    total = counts[tail].sum()
    if total > 0:
        q = counts[tail] / total
        r = (q + eps).pow(-gamma)
        r_bar = (q * r).sum()
        weights[tail] = 1.0 + alpha * r / r_bar
    return weights.float()


def token_weights(effective_context: torch.Tensor, bucket_weight: torch.Tensor) -> torch.Tensor:
    """Per-token weight: the weight of each token's bucket (same shape as the input)."""
    return bucket_weight[bucket_index(effective_context)]


def default_tau(seq_length: int) -> int:
    """Paper default: the tail starts at a quarter of the training window."""
    return seq_length // 4
