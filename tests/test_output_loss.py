"""The fused output layer + loss (megatron_exact.model.output_loss) against the plain path.

Truths: torch's own ``cross_entropy`` over dense logits (the autograd
function alone, fp32 and a float64 gradcheck), and Megatron-Core's plain
vocab-parallel path on the same model and batch (tests/output_loss_check.py):
EXACT's weighted loss and every parameter gradient agree to 1e-5 (relative to
the largest gradient) at TP=1, with micro-batch size 3 packed into one row and
with selective/full recompute, and at TP=2 with and without sequence
parallelism (two gloo processes).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_exact.platform import setup_platform

setup_platform()

from megatron_exact.model.output_loss import ChunkedVocabParallelCrossEntropy, FusedOutputLoss  # noqa: E402
from tests import output_loss_check  # noqa: E402
from tests.launch import run_checked, torchrun_command  # noqa: E402

TOLERANCE = 1e-5


def dense_problem(tokens=37, width=16, vocab=50, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, width, generator=generator, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, width, generator=generator, dtype=dtype) * 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    token_weights = torch.rand(tokens, generator=generator, dtype=dtype) * 2  # EXACT-like weights, some near 0
    return hidden, weight, labels, token_weights


@pytest.mark.parametrize("chunk_tokens", [1, 8, 37, 1000])
def test_chunked_cross_entropy_matches_torch(chunk_tokens):
    hidden, weight, labels, token_weights = dense_problem()
    reference = F.cross_entropy(hidden @ weight.t(), labels, reduction="none")
    (reference * token_weights).sum().backward()
    expected = (reference.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None

    losses = ChunkedVocabParallelCrossEntropy.apply(hidden, weight, labels, 0, chunk_tokens, None)
    (losses * token_weights).sum().backward()
    torch.testing.assert_close(losses.detach(), expected[0], rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(hidden.grad, expected[1], rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(weight.grad, expected[2], rtol=TOLERANCE, atol=TOLERANCE)


def test_chunked_cross_entropy_gradcheck():
    hidden, weight, labels, _ = dense_problem(tokens=7, width=4, vocab=9, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: ChunkedVocabParallelCrossEntropy.apply(h, w, labels, 0, 3, None), (hidden, weight))


def test_fused_output_loss_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="one of"):
        FusedOutputLoss(impl="fast")
    with pytest.raises(ValueError, match="chunk_tokens"):
        FusedOutputLoss(chunk_tokens=0)


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-llama3"])  # tied and untied output weights
@pytest.mark.parametrize("recompute", [None, "selective", "full"])
def test_fused_loss_equals_plain_path_tp1(single_process_group, preset, recompute):
    result = output_loss_check.compare(preset, recompute=recompute)
    assert result["tokens"] == 3 * output_loss_check.SEQ  # micro-batch of 3 samples, one packed row
    assert result["max_weight"] > 1.05  # the EXACT tail is weighted, so the per-token weights matter
    assert result["loss_diff"] <= TOLERANCE * result["loss"]
    assert result["token_loss_diff"] <= TOLERANCE
    assert result["grad_diff"] <= TOLERANCE * result["grad_scale"], result


@pytest.mark.slow  # two processes
def test_fused_loss_equals_plain_path_tp2(single_process_group, tmp_path):
    out = tmp_path / "tp2.json"
    run_checked(torchrun_command(Path(output_loss_check.__file__), "--out", out, nproc=2), timeout=300)
    tp1_loss = {preset: output_loss_check.compare(preset)["loss"] for preset in ("tiny-qwen2", "tiny-llama3")}
    for rank in (0, 1):
        results = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert set(results) == {f"{p}-tp2{sp}" for p in ("tiny-qwen2", "tiny-llama3") for sp in ("", "-sp")}
        for name, result in results.items():
            assert result["loss_diff"] <= TOLERANCE * result["loss"], (rank, name, result)
            assert result["token_loss_diff"] <= TOLERANCE, (rank, name, result)
            assert result["grad_diff"] <= TOLERANCE * result["grad_scale"], (rank, name, result)
            # The model's loss, not a shard's: the TP=1 model (same seed, same weights) has it too.
            assert result["loss"] == pytest.approx(tp1_loss[name.split("-tp2")[0]], rel=TOLERANCE)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
