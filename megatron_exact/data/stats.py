"""Where does the supervision go? Supervised targets per effective-context bucket.

Computed from the dataset's indices alone (no token is read): a document piece of
``L`` tokens inside a sample's ``S+1`` window supervises exactly the contexts
``0..L-2`` (its last token's label lies in the next document, is padding, or is
past the window), so a bucket ``[a, u)`` receives ``max(0, min(L-1, u) - a)``
targets from it. With document masking off the whole real window is one piece.
This is vectorised over all pieces and equals counting ``bucket_counts`` over
every sample's ``position_ids``/``loss_mask`` (tested).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from megatron_exact import atomic_io, exact
from megatron_exact.data.dataset import ExactGPTDataset, all_segment_lengths


@dataclass
class ContextStats:
    seq_length: int
    num_samples: int
    document_masking: bool
    tau: int
    counts: List[int]
    lower_edges: List[int]
    exact_weights: List[float]
    alpha: float = exact.DEFAULT_ALPHA
    gamma: float = exact.DEFAULT_GAMMA
    eps: float = exact.DEFAULT_EPS
    loss_weighting: str = "exact"  # the weights are EXACT's; a uniform run weights every target 1
    supervised_tokens: int = 0
    below_quarter: int = 0
    seconds: float = 0.0
    data_path: List[str] = field(default_factory=list)

    @property
    def shares(self) -> np.ndarray:
        return np.asarray(self.counts, dtype=np.float64) / max(self.supervised_tokens, 1)

    @property
    def share_below_quarter(self) -> float:
        return self.below_quarter / max(self.supervised_tokens, 1)

    def to_json(self) -> dict:
        shares = self.shares
        cumulative = np.cumsum(shares)
        uppers = self.lower_edges[1:] + [self.seq_length]
        return {
            **{k: v for k, v in asdict(self).items() if k not in ("counts", "lower_edges", "exact_weights")},
            "share_below_quarter": self.share_below_quarter,
            "tokens_per_second": self.num_samples * self.seq_length / max(self.seconds, 1e-12),
            "buckets": [
                {
                    "lower": lo,
                    "upper": up,
                    "count": c,
                    "share": float(s),
                    "cumulative_share": float(cs),
                    "exact_weight": w,
                }
                for lo, up, c, s, cs, w in zip(self.lower_edges, uppers, self.counts, shares, cumulative, self.exact_weights)
            ],
        }


def counts_from_pieces(piece_lengths: np.ndarray, lower_edges: np.ndarray, upper_edges: np.ndarray) -> np.ndarray:
    """Supervised targets per bucket from document-piece lengths (see module doc)."""
    supervised = np.maximum(piece_lengths.astype(np.int64) - 1, 0)[:, None]
    per_bucket = np.minimum(supervised, upper_edges[None, :]) - lower_edges[None, :]
    return np.clip(per_bucket, 0, None).sum(axis=0)


def _constituents(dataset, num_samples: Optional[int]) -> Iterator[Tuple[ExactGPTDataset, np.ndarray]]:
    """``(ExactGPTDataset, its sample ids)`` behind every top-level sample."""
    total = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    if isinstance(dataset, ExactGPTDataset):
        yield dataset, np.arange(total)
        return
    dataset_index = np.asarray(dataset.dataset_index[:total])
    sample_index = np.asarray(dataset.dataset_sample_index[:total])
    for k, constituent in enumerate(dataset.datasets):
        yield constituent, sample_index[dataset_index == k]


def effective_context_stats(dataset, num_samples: Optional[int] = None, chunk_samples: int = 65536, progress=None,
                            alpha: float = exact.DEFAULT_ALPHA, gamma: float = exact.DEFAULT_GAMMA,
                            eps: float = exact.DEFAULT_EPS, tau: Optional[int] = None) -> ContextStats:
    """Bucket counts over the first ``num_samples`` samples (all if None) of ``dataset``
    (an ``ExactGPTDataset`` or a Megatron ``BlendedDataset`` of them), and the EXACT weights
    of those counts with ``alpha``, ``gamma``, ``eps`` and ``tau`` (None: ``seq_length // 4``)."""
    config = dataset.config
    S = config.sequence_length
    n_buckets = exact.num_buckets(S)
    lower = exact.bucket_lower_edges(n_buckets).numpy().astype(np.int64)
    upper = np.append(lower[1:], S).astype(np.int64)
    quarter = exact.default_tau(S)
    tau = quarter if tau is None else tau
    counts = np.zeros(n_buckets, dtype=np.int64)
    below_quarter = 0
    samples = 0
    start = time.perf_counter()
    for constituent, sample_ids in _constituents(dataset, num_samples):
        for begin in range(0, sample_ids.size, chunk_samples):
            ids = sample_ids[begin : begin + chunk_samples]
            pieces, owner = all_segment_lengths(constituent, ids)
            if not config.document_masking:
                pieces = np.bincount(owner, weights=pieces, minlength=ids.size).astype(np.int64)
            counts += counts_from_pieces(pieces, lower, upper)
            below_quarter += int(np.minimum(np.maximum(pieces - 1, 0), quarter).sum())
            samples += ids.size
            if progress:
                progress(samples)
    seconds = time.perf_counter() - start
    weights = exact.bucket_weights(torch.from_numpy(counts), tau=tau, alpha=alpha, gamma=gamma, eps=eps)
    return ContextStats(
        seq_length=S,
        num_samples=samples,
        document_masking=bool(config.document_masking),
        tau=tau,
        counts=counts.tolist(),
        lower_edges=lower.tolist(),
        exact_weights=[float(w) for w in weights],
        alpha=alpha,
        gamma=gamma,
        eps=eps,
        supervised_tokens=int(counts.sum()),
        below_quarter=below_quarter,
        seconds=seconds,
    )


def format_table(stats: ContextStats) -> str:
    uppers = stats.lower_edges[1:] + [stats.seq_length]
    lines = [
        f"{'bucket':>18} {'targets':>14} {'share':>8} {'cumul.':>8} {'EXACT w':>8}",
    ]
    cumulative = 0.0
    for lo, up, count, share, weight in zip(stats.lower_edges, uppers, stats.counts, stats.shares, stats.exact_weights):
        cumulative += share
        tail = "*" if lo >= stats.tau else " "
        lines.append(f"{f'[{lo}, {up})':>17}{tail} {count:>14,} {share:>8.2%} {cumulative:>8.2%} {weight:>8.4f}")
    lines.append(
        f"{stats.supervised_tokens:,} supervised targets in {stats.num_samples:,} samples of {stats.seq_length} "
        f"(document masking {'on' if stats.document_masking else 'off'}); "
        f"{stats.share_below_quarter:.2%} of the loss mass has context < seq_length/4 = {stats.seq_length // 4}; "
        f"* = EXACT tail (lower edge >= tau = {stats.tau}), weights with alpha={stats.alpha}, gamma={stats.gamma}, "
        f"eps={stats.eps}"
    )
    if stats.loss_weighting != "exact":
        lines.append(f"(--loss-weighting {stats.loss_weighting}: the run weights every target 1; the weights above "
                     "are those --loss-weighting exact would give)")
    return "\n".join(lines)


def write_json(stats: ContextStats, path: str) -> None:
    atomic_io.write_json(path, stats.to_json())


def plot(stats: ContextStats, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    uppers = stats.lower_edges[1:] + [stats.seq_length]
    labels = [f"[{lo},{up})" for lo, up in zip(stats.lower_edges, uppers)]
    colors = ["tab:orange" if lo >= stats.tau else "tab:blue" for lo in stats.lower_edges]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels)), 4.5))
    ax.bar(range(len(labels)), stats.shares * 100, color=colors)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_ylabel("share of supervised targets (%)")
    ax.set_xlabel("effective context (tokens)")
    ax.set_title(
        f"Supervision by effective context, S={stats.seq_length}, masking {'on' if stats.document_masking else 'off'}: "
        f"{stats.share_below_quarter:.1%} below S/4"
    )
    weights_axis = ax.twinx()
    weights_axis.plot(range(len(labels)), stats.exact_weights, "k.-", label="EXACT weight")
    weights_axis.set_ylabel("EXACT weight (orange = tail)")
    weights_axis.legend(loc="upper left")
    fig.tight_layout()
    try:
        with atomic_io.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
