"""The EXACT weights written again from their definition, in plain Python, for tests.

Deliberately independent of ``megatron_exact.exact`` (no torch, no bit tricks):
a test that compares the trainer with these numbers compares two separate
implementations of the same formulas (README "EXACT"):

- a target's effective context ``l`` is its input token's position inside its document;
- bucket 0 holds ``l < 8``; bucket ``b >= 1`` holds ``2**(b+2) <= l < 2**(b+3)``;
- the tail is the buckets whose lower edge is ``>= tau``; over its non-empty buckets
  ``q_b = c_b / sum c``, ``r_b = (q_b + eps) ** -gamma``, ``w_b = 1 + alpha r_b / sum_b q_b r_b``;
  every other bucket weighs 1.
"""

from __future__ import annotations

ALPHA, GAMMA, EPS = 0.15, 0.5, 1e-6


def bucket_of(context: int) -> int:
    bucket, edge = 0, 8
    while context >= edge:
        bucket, edge = bucket + 1, edge * 2
    return bucket


def lower_edge(bucket: int) -> int:
    return 0 if bucket == 0 else 2 ** (bucket + 2)


def bucket_counts(contexts, supervised, n_buckets: int) -> list[int]:
    counts = [0] * n_buckets
    for context, keep in zip(contexts, supervised):
        if keep:
            counts[bucket_of(int(context))] += 1
    return counts


def bucket_weights(counts, tau: int, alpha: float = ALPHA, gamma: float = GAMMA, eps: float = EPS) -> list[float]:
    tail = [b for b, c in enumerate(counts) if c > 0 and lower_edge(b) >= tau]
    weights = [1.0] * len(counts)
    total = sum(counts[b] for b in tail)
    if total:
        q = {b: counts[b] / total for b in tail}
        r = {b: (q[b] + eps) ** -gamma for b in tail}
        r_bar = sum(q[b] * r[b] for b in tail)
        for b in tail:
            weights[b] = 1.0 + alpha * r[b] / r_bar
    return weights


def n_buckets_for(seq_length: int) -> int:
    """Buckets needed for every context ``< seq_length``."""
    return bucket_of(seq_length - 1) + 1


def document_positions(cu_seqlens, length: int) -> list[int]:
    """Each token's position inside its document, from the document starts (``cu_seqlens``)."""
    starts = sorted({int(s) for s in cu_seqlens if int(s) < length})
    positions, start_iter = [], iter(starts[1:] + [length])
    current_start, next_start = starts[0], next(start_iter)
    for index in range(length):
        if index == next_start:
            current_start, next_start = next_start, next(start_iter, length)
        positions.append(index - current_start)
    return positions


def exact_objective(samples, tau: int, n_buckets: int) -> tuple[float, float, int]:
    """``(EXACT objective, mean cross-entropy, supervised targets)`` of one global batch (scope step,
    normalisation by the number of targets). ``samples``: ``(positions, supervised, token_losses)``
    per sample, each a sequence over the sample's tokens."""
    counts = [0] * n_buckets
    for positions, supervised, _ in samples:
        counts = [a + b for a, b in zip(counts, bucket_counts(positions, supervised, n_buckets))]
    weights = bucket_weights(counts, tau)
    weighted = plain = 0.0
    for positions, supervised, losses in samples:
        for position, keep, loss in zip(positions, supervised, losses):
            if keep:
                weighted += weights[bucket_of(int(position))] * loss
                plain += loss
    targets = sum(counts)
    return weighted / targets, plain / targets, targets
