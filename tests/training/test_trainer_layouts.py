"""The layout guarantees through the real trainer: DP=2, TP=2 with sequence parallelism, PP=2 and
CP=2 (two ranks each) train the same 3 steps with the same per-iteration losses (fp32, 1e-5).

Every run starts from the same imported HF checkpoint (``--finetune``: PP stages would not draw the
same initial weights from a seed) and reads a weighted blend of two corpora of different sizes
(``0.3 large 0.7 small``) with a validation split, so these runs are also the blend's two-rank
training and validation runs. Flags of the paper's runs ride along where they must not change the
numbers: ``--use-distributed-optimizer`` and ``--data-cache-path`` (DP=2), ``--recompute-granularity
selective`` with ``--eval-iters 0`` (TP=2+SP), ``--recompute-granularity full`` (PP=2). Step 0 is also
checked against transformers' own model times independently computed EXACT weights. Each run saves
its final checkpoint: the probe logits every layout computes at save time are the same, and they are
what transformers computes on the export.
"""

from __future__ import annotations

import pytest

from tests import exact_reference as ref
from tests.training.conftest import launch, read_metrics, training_lines, transformers_batch

pytestmark = pytest.mark.slow  # multi-process runs

SEQ, GBS, ITERS = 128, 8, 3
TOLERANCE = 1e-5
LAYOUTS = {
    "dp2": ("--use-distributed-optimizer", "--data-cache-path", "{cache}"),
    "tp2sp": ("--tensor-model-parallel-size", "2", "--sequence-parallel", "--recompute-granularity", "selective",
              "--eval-iters", "0"),
    "pp2": ("--pipeline-model-parallel-size", "2", "--recompute-granularity", "full"),
    "cp2": ("--context-parallel-size", "2"),
}


def layout_flags(blend, tiny_hf, *extra) -> list[str]:
    return ["--hf-config", str(tiny_hf.directory), "--load", str(tiny_hf.checkpoint), "--finetune",
            "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", str(GBS),
            "--train-iters", str(ITERS), "--lr", "3e-3", "--lr-warmup-iters", "0", "--data-path", *blend.data_path,
            "--split", "90,10,0", "--eval-interval", str(ITERS), "--eval-iters", "1", "--log-interval", "1",
            "--loss-weighting", "exact", *extra]


@pytest.fixture(scope="module")
def runs(blend, tiny_hf, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trainer_layouts")
    results = {}
    for name, extra in LAYOUTS.items():
        metrics = root / f"{name}.jsonl"
        extra = [a.format(cache=root / "index_cache") for a in extra]
        save = ["--save", str(root / f"{name}_ckpt")]
        result = launch(layout_flags(blend, tiny_hf, "--metrics-file", str(metrics), *save, *extra), timeout=300)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        results[name] = {"stdout": result.stdout, "records": read_metrics(metrics)}
    results["root"] = root
    return results


def _train(runs, name):
    return [r for r in runs[name]["records"] if r.get("split") is None]


def _valid(runs, name):
    return [r for r in runs[name]["records"] if r.get("split") == "valid"]


@pytest.mark.parametrize("layout", ["tp2sp", "pp2", "cp2"])
def test_trainer_layouts_give_the_same_losses(runs, layout):
    reference, got = _train(runs, "dp2"), _train(runs, layout)
    assert [r["iteration"] for r in got] == [r["iteration"] for r in reference] == list(range(1, ITERS + 1))
    for ref_line, line in zip(reference, got):
        assert line["batch_sha1"] == ref_line["batch_sha1"]
        assert line["tokens"] == ref_line["tokens"]
        assert line["exact"]["bucket_tokens"] == ref_line["exact"]["bucket_tokens"]
        assert line["loss"] == pytest.approx(ref_line["loss"], rel=TOLERANCE), line["iteration"]
        assert line["lm_loss"] == pytest.approx(ref_line["lm_loss"], rel=TOLERANCE), line["iteration"]
        assert line["grad_norm"] == pytest.approx(ref_line["grad_norm"], rel=TOLERANCE), line["iteration"]
    # The steps really trained (the comparison is not between untouched copies of the checkpoint).
    assert reference[-1]["loss"] < reference[0]["loss"]


def test_weighted_blend_trains_and_validates_on_two_ranks(runs):
    for name in LAYOUTS:
        assert "(iteration 0, 0 samples consumed, weights only)" in runs[name]["stdout"]  # --finetune
    reference = _valid(runs, "dp2")
    assert [r["iteration"] for r in reference] == [ITERS] and reference[0]["tokens"] > 0
    for name in ("pp2", "cp2"):
        (line,) = _valid(runs, name)
        assert line["tokens"] == reference[0]["tokens"]
        assert line["lm_loss"] == pytest.approx(reference[0]["lm_loss"], rel=TOLERANCE)
    assert _valid(runs, "tp2sp") == []  # --eval-iters 0: trains, never validates


def test_trainer_draws_the_blend(runs, blend):
    """The trainer's batches are the blend's first 3 x 8 samples (as the counts of
    ``split_sample_counts`` build it), and both corpora are among them."""
    from megatron_exact.data.dataset import build_train_valid_test_datasets
    from megatron_exact.training.arguments import parse_args
    from megatron_exact.training.trainer import batch_sha1, split_sample_counts

    args = parse_args(["--model", "tiny-qwen2", "--seq-length", str(SEQ), "--lr", "1e-3", "--global-batch-size",
                       str(GBS), "--train-iters", str(ITERS), "--eval-iters", "1", "--data-path", *blend.data_path])
    train, _, _ = build_train_valid_test_datasets(blend.data_path, "90,10,0", SEQ, 1234, split_sample_counts(args))
    lines = _train(runs, "dp2")
    corpora = set()
    for step, line in enumerate(lines):
        samples = [train[step * GBS + i] for i in range(GBS)]
        assert batch_sha1(samples) == line["batch_sha1"]
        corpora |= {"small" if sample["tokens"].max() < ord("a") else "large" for sample in samples}
    assert corpora == {"large", "small"}


def test_data_cache_path_holds_the_indices(runs):
    cache = runs["root"] / "index_cache"
    names = [path.name for path in cache.iterdir()]
    for kind in ("document_index", "sample_index", "shuffle_index"):
        assert sum(name.endswith(f"ExactGPTDataset-train-{kind}.npy") for name in names) == 2, names  # per corpus
    assert any(name.endswith("BlendedDataset-train-dataset_index.npy") for name in names), names


def test_step0_exact_loss_equals_transformers_times_independent_weights(runs, blend, tiny_hf):
    """DP=2's first step: transformers' per-token cross-entropy on the logged batch, weighted by the
    reference bucket formula over the global batch, is the trainer's ``loss``."""
    from megatron_exact.data.dataset import build_train_valid_test_datasets
    from megatron_exact.training.trainer import batch_sha1

    train, _, _ = build_train_valid_test_datasets(blend.data_path, "90,10,0", SEQ, 1234, (ITERS * GBS, GBS, 0))
    samples = [train[i] for i in range(GBS)]
    first = _train(runs, "dp2")[0]
    assert batch_sha1(samples) == first["batch_sha1"]
    objective, lm_loss, targets = ref.exact_objective(transformers_batch(tiny_hf.model, samples), SEQ // 4,
                                                      ref.n_buckets_for(SEQ))
    assert first["tokens"] == targets
    assert first["lm_loss"] == pytest.approx(lm_loss, rel=TOLERANCE)
    assert first["loss"] == pytest.approx(objective, rel=TOLERANCE)
    assert objective > 1.01 * lm_loss


def test_probe_logits_are_the_same_in_every_layout_and_transformers_computes_them(runs, tmp_path):
    """The probe (``checkpoint/probe.py``) is gathered over TP (vocabulary), CP (rows) and from the last PP
    stage: every layout saves the same logits, and the HF export of the DP=2 checkpoint computes them."""
    from megatron_exact.checkpoint import find_checkpoint
    from megatron_exact.checkpoint.probe import read_probe
    from megatron_exact.convert.exporter import export_hf
    from megatron_exact.convert.verify import hf_logits, load_hf_model

    probes = {name: read_probe(find_checkpoint(runs["root"] / f"{name}_ckpt")[0]) for name in LAYOUTS}
    reference = probes["dp2"]
    assert reference.logits.shape == (len(reference.positions), 512)
    for name, probe in probes.items():
        assert probe.documents == reference.documents and probe.positions.tolist() == reference.positions.tolist()
        assert (probe.logits - reference.logits).abs().max().item() <= 1e-4, name
    exported = export_hf(runs["root"] / "dp2_ckpt", tmp_path / "hf")
    logits = hf_logits(load_hf_model(exported), reference.documents)[reference.positions]
    assert (logits - reference.logits).abs().max().item() <= 1e-4
