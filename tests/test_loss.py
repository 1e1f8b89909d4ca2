"""ExactLoss (megatron_exact.loss) in one process, against sums written out by hand.

The per-token cross-entropy is a leaf tensor here, so the gradient the loss
sends back to the model (``w_i * m_i * scale``) is checked directly; the
multi-process layout tests (tests/parallel/) run it through real models.
"""

import argparse

import pytest
import torch

from megatron_exact.platform import setup_platform

setup_platform()

from megatron_exact.exact import bucket_index  # noqa: E402
from megatron_exact.flags import add_exact_args, exact_config_from_args  # noqa: E402
from megatron_exact.loss import ExactConfig, ExactLoss  # noqa: E402
from megatron_exact.model.packing import batch_from_documents, pack_batch  # noqa: E402
from tests import exact_reference as reference  # noqa: E402

SEQ = 128
TAU = 32  # tail buckets: [32, 64), [64, 128)


def packed_microbatch(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 100, (n,), generator=generator).tolist() for n in lengths]
    return pack_batch(batch_from_documents(docs, SEQ))


MICROBATCH_DOCS = [[129], [40, 89], [100, 20, 9], [70, 59]]


def microbatches():
    return [packed_microbatch(lengths, seed) for seed, lengths in enumerate(MICROBATCH_DOCS)]


def fake_token_losses(mbs, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(1, mb.num_tokens, generator=generator) * 5).requires_grad_() for mb in mbs]


def hand_counts(mbs):
    """Supervised targets per bucket [0,8), [8,16), [16,32), [32,64), [64,128), counted without exact.py."""
    counts = [0] * 5
    for mb in mbs:
        mb_counts = reference.bucket_counts(mb.position_ids.view(-1).tolist(), mb.loss_mask.view(-1).tolist(), 5)
        counts = [a + b for a, b in zip(counts, mb_counts)]
    return counts


def hand_weights(counts):
    return reference.bucket_weights(counts, tau=TAU)


def run_step(loss, mbs, token_losses):
    loss.begin_step(mbs)
    outputs = [loss.loss_func(mb, ce) for mb, ce in zip(mbs, token_losses)]
    return outputs


def test_flags_round_trip_and_defaults():
    parser = add_exact_args(argparse.ArgumentParser())
    assert exact_config_from_args(parser.parse_args([])) == ExactConfig()
    args = parser.parse_args(
        "--loss-weighting exact --exact-alpha 0.3 --exact-gamma 1 --exact-eps 1e-4 --exact-tau 1024 "
        "--exact-scope microbatch --exact-normalization weights".split()
    )
    assert exact_config_from_args(args) == ExactConfig("exact", 0.3, 1.0, 1e-4, 1024, "microbatch", "weights")
    with pytest.raises(SystemExit):
        parser.parse_args(["--loss-weighting", "focal"])


@pytest.mark.parametrize(
    "field, value, flag",
    [("alpha", -0.1, "--exact-alpha"), ("eps", 0.0, "--exact-eps"), ("tau", -1, "--exact-tau"),
     ("scope", "batch", "--exact-scope"), ("weighting", "Exact", "--loss-weighting")],
)
def test_bad_config_names_the_flag(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        ExactConfig(**{field: value})


def test_default_tau_is_quarter_sequence():
    assert ExactLoss(ExactConfig(), seq_length=4096).tau == 1024
    assert ExactLoss(ExactConfig(tau=100), seq_length=4096).tau == 100


def test_step_scope_loss_gradient_and_count_by_hand():
    mbs = microbatches()
    counts = hand_counts(mbs)
    assert counts[3] > 0 and counts[4] > 0
    weights = hand_weights(counts)
    assert max(weights) > 1.1

    losses = fake_token_losses(mbs)
    loss = ExactLoss(ExactConfig(weighting="exact", tau=TAU), seq_length=SEQ)
    outputs = run_step(loss, mbs, losses)
    edges = [0, 8, 16, 32, 64, 128]
    for mb, ce, (value, num_tokens, report) in zip(mbs, losses, outputs):
        pos, mask = mb.position_ids.view(-1).tolist(), mb.loss_mask.view(-1).tolist()
        w = [weights[next(b for b in range(5) if edges[b] <= p < edges[b + 1])] for p in pos]
        expected = sum(wi * c * m for wi, c, m in zip(w, ce.view(-1).tolist(), mask))
        assert value.item() == pytest.approx(expected, rel=1e-6)
        assert num_tokens.dtype == torch.int32 and num_tokens.item() == int(sum(mask))
        value.backward()
        # d loss / d CE_i = w_i * m_i: weights are constants, masked tokens get nothing.
        assert ce.grad.view(-1).tolist() == pytest.approx([wi * m for wi, m in zip(w, mask)], rel=1e-6)
        assert report["lm loss"].tolist() == pytest.approx([sum(c * m for c, m in zip(ce.view(-1).tolist(), mask)), sum(mask)], rel=1e-6)

    stats = loss.step_statistics()
    n = sum(counts)
    assert stats["bucket_tokens"] == counts and stats["tokens"] == n
    assert stats["bucket_weights"] == pytest.approx(weights, rel=1e-6)
    assert stats["bucket_lower_edges"] == edges[:5]
    assert stats["objective"] == pytest.approx(sum(o[0].item() for o in outputs) / n, rel=1e-6)
    ce_all = torch.cat([ce.detach().view(-1) for ce in losses])
    mask_all = torch.cat([mb.loss_mask.view(-1) for mb in mbs])
    bucket_all = torch.cat([bucket_index(mb.position_ids.view(-1)) for mb in mbs])
    assert stats["lm_loss"] == pytest.approx(float((ce_all * mask_all).sum()) / n, rel=1e-6)
    for b in range(5):
        selected = (bucket_all == b) & (mask_all > 0)
        if counts[b]:
            assert stats["bucket_ce_mean"][b] == pytest.approx(float(ce_all[selected].mean()), rel=1e-6)
        else:
            assert stats["bucket_ce_mean"][b] is None


def test_alpha_zero_is_bitwise_uniform():
    mbs = microbatches()
    results = {}
    for name, config in (("uniform", ExactConfig()), ("exact0", ExactConfig(weighting="exact", alpha=0.0, tau=TAU))):
        losses = fake_token_losses(mbs, seed=3)
        outputs = run_step(ExactLoss(config, seq_length=SEQ), mbs, losses)
        total = sum(o[0] for o in outputs)
        total.backward()
        results[name] = (total.detach(), [ce.grad for ce in losses], [o[1] for o in outputs])
    assert torch.equal(results["uniform"][0], results["exact0"][0])
    assert all(torch.equal(a, b) for a, b in zip(results["uniform"][1], results["exact0"][1]))
    assert all(torch.equal(a, b) for a, b in zip(results["uniform"][2], results["exact0"][2]))


def test_weights_normalization_divides_by_weight_sum_with_integer_count():
    mbs = microbatches()
    counts = hand_counts(mbs)
    weights = hand_weights(counts)
    weight_sum = sum(c * w for c, w in zip(counts, weights))
    losses = fake_token_losses(mbs, seed=5)
    plain = run_step(ExactLoss(ExactConfig(weighting="exact", tau=TAU), seq_length=SEQ), mbs, losses)
    normed = run_step(ExactLoss(ExactConfig(weighting="exact", tau=TAU, normalization="weights"), seq_length=SEQ), mbs, losses)
    n = sum(o[1].item() for o in normed)
    assert n == sum(counts) and all(o[1].dtype == torch.int32 for o in normed)
    # What Megatron computes: (sum of numerators) / (int token count) == sum w CE m / sum w m.
    weighted_sum = sum(o[0].item() for o in plain)
    assert sum(o[0].item() for o in normed) / n == pytest.approx(weighted_sum / weight_sum, rel=1e-6)


def test_microbatch_scope_weights_each_microbatch_by_its_own_counts():
    mbs = microbatches()
    losses = fake_token_losses(mbs, seed=7)
    loss = ExactLoss(ExactConfig(weighting="exact", tau=TAU, scope="microbatch"), seq_length=SEQ)
    outputs = run_step(loss, mbs, losses)
    per_mb_weights = [hand_weights(hand_counts([mb])) for mb in mbs]
    assert per_mb_weights[0] != per_mb_weights[3]
    edges = [0, 8, 16, 32, 64, 128]
    for mb, ce, (value, _, _), weights in zip(mbs, losses, outputs, per_mb_weights):
        w = [weights[next(b for b in range(5) if edges[b] <= p < edges[b + 1])] for p in mb.position_ids.view(-1).tolist()]
        expected = sum(wi * c * m for wi, c, m in zip(w, ce.view(-1).tolist(), mb.loss_mask.view(-1).tolist()))
        assert value.item() == pytest.approx(expected, rel=1e-6)
    # Mean weight per bucket over the step, as logged.
    all_counts = hand_counts(mbs)
    for b in (3, 4):
        mean = sum(hand_counts([mb])[b] * w[b] for mb, w in zip(mbs, per_mb_weights)) / all_counts[b]
        assert loss.step_statistics()["bucket_weights"][b] == pytest.approx(mean, rel=1e-6)


def test_context_parallel_split_keeps_effective_context():
    # The two CP ranks' shares of a packed micro-batch give the same counts and loss sum as the whole.
    generator = torch.Generator().manual_seed(11)
    docs = [torch.randint(0, 100, (n,), generator=generator).tolist() for n in (77, 33, 19)]
    batch = batch_from_documents(docs, SEQ)
    whole = pack_batch(batch)
    shares = [pack_batch(batch, context_parallel_size=2, context_parallel_rank=r) for r in range(2)]
    config = ExactConfig(weighting="exact", tau=TAU)
    reference = ExactLoss(config, seq_length=SEQ)
    reference.begin_step([whole])
    split = ExactLoss(config, seq_length=SEQ)
    split.begin_step(shares)  # both shares in one process = the sum an all-reduce over CP would give
    assert split.step_statistics()["bucket_tokens"] == reference.step_statistics()["bucket_tokens"]
    # Per-token CE as a function of the token's (document, position): equal in both layouts.
    def ce_of(mb):
        return ((mb.tokens.float() * 0.37 + mb.position_ids.float() * 0.11) % 3).requires_grad_()
    value_whole = reference.loss_func(whole, ce_of(whole))[0]
    value_split = sum(split.loss_func(mb, ce_of(mb))[0] for mb in shares)
    assert value_split.item() == pytest.approx(value_whole.item(), rel=1e-6)


def test_misuse_errors():
    mbs = microbatches()
    loss = ExactLoss(ExactConfig(weighting="exact", tau=TAU), seq_length=SEQ)
    with pytest.raises(RuntimeError, match="before begin_step"):
        loss.loss_func(mbs[0], torch.zeros(1, SEQ))
    loss.begin_step(mbs[:1])
    loss.loss_func(mbs[0], torch.zeros(1, SEQ))
    with pytest.raises(RuntimeError, match="begin_step saw 1"):
        loss.loss_func(mbs[0], torch.zeros(1, SEQ))
    too_long = ExactLoss(ExactConfig(), seq_length=32)
    with pytest.raises(ValueError, match="--seq-length 32"):
        too_long.begin_step(mbs)
