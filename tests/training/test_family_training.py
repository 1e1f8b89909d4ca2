"""The trainer trains every newer family from its HF import: Qwen3 (QK-norm) and Mistral.

A tiny random HF model of each (built locally, vocabulary 512: no padding, so Megatron's softmax
sees transformers' logits) is imported and trained for one step with ``--hf-config ... --load ...
--finetune`` (the real ``Trainer``, one rank, in this process). The logged step-0 ``lm_loss`` must
equal transformers' own per-token cross-entropy of the same global batch (one forward per document),
averaged over the supervised targets; the batch is rebuilt from the dataset and checked by its
``batch_sha1``. Layouts (TP/SP/CP) of the same model: tests/parallel/test_layouts.py.
"""

import pytest

from tests import exact_reference as ref
from tests.convert.tiny_hf_models import build_hf_model, hf_config
from tests.training.conftest import training_lines, transformers_batch

pytestmark = pytest.mark.slow  # trainings

SEQ, GBS = 64, 2


@pytest.mark.parametrize("name", ["qwen3-tied", "mistral-v0.3"])
def test_step0_loss_equals_transformers(name, byte_corpus, in_process_trainers, tmp_path):
    from megatron_exact.convert.importer import import_hf
    from megatron_exact.data.dataset import build_train_valid_test_datasets
    from megatron_exact.training.trainer import batch_sha1

    model = build_hf_model(hf_config(name, vocab_size=512), seed=7)
    model.save_pretrained(str(tmp_path / "hf"))
    checkpoint = import_hf(tmp_path / "hf", tmp_path / "ckpt").parent
    metrics, cache = tmp_path / "metrics.jsonl", tmp_path / "cache"
    trainer = in_process_trainers([
        "--hf-config", str(tmp_path / "hf"), "--load", str(checkpoint), "--finetune",
        "--seq-length", str(SEQ), "--micro-batch-size", "1", "--global-batch-size", str(GBS),
        "--train-iters", "1", "--lr", "1e-4", "--eval-iters", "0", "--log-interval", "1",
        "--data-path", byte_corpus, "--split", "90,10,0", "--data-cache-path", str(cache),
        "--loss-weighting", "uniform", "--metrics-file", str(metrics),
    ])
    trainer.train()
    trainer.close()
    (first,) = training_lines(metrics)

    train, _, _ = build_train_valid_test_datasets([byte_corpus], "90,10,0", SEQ, 1234, (GBS, 0, 0), cache_path=str(cache))
    samples = [train[i] for i in range(GBS)]
    assert batch_sha1(samples) == first["batch_sha1"]
    _, lm_loss, targets = ref.exact_objective(transformers_batch(model, samples), SEQ // 4, ref.n_buckets_for(SEQ))
    assert first["tokens"] == targets
    assert abs(first["lm_loss"] - lm_loss) <= 1e-5 * lm_loss, (first["lm_loss"], lm_loss)
