"""Validation loss: always unweighted cross-entropy, overall and per effective-context bucket.

Whatever the training objective (uniform or EXACT), validation reports the
plain mean cross-entropy of the supervised targets, so runs that differ only
in ``--loss-weighting`` are compared on the same quantity. Every evaluation
reads the same first ``--eval-iters`` global batches of the validation split,
so successive evaluations (and paired runs) see identical data.
"""

from __future__ import annotations

import torch

from megatron_exact.exact import bucket_index, bucket_lower_edges, num_buckets
from megatron_exact.loss import sum_over_group


class BucketedCrossEntropy:
    """Megatron-Core ``loss_func`` that sums cross-entropy and counts per bucket (no weighting)."""

    def __init__(self, seq_length: int):
        self.n_buckets = num_buckets(seq_length)

    def loss_func(self, packed, output_tensor: torch.Tensor):
        losses = output_tensor.float().reshape(-1)
        mask = packed.loss_mask.to(losses.device, torch.float32).reshape(-1)
        buckets = bucket_index(packed.position_ids.reshape(-1)).to(losses.device)
        ce = (losses * mask).detach().double()
        ce_sum = torch.zeros(self.n_buckets, dtype=torch.float64, device=losses.device).index_add_(0, buckets, ce)
        counts = torch.zeros(self.n_buckets, dtype=torch.float64, device=losses.device).index_add_(
            0, buckets, mask.double())
        num_tokens = mask.sum().to(torch.int)
        return (losses * mask).sum(), num_tokens, {"valid": torch.cat([ce_sum, counts])}

    def summarize(self, reports: list, group) -> dict:
        """Reduce the per-micro-batch reports of this rank over ``group`` (DP x CP) into the validation record."""
        local = torch.zeros(2 * self.n_buckets, dtype=torch.float64)
        for report in reports:
            local += report["valid"].cpu()
        local = sum_over_group(local, group if torch.distributed.is_initialized() else None)
        ce_sum, counts = local[: self.n_buckets], local[self.n_buckets:]
        tokens = int(counts.sum())
        return {
            "lm_loss": float(ce_sum.sum()) / max(tokens, 1),
            "tokens": tokens,
            "bucket_lower_edges": bucket_lower_edges(self.n_buckets).tolist(),
            "bucket_tokens": [int(c) for c in counts.tolist()],
            "bucket_ce_mean": [s / c if c else None for s, c in zip(ce_sum.tolist(), counts.tolist())],
        }
