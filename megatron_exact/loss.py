"""The EXACT objective on Megatron-Core's per-token-loss path.

The model's last pipeline stage returns per-token cross-entropy ``[1, T]``
from Megatron-Core's vocab-parallel path (correct under TP and sequence
parallelism). :class:`ExactLoss` multiplies in one weight per token, taken
from the bucket of its effective context (``PackedBatch.position_ids``, the
true within-document positions, also after the CP split), and hands the
schedule Megatron-Core's per-token triple ``(loss_sum, num_tokens, report)``.

Why the normalisation is exact under gradient accumulation, DP and CP:
with ``calculate_per_token_loss=True`` the schedule sums ``loss_sum`` over
micro-batches without dividing, and ``finalize_model_grads`` divides the
gradients by the **integer** token count all-reduced over DP x CP. So the
gradient is ``grad(sum_i w_i CE_i m_i) / N`` with ``N = sum_i m_i`` over the
global batch, whatever the split, provided the weights themselves do not
depend on the split. That is why the bucket counts of scope ``step`` are
taken over the whole global batch (one all-reduce of a small int vector over
DP x CP in :meth:`ExactLoss.begin_step`, before any forward).

``--exact-normalization weights`` asks for ``/ sum_i w_i m_i`` instead. The
count handed to Megatron must stay the integer ``N`` (a float sum of weights
would be truncated to int32), so the numerator is scaled by ``N / W`` with
``W = sum_i w_i m_i = sum_b c_b w_b`` over the global batch: known in
``begin_step`` from the global counts, before any forward.

Scope ``microbatch`` (ablation): the counts of micro-batch ``k`` are summed
over every DP x CP rank's ``k``-th micro-batch, so its weights depend on how
the global batch is split into micro-batches (by design). All micro-batches
are counted in ``begin_step`` as a ``[M, buckets]`` matrix (still one
all-reduce, no collective inside the pipeline schedule); the ``k``-th call of
``loss_func`` in a step uses row ``k`` (every schedule computes losses in
micro-batch order). ``weights`` normalisation then divides by
``W = sum_k sum_b c_kb w_kb``, again known before any forward, so both
normalisations stay exact for this scope as well.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from megatron_exact.exact import (
    DEFAULT_ALPHA,
    DEFAULT_EPS,
    DEFAULT_GAMMA,
    bucket_counts,
    bucket_index,
    bucket_lower_edges,
    bucket_weights,
    default_tau,
    num_buckets,
)

WEIGHTINGS = ("uniform", "exact")
SCOPES = ("step", "microbatch")
NORMALIZATIONS = ("tokens", "weights")


@dataclasses.dataclass
class ExactConfig:
    """Loss settings; each field is one command-line flag (:func:`megatron_exact.flags.add_exact_args`)."""

    weighting: str = "uniform"  # --loss-weighting
    alpha: float = DEFAULT_ALPHA  # --exact-alpha
    gamma: float = DEFAULT_GAMMA  # --exact-gamma
    eps: float = DEFAULT_EPS  # --exact-eps
    tau: Optional[int] = None  # --exact-tau (tokens); None: seq_length // 4
    scope: str = "step"  # --exact-scope
    normalization: str = "tokens"  # --exact-normalization

    def __post_init__(self):
        checks = (
            (self.weighting in WEIGHTINGS, "--loss-weighting", f"one of {WEIGHTINGS}", self.weighting),
            (self.scope in SCOPES, "--exact-scope", f"one of {SCOPES}", self.scope),
            (self.normalization in NORMALIZATIONS, "--exact-normalization", f"one of {NORMALIZATIONS}", self.normalization),
            # NaN fails every comparison; infinity would make every weight NaN or Inf.
            (math.isfinite(self.alpha) and self.alpha >= 0, "--exact-alpha", "a finite number >= 0", self.alpha),
            (math.isfinite(self.gamma) and self.gamma >= 0, "--exact-gamma", "a finite number >= 0", self.gamma),
            (math.isfinite(self.eps) and self.eps > 0, "--exact-eps", "a finite number > 0", self.eps),
            (self.tau is None or self.tau >= 0, "--exact-tau", ">= 0 tokens", self.tau),
        )
        for ok, flag, expected, value in checks:
            if not ok:
                raise ValueError(f"{flag} must be {expected}, got {value!r}")

    def check_tail(self, seq_length: int) -> None:
        """Refuse an ``exact`` weighting whose tail is empty at ``seq_length``: with ``tau`` above
        the last bucket's lower edge no target is ever up-weighted (all weights 1, EXACT a no-op)."""
        if self.weighting != "exact" or self.tau is None:
            return
        last_edge = int(bucket_lower_edges(num_buckets(seq_length))[-1])
        if self.tau > last_edge:
            raise ValueError(
                f"--exact-tau {self.tau} leaves EXACT no tail at --seq-length {seq_length}: the last effective-"
                f"context bucket starts at {last_edge}, so every weight would be 1 (uniform loss); choose "
                f"--exact-tau <= {last_edge} (default: seq-length / 4 = {default_tau(seq_length)})"
            )


class ExactLoss:
    """Per-step EXACT weighting and Megatron-Core ``loss_func`` for packed micro-batches.

    Per optimizer step: :meth:`begin_step` with this rank's micro-batches
    (every PP stage, before the schedule runs), then the schedule calls
    :meth:`loss_func` once per micro-batch on the last stage, then
    :meth:`step_statistics` for logging.
    """

    def __init__(self, config: ExactConfig, seq_length: int, group=None):
        config.check_tail(seq_length)
        self.config = config
        self.seq_length = seq_length
        self.tau = default_tau(seq_length) if config.tau is None else config.tau
        self.n_buckets = num_buckets(seq_length)
        self._group = group
        # [rows, buckets]: one row per micro-batch (scope microbatch) or a single row (scope step).
        self._weights: Optional[torch.Tensor] = None

    # -- per step ----------------------------------------------------------------
    def begin_step(self, microbatches: list) -> None:
        """Count supervised targets per bucket (global over DP x CP) and fix this step's weights."""
        if not microbatches:
            raise ValueError("begin_step needs the step's micro-batches, got none")
        try:
            local = torch.stack([bucket_counts(mb.position_ids, mb.loss_mask, self.n_buckets) for mb in microbatches])
        except ValueError as error:
            raise ValueError(f"position ids do not fit --seq-length {self.seq_length}: {error}") from error
        per_microbatch = self.config.scope == "microbatch"
        counts = self._all_reduce(local if per_microbatch else local.sum(0, keepdim=True))
        if self.config.weighting == "exact":
            rows = [
                bucket_weights(row, tau=self.tau, alpha=self.config.alpha, gamma=self.config.gamma, eps=self.config.eps)
                for row in counts
            ]
            weights = torch.stack(rows)
        else:
            weights = torch.ones(counts.shape, dtype=torch.float32)
        self._counts = counts  # int64, global over DP x CP
        self._weights = weights  # float32
        self.global_tokens = int(counts.sum())
        weight_sum = float((counts.double() * weights.double()).sum())
        # Folded "weights" normalisation; exactly 1.0 for "tokens" (and when all weights are 1).
        self.numerator_scale = (
            self.global_tokens / weight_sum if self.config.normalization == "weights" and weight_sum > 0 else 1.0
        )
        self._num_microbatches = len(microbatches)
        self._calls = 0
        # [CE sum per bucket..., objective numerator], kept on the loss's device (no host sync per micro-batch).
        self._sums: Optional[torch.Tensor] = None

    def loss_func(self, packed, output_tensor: torch.Tensor):
        """Megatron-Core per-token loss: ``(sum w*CE*m [x N/W], int N_local, report)``."""
        if self._weights is None:
            raise RuntimeError("ExactLoss.loss_func called before begin_step for this step")
        if self._calls >= self._num_microbatches:
            raise RuntimeError(
                f"ExactLoss.loss_func called {self._calls + 1} times but begin_step saw "
                f"{self._num_microbatches} micro-batches; call begin_step at the start of every step"
            )
        row = self._calls if self.config.scope == "microbatch" else 0
        weights = self._weights[row].to(output_tensor.device)
        self._calls += 1
        losses = output_tensor.float().reshape(-1)
        mask = packed.loss_mask.to(losses.device, torch.float32).reshape(-1)
        buckets = bucket_index(packed.position_ids.reshape(-1)).to(losses.device)
        if losses.shape != mask.shape:
            raise ValueError(f"per-token loss has {losses.numel()} entries but the loss mask {mask.numel()}")
        masked_ce = losses * mask
        loss = (masked_ce * weights[buckets]).sum()
        if self.numerator_scale != 1.0:
            loss = loss * self.numerator_scale
        num_tokens = mask.sum().to(torch.int)

        ce_detached = masked_ce.detach()
        if self._sums is None:
            self._sums = torch.zeros(self.n_buckets + 1, dtype=torch.float64, device=losses.device)
        self._sums[: self.n_buckets].index_add_(0, buckets, ce_detached.double())
        self._sums[self.n_buckets] += loss.detach().double()
        tokens = num_tokens.detach().float().view(1)
        report = {
            "lm loss": torch.cat([ce_detached.sum().view(1), tokens]),
            "exact loss": torch.cat([loss.detach().clone().view(1), tokens]),
        }
        return loss, num_tokens, report

    def step_statistics(self) -> dict:
        """Where supervision went this step (global over DP x CP).

        Counts and weights are known on every rank; cross-entropy only where
        ``loss_func`` ran (the last pipeline stage), elsewhere those fields are
        None. On the last stage this is one more (logging) all-reduce.
        ``bucket_weights`` is the mean weight a bucket's targets got (the
        weights themselves for scope ``step``).
        """
        if self._weights is None:
            raise RuntimeError("ExactLoss.step_statistics called before begin_step")
        counts, weights = self._counts, self._weights
        bucket_tokens = counts.sum(0)
        weighted = (counts.double() * weights.double()).sum(0)
        mean_weight = torch.where(bucket_tokens > 0, weighted / bucket_tokens.clamp(min=1), weights[0].double())
        stats = {
            "tau": self.tau,
            "bucket_lower_edges": bucket_lower_edges(self.n_buckets).tolist(),
            "bucket_tokens": bucket_tokens.tolist(),
            "bucket_weights": mean_weight.tolist(),
            "tokens": self.global_tokens,
            "bucket_ce_sum": None,
            "bucket_ce_mean": None,
            "lm_loss": None,
            "objective": None,
        }
        if self._sums is None:
            return stats
        sums = self._all_reduce(self._sums)
        ce_sum, objective_sum = sums[:-1], float(sums[-1])
        n = max(self.global_tokens, 1)
        stats["bucket_ce_sum"] = ce_sum.tolist()
        stats["bucket_ce_mean"] = [s / c if c else None for s, c in zip(ce_sum.tolist(), bucket_tokens.tolist())]
        stats["lm_loss"] = float(ce_sum.sum()) / n
        stats["objective"] = objective_sum / n
        return stats

    # -- helpers -----------------------------------------------------------------
    def _reduction_group(self):
        if self._group is not None:
            return self._group
        if not torch.distributed.is_initialized():
            return None  # a single process without a launcher: nothing to reduce
        from megatron.core import parallel_state

        # DP x CP, never TP: tensor-parallel ranks see the same tokens.
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return sum_over_group(tensor, self._reduction_group())


def sum_over_group(tensor: torch.Tensor, group) -> torch.Tensor:
    """A CPU copy of ``tensor`` summed over ``group`` (``None`` or one rank: just the copy).

    The collective runs on the backend's device (the GPU under NCCL); the caller's
    tensor is left untouched.
    """
    if group is None or torch.distributed.get_world_size(group) == 1:
        return tensor.cpu().clone()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    reduced = tensor.to(device, copy=True)
    torch.distributed.all_reduce(reduced, group=group)
    return reduced.cpu()
