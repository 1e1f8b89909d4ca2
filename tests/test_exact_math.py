"""EXACT math (megatron_exact.exact) against hand-computed values from the issue's definitions."""

import math

import pytest
import torch

from megatron_exact.exact import (
    bucket_counts,
    bucket_index,
    bucket_lower_edges,
    bucket_weights,
    default_tau,
    num_buckets,
    token_weights,
)


def test_bucket_edges():
    # bucket 0 = [0, 8); bucket b >= 1 = [2^(b+2), 2^(b+3))
    contexts = torch.tensor([0, 1, 7, 8, 15, 16, 31, 32, 1023, 1024, 2047, 2048, 16383, 16384])
    expected = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 7, 8, 8, 9, 11, 12])
    assert torch.equal(bucket_index(contexts), expected)
    assert bucket_index(contexts).dtype == torch.long


def test_bucket_index_keeps_shape_and_rejects_negative():
    assert bucket_index(torch.tensor([[8, 9], [100, 3]])).tolist() == [[1, 1], [4, 0]]
    with pytest.raises(ValueError, match="non-negative"):
        bucket_index(torch.tensor([3, -1]))


def test_lower_edges_and_bucket_count():
    assert bucket_lower_edges(6).tolist() == [0, 8, 16, 32, 64, 128]
    # Every context below max_context has a bucket, and no bucket is wasted.
    for max_context in (1, 8, 9, 16, 17, 256, 257, 4096, 16384):
        n = num_buckets(max_context)
        assert int(bucket_index(torch.tensor(max_context - 1))) == n - 1
    assert default_tau(4096) == 1024 and default_tau(16384) == 4096


def test_bucket_counts_only_supervised_targets():
    contexts = torch.tensor([0, 5, 8, 9, 20, 40, 41])
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    assert bucket_counts(contexts, mask, 4).tolist() == [1, 2, 0, 2]
    with pytest.raises(ValueError, match="bucket 3"):
        bucket_counts(contexts, mask, 3)


def test_worked_case_two_tail_buckets():
    # q = (0.8, 0.2) in the two tail buckets [1024, 2048), [2048, 4096) with tau = 1024:
    # r = (0.8^-0.5, 0.2^-0.5) = (1.1180, 2.2361); r_bar = 0.8*1.1180 + 0.2*2.2361 = 1.3416;
    # w = 1 + 0.15 * r / r_bar = (1.125, 1.25).
    counts = torch.zeros(10, dtype=torch.long)
    counts[:8] = 500  # non-tail buckets: weight 1 whatever their counts
    counts[8], counts[9] = 800, 200
    w = bucket_weights(counts, tau=1024, alpha=0.15, gamma=0.5, eps=1e-6)
    assert w.dtype == torch.float32
    assert torch.all(w[:8] == 1.0)
    assert w[8].item() == pytest.approx(1.125, abs=1e-6)
    assert w[9].item() == pytest.approx(1.25, abs=1e-6)
    q = torch.tensor([0.8, 0.2])
    assert float((q * (w[8:].double() - 1)).sum()) == pytest.approx(0.15, abs=1e-6)


def test_empty_tail_gives_all_ones():
    counts = torch.tensor([10, 20, 30, 0, 0, 0])
    assert torch.equal(bucket_weights(counts, tau=64), torch.ones(6))
    assert torch.equal(bucket_weights(torch.zeros(6, dtype=torch.long), tau=0), torch.ones(6))


def test_single_tail_bucket_gets_one_plus_alpha():
    counts = torch.tensor([10, 20, 30, 0, 7, 0])  # tau = 32: buckets 3..5 are tail, only bucket 4 non-empty
    w = bucket_weights(counts, tau=32, alpha=0.3)
    assert w.tolist() == pytest.approx([1, 1, 1, 1, 1.3, 1], abs=1e-7)
    assert w[3].item() == 1.0 and w[5].item() == 1.0  # empty tail buckets exactly 1


def test_three_tail_buckets_by_hand_with_eps_and_gamma():
    counts = torch.tensor([50, 0, 0, 6, 3, 1])
    tau, alpha, gamma, eps = 32, 0.2, 0.7, 1e-3
    q = [0.6, 0.3, 0.1]
    r = [(x + eps) ** -gamma for x in q]
    r_bar = sum(a * b for a, b in zip(q, r))
    expected = [1.0, 1.0, 1.0] + [1 + alpha * x / r_bar for x in r]
    w = bucket_weights(counts, tau=tau, alpha=alpha, gamma=gamma, eps=eps)
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    # The rarest bucket gets the largest weight; the extra mass is alpha.
    assert w[5] > w[4] > w[3] > 1
    assert sum(qi * (wi - 1) for qi, wi in zip(q, w[3:].tolist())) == pytest.approx(alpha, rel=1e-6)


def test_tau_between_edges_and_alpha_zero():
    counts = torch.tensor([1, 1, 1, 1, 1, 1])
    # tau = 40: the bucket [32, 64) has its lower edge below tau, so it is not tail.
    w = bucket_weights(counts, tau=40)
    assert w[:4].tolist() == [1, 1, 1, 1] and w[4] > 1 and w[5] > 1
    assert torch.equal(bucket_weights(counts, tau=8, alpha=0.0), torch.ones(6))


def test_gamma_zero_spreads_alpha_evenly():
    w = bucket_weights(torch.tensor([5, 0, 0, 9, 1]), tau=32, alpha=0.15, gamma=0.0)
    assert w.tolist() == pytest.approx([1, 1, 1, 1.15, 1.15], abs=1e-7)


def test_weights_carry_no_gradient():
    counts = torch.tensor([3.0, 1.0, 2.0], requires_grad=True)
    assert not bucket_weights(counts, tau=8).requires_grad


def test_token_weights_lookup():
    w = torch.tensor([1.0, 1.0, 1.5, 2.0])
    contexts = torch.tensor([[0, 9, 16], [31, 24, 7]])
    assert token_weights(contexts, w).tolist() == [[1.0, 1.0, 1.5], [1.5, 1.5, 1.0]]
    assert math.isclose(float(token_weights(torch.tensor(16), w)), 1.5)
