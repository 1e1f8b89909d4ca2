"""Same global batch, same weights, different parallel layouts: same loss and gradients.

Real multi-process ``gloo`` runs of ``layout_run.py`` (one reference process,
then one ``torchrun`` of two processes that goes through every layout). The
reference is DP=1 with 4 micro-batches; the layouts are DP=2 (2 micro-batches
each), TP=2, TP=2 with sequence parallelism, PP=2 and CP=2 (4 micro-batches), and
CP=4 (four processes, every document cut into 8 chunks),
for the EXACT objective (scope step, both normalizations) and the uniform one;
and scope microbatch, which must match wherever the micro-batch split is
kept (TP, PP, CP) and must not with DP=2.
Documents have random odd lengths, so the CP and SP padding paths run.

This also covers the foundation's acceptance (issue 2): a tiny Qwen2-style
model (GQA, QKV bias, tied embeddings) gives the same loss with TP=1/2,
PP=1/2 and CP=1/2; and a tiny Qwen3 (QK-norm) gives the reference loss and
gradients with TP=2, TP=2 with sequence parallelism and CP=2.
"""

import json
import sys
from pathlib import Path

import pytest

from tests.launch import run_checked, torchrun_command

pytestmark = pytest.mark.slow  # multi-process runs

HARNESS = Path(__file__).with_name("layout_run.py")
LAYOUTS = ("dp2", "tp2", "tp2sp", "pp2", "cp2")
OBJECTIVES = ("exact", "exact-weights", "uniform")  # scope step: must not depend on the layout
SPLIT_PRESERVING_LAYOUTS = ("tp2", "tp2sp", "pp2", "cp2")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("layouts")
    run_checked([sys.executable, HARNESS, "reference", "--workdir", directory], timeout=300)
    run_checked(torchrun_command(HARNESS, "layouts", "--workdir", directory, "--layouts", *LAYOUTS), timeout=600)
    return directory


@pytest.fixture(scope="module")
def cp4_workdir(workdir, tmp_path_factory):
    """CP=4 on four processes, from the reference run's weights, gradients and statistics."""
    import shutil

    directory = tmp_path_factory.mktemp("layouts_cp4")
    shutil.copytree(workdir / "weights", directory / "weights")
    for part in ("grads", "results"):
        for reference in (workdir / part).glob("reference-*"):
            copy = shutil.copytree if reference.is_dir() else shutil.copy
            (directory / part).mkdir(exist_ok=True)
            copy(reference, directory / part / reference.name)
    run_checked(torchrun_command(HARNESS, "layouts", "--workdir", directory, "--layouts", "cp4", nproc=4), timeout=600)
    return directory


@pytest.mark.parametrize("objective", OBJECTIVES + ("exact-microbatch",))
def test_context_parallel_over_four_ranks_gives_reference_loss_and_gradients(cp4_workdir, objective):
    reference, stats = _stats(cp4_workdir, f"reference-{objective}"), _stats(cp4_workdir, f"cp4-{objective}")
    assert stats["tokens"] == reference["tokens"] and stats["bucket_tokens"] == reference["bucket_tokens"]
    assert stats["bucket_weights"] == pytest.approx(reference["bucket_weights"], rel=1e-7)
    assert stats["objective"] == pytest.approx(reference["objective"], rel=TOLERANCE)
    assert stats["lm_loss"] == pytest.approx(reference["lm_loss"], rel=TOLERANCE)
    result = json.loads((cp4_workdir / "comparison.json").read_text())[f"cp4-{objective}"]
    assert result["grad_norm"] > 0
    assert result["max_relative_grad_diff"] <= TOLERANCE, result


# Qwen3 (QK-norm, explicit head_dim, no QKV bias): the QK-norm weights' gradients are summed over TP by
# Megatron-Core's finalize_model_grads (each TP rank holds other heads), with and without SP.
QWEN3_LAYOUTS = ("tp2", "tp2sp", "cp2")


@pytest.fixture(scope="module")
def qwen3_workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("layouts_qwen3")
    common = ["--workdir", directory, "--preset", "tiny-qwen3", "--objectives", "exact"]
    run_checked([sys.executable, HARNESS, "reference", *common], timeout=300)
    run_checked(torchrun_command(HARNESS, "layouts", *common, "--layouts", *QWEN3_LAYOUTS), timeout=600)
    return directory


@pytest.mark.parametrize("layout", QWEN3_LAYOUTS)
def test_qwen3_layout_gives_reference_loss_and_gradients(qwen3_workdir, layout):
    reference, stats = _stats(qwen3_workdir, "reference-exact"), _stats(qwen3_workdir, f"{layout}-exact")
    assert stats["tokens"] == reference["tokens"]
    assert stats["objective"] == pytest.approx(reference["objective"], rel=TOLERANCE)
    assert stats["lm_loss"] == pytest.approx(reference["lm_loss"], rel=TOLERANCE)
    result = json.loads((qwen3_workdir / "comparison.json").read_text())[f"{layout}-exact"]
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in result["parameters"]
    assert "decoder.layers.1.self_attention.k_layernorm.weight" in result["parameters"]
    assert result["grad_norm"] > 0
    assert result["max_relative_grad_diff"] <= TOLERANCE, result


def _stats(workdir, run):
    return json.loads((workdir / "results" / f"{run}.json").read_text())


def test_reference_batch_has_a_weighted_tail(workdir):
    stats = _stats(workdir, "reference-exact")
    tail = [b for b, edge in enumerate(stats["bucket_lower_edges"]) if edge >= stats["tau"]]
    assert sum(stats["bucket_tokens"][b] > 0 for b in tail) >= 2
    assert max(stats["bucket_weights"]) >= 1.1
    assert all(stats["bucket_weights"][b] == 1.0 for b in range(len(stats["bucket_weights"])) if b not in tail)
    uniform = _stats(workdir, "reference-uniform")
    # Same tokens, same cross-entropy; the weighted objective is visibly different.
    assert stats["lm_loss"] == pytest.approx(uniform["lm_loss"], rel=1e-12)
    assert stats["objective"] > uniform["objective"] * 1.01
    assert uniform["objective"] == pytest.approx(uniform["lm_loss"], rel=1e-6)


def test_microbatch_scope_depends_on_the_split(workdir):
    # Scope "microbatch" is the ablation whose weights follow the micro-batch split: with DP=2 the
    # k-th micro-batch pairs samples 2k and 2k+1, unlike the reference; TP/PP/CP keep the split.
    # (The objective barely moves: every micro-batch's tail gets the same extra mass alpha; where it goes moves.)
    reference, dp2 = _stats(workdir, "reference-exact-microbatch"), _stats(workdir, "dp2-exact-microbatch")
    assert dp2["lm_loss"] == pytest.approx(reference["lm_loss"], rel=TOLERANCE)
    assert max(abs(a - b) for a, b in zip(dp2["bucket_weights"], reference["bucket_weights"])) > 1e-3
    comparison = json.loads((workdir / "comparison.json").read_text())
    assert comparison["dp2-exact-microbatch"]["max_relative_grad_diff"] > 1e-3


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_gives_reference_loss(workdir, layout, objective):
    reference, stats = _stats(workdir, f"reference-{objective}"), _stats(workdir, f"{layout}-{objective}")
    assert stats["tokens"] == reference["tokens"]
    assert stats["bucket_tokens"] == reference["bucket_tokens"]
    assert stats["bucket_weights"] == pytest.approx(reference["bucket_weights"], rel=1e-7)
    assert stats["objective"] == pytest.approx(reference["objective"], rel=TOLERANCE)
    assert stats["lm_loss"] == pytest.approx(reference["lm_loss"], rel=TOLERANCE)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_gives_reference_gradients(workdir, layout, objective):
    comparison = json.loads((workdir / "comparison.json").read_text())
    result = comparison[f"{layout}-{objective}"]
    assert result["grad_norm"] > 0
    assert result["max_relative_grad_diff"] <= TOLERANCE, result


@pytest.mark.parametrize("layout", SPLIT_PRESERVING_LAYOUTS)
def test_microbatch_scope_is_layout_invariant_for_the_same_split(workdir, layout):
    reference, stats = _stats(workdir, "reference-exact-microbatch"), _stats(workdir, f"{layout}-exact-microbatch")
    assert stats["bucket_weights"] == pytest.approx(reference["bucket_weights"], rel=1e-7)
    assert stats["objective"] == pytest.approx(reference["objective"], rel=TOLERANCE)
    comparison = json.loads((workdir / "comparison.json").read_text())
    assert comparison[f"{layout}-exact-microbatch"]["max_relative_grad_diff"] <= TOLERANCE
