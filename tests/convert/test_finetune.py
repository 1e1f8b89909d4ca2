"""A converted checkpoint trains with ``--finetune``: the trainer's step-0 loss is transformers' loss.

The trainer (tools/pretrain_exact.py, one gloo process) loads the imported checkpoint and trains
with ``--loss-weighting exact``. The test rebuilds the first global batch from the same dataset (its
``batch_sha1`` must match the metrics line) and computes both logged losses outside the project:
transformers' per-token cross-entropy (one forward per document) averaged over the supervised targets
(``lm_loss``), and that cross-entropy times the EXACT weights of an independent re-implementation of
the bucket formula (``tests/exact_reference.py``) over the same targets (``loss``, the objective).
The vocabulary (512) needs no padding, so Megatron's softmax sees the same logits.
"""

import pytest
import torch

from tests import exact_reference as ref
from tests.training.conftest import byte_corpus, launch, tiny_hf, training_lines, transformers_batch  # noqa: F401

pytestmark = pytest.mark.slow  # multi-process runs

SEQ, MBS, GBS = 128, 2, 4
TAU = 32  # the default seq_length / 4: tail buckets [32, 64) and [64, 128)


def test_step0_loss_equals_transformers_and_trained_checkpoint_exports(byte_corpus, tiny_hf, tmp_path):  # noqa: F811
    from megatron_exact.convert.exporter import export_hf
    from megatron_exact.convert.verify import load_hf_model
    from megatron_exact.data.dataset import build_train_valid_test_datasets
    from megatron_exact.training.trainer import batch_sha1

    metrics, cache = tmp_path / "metrics.jsonl", tmp_path / "cache"
    flags = [
        "--hf-config", str(tiny_hf.directory), "--load", str(tiny_hf.checkpoint), "--finetune",
        "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--global-batch-size", str(GBS),
        "--train-iters", "1", "--lr", "1e-4", "--eval-iters", "0", "--log-interval", "1",
        "--data-path", byte_corpus, "--split", "90,10,0", "--data-cache-path", str(cache),
        "--loss-weighting", "exact", "--metrics-file", str(metrics),
        "--save", str(tmp_path / "trained"), "--save-interval", "1",
    ]
    result = launch(flags, nproc=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    (first,) = training_lines(metrics)

    train, _, _ = build_train_valid_test_datasets([byte_corpus], "90,10,0", SEQ, 1234, (GBS, 0, 0), cache_path=str(cache))
    samples = [train[i] for i in range(GBS)]
    assert batch_sha1(samples) == first["batch_sha1"]

    objective, lm_loss, targets = ref.exact_objective(transformers_batch(tiny_hf.model, samples), TAU,
                                                      ref.n_buckets_for(SEQ))
    assert first["tokens"] == targets
    assert abs(first["lm_loss"] - lm_loss) <= 1e-5 * lm_loss, (first["lm_loss"], lm_loss)
    assert abs(first["loss"] - objective) <= 1e-5 * objective, (first["loss"], objective)
    assert objective > lm_loss * 1.01  # the tail is up-weighted on this batch: the two checks differ

    # The trainer's own checkpoint (optimizer state and all) exports; logits agree with it (--verify),
    # the weights moved, the token ids come from the --hf-config the run recorded except EOS, which is the
    # data's end-of-document id (ByteTokenizer's 256).
    out = export_hf(tmp_path / "trained", tmp_path / "trained_hf", verify=True, verify_tolerance=1e-4)
    exported = load_hf_model(out)
    assert exported.config.eos_token_id == 256 and exported.config.bos_token_id == 1
    assert not torch.equal(exported.model.embed_tokens.weight, tiny_hf.model.model.embed_tokens.weight)
