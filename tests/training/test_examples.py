"""Every example script's trainer flags parse with the trainer's own parser (DRY_RUN=1 prints them)."""

from __future__ import annotations

import os
import subprocess

import pytest

from megatron_exact.training.arguments import build_parser, resolve_arch
from tests.training.conftest import REPO

PAIRS = ("qwen2.5-0.5b-4k", "qwen2.5-0.5b-8k", "qwen2.5-0.5b-16k", "llama3.2-3b-16k", "qwen2.5-0.5b-32k",
         "llama3.2-3b-64k")


def dry_run(script, *argv, **env) -> list[str]:
    result = subprocess.run(["bash", str(REPO / "examples" / script), *argv], cwd=REPO, capture_output=True,
                            text=True, env=dict(os.environ, DRY_RUN="1", **env), timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def parse(flags):
    try:
        return build_parser().parse_args(flags)
    except SystemExit:
        pytest.fail(f"flags rejected by the trainer's parser: {flags}")


def test_tiny_cpu_example_parses():
    args = parse(dry_run("tiny_cpu/run.sh"))
    assert args.model == "tiny-qwen2" and args.loss_weighting == "exact"


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("script", ["cpt/pretrain_pair.sh", "cpt/slurm_pair.sbatch"])
def test_paired_runs_parse_and_differ_only_in_loss_weighting(script, pair):
    if script.endswith(".sbatch"):
        uniform = dry_run(script, PAIR=pair, WEIGHTING="uniform")
        exact = dry_run(script, PAIR=pair, WEIGHTING="exact")
    else:
        uniform, exact = dry_run(script, pair, "uniform"), dry_run(script, pair, "exact")
    args_u, args_e = parse(uniform), parse(exact)
    assert (args_u.loss_weighting, args_e.loss_weighting) == ("uniform", "exact")
    differing = {k for k in vars(args_u) if getattr(args_u, k) != getattr(args_e, k)}
    assert differing <= {"loss_weighting", "save", "metrics_file", "tensorboard_dir"}, differing
    assert args_u.finetune and args_u.load  # CPT starts from the converted HF checkpoint
    assert args_u.use_distributed_optimizer  # its checkpoints reload: tests/training/test_runs.py
    arch = resolve_arch(args_u)
    assert args_u.seq_length == int(pair.split("-")[-1][:-1]) * 1024
    tp = args_u.tensor_model_parallel_size
    assert arch.num_attention_heads % tp == 0 and arch.num_query_groups % tp == 0
    # Every pair trains the same tokens per step; long contexts stay inside the model's positions
    # and fit one 8-GPU node (the per-GPU tokens documented in pair_args.sh).
    assert args_u.seq_length * args_u.global_batch_size == 512 * 1024
    assert args_u.seq_length <= arch.max_position_embeddings
    assert 8 % (tp * args_u.context_parallel_size) == 0
    assert args_u.seq_length // (tp * args_u.context_parallel_size) <= 8192


def test_unknown_pair_is_refused():
    result = subprocess.run(["bash", str(REPO / "examples" / "cpt" / "pretrain_pair.sh"), "gpt2-1k", "exact"],
                            cwd=REPO, capture_output=True, text=True, env=dict(os.environ, DRY_RUN="1"), timeout=30)
    assert result.returncode != 0 and "unknown pair 'gpt2-1k'" in result.stderr
