"""A converted checkpoint trains with ``--finetune``: the trainer's loss at step 0 equals transformers' loss.

The trainer (tools/pretrain_exact.py, one gloo process) loads the imported
checkpoint and logs the unweighted loss of its first global batch. The test
rebuilds that batch from the same dataset (its ``batch_sha1`` must match the
metrics line) and computes the loss with the original transformers model, one
forward per document, cross-entropy averaged over the supervised targets. The
vocabulary (512) needs no padding, so Megatron's softmax sees the same logits.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.convert.tiny_hf_models import build_hf_model
from tests.training.conftest import byte_corpus, launch, training_lines  # noqa: F401  (byte_corpus is a fixture)

pytestmark = pytest.mark.slow  # multi-process runs

SEQ, MBS, GBS = 128, 2, 4


def test_step0_loss_equals_transformers_and_trained_checkpoint_exports(byte_corpus, tmp_path):  # noqa: F811
    from transformers import Qwen2Config

    from megatron_exact.convert.exporter import export_hf
    from megatron_exact.convert.importer import import_hf
    from megatron_exact.data.dataset import build_train_valid_test_datasets
    from megatron_exact.convert.verify import load_hf_model
    from megatron_exact.training.trainer import batch_sha1

    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    hf_model = build_hf_model(config, seed=5)
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(str(hf_dir))
    checkpoint = import_hf(hf_dir, tmp_path / "ckpt").parent

    metrics, cache = tmp_path / "metrics.jsonl", tmp_path / "cache"
    flags = [
        "--hf-config", str(hf_dir), "--load", str(checkpoint), "--finetune",
        "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--global-batch-size", str(GBS),
        "--train-iters", "1", "--lr", "1e-4", "--eval-iters", "0", "--log-interval", "1",
        "--data-path", byte_corpus, "--split", "90,10,0", "--data-cache-path", str(cache),
        "--loss-weighting", "uniform", "--metrics-file", str(metrics),
        "--save", str(tmp_path / "trained"), "--save-interval", "1",
    ]
    result = launch(flags, nproc=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    (first,) = training_lines(metrics)

    train, _, _ = build_train_valid_test_datasets([byte_corpus], "90,10,0", SEQ, 1234, (GBS, None, None), cache_path=str(cache))
    samples = [train[i] for i in range(GBS)]
    assert batch_sha1(samples) == first["batch_sha1"]

    ce_sum, targets = 0.0, 0.0
    with torch.no_grad():
        for sample in samples:
            tokens, labels = torch.as_tensor(sample["tokens"]), torch.as_tensor(sample["labels"])
            mask = torch.as_tensor(sample["loss_mask"]).double()
            bounds = torch.as_tensor(sample["cu_seqlens"]).tolist()
            for start, end in zip(bounds[:-1], bounds[1:]):
                if end > start:
                    logits = hf_model(tokens[start:end].unsqueeze(0)).logits[0].double()
                    ce = F.cross_entropy(logits, labels[start:end], reduction="none")
                    ce_sum += (ce * mask[start:end]).sum().item()
                    targets += mask[start:end].sum().item()
    assert first["tokens"] == targets
    assert abs(first["lm_loss"] - ce_sum / targets) <= 1e-5 * (ce_sum / targets), (first["lm_loss"], ce_sum / targets)
    assert abs(first["loss"] - first["lm_loss"]) <= 1e-6 * first["lm_loss"]  # uniform weighting

    # The trainer's own checkpoint (optimizer state and all) exports; logits agree with it (--verify),
    # the weights moved, and the token ids come from the --hf-config the run recorded.
    out = export_hf(tmp_path / "trained", tmp_path / "trained_hf", verify=True, verify_tolerance=1e-4)
    exported = load_hf_model(out)
    assert exported.config.eos_token_id == 2 and exported.config.bos_token_id == 1
    assert not torch.equal(exported.model.embed_tokens.weight, hf_model.model.embed_tokens.weight)
