"""Weighted ``--data-path`` blends with the sample counts the trainer asks for.

The two corpora of the ``blend`` fixture are told apart by their tokens (lower- vs upper-case text),
so the share of each corpus among the samples drawn is measured from the tokens themselves. The
two-rank trainer runs over the same blend (training, validation, ``--eval-iters 0``,
``--split 100,0,0``) are in test_trainer_layouts.py and test_paper_configuration.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_exact.data.dataset import build_train_valid_test_datasets
from megatron_exact.training.arguments import parse_args
from megatron_exact.training.trainer import split_sample_counts

SEQ = 128
LOWER = np.arange(ord("a"), ord("z") + 1)
UPPER = np.arange(ord("A"), ord("Z") + 1)


def trainer_args(data_path, *extra):
    return parse_args(["--model", "tiny-qwen2", "--seq-length", str(SEQ), "--lr", "1e-3", "--global-batch-size", "8",
                       "--data-path", *data_path, *extra])


def build(blend_or_path, args):
    return build_train_valid_test_datasets(list(blend_or_path), args.split, SEQ, args.seed, split_sample_counts(args))


def test_sample_counts_follow_megatron_lm():
    args = trainer_args(["p"], "--train-iters", "250", "--eval-iters", "3")
    assert split_sample_counts(args) == (250 * 8, 3 * 8, 0)  # the test part is never read
    assert split_sample_counts(trainer_args(["p"], "--train-iters", "5", "--eval-iters", "0")) == (40, 0, 0)


def test_blend_weights_are_respected_over_an_epoch(blend):
    """Over all samples of the blended training set (one epoch of it: 250 steps of 8), the share of
    tokens from each corpus is its weight, within 3 standard deviations of a binomial draw of that many
    samples; the corpora's sizes (7:1 in tokens) would give other shares."""
    args = trainer_args(blend.data_path, "--train-iters", "250", "--eval-iters", "2", "--split", "90,10,0")
    train, valid, test = build(blend.data_path, args)
    assert test is None and len(valid) >= 16
    n = len(train)
    assert n >= 2000
    tokens = {"large": 0, "small": 0}
    for index in range(n):
        sample = train[index]["tokens"].numpy()
        lower, upper = np.isin(sample, LOWER).sum(), np.isin(sample, UPPER).sum()
        assert (lower == 0) != (upper == 0), f"sample {index} mixes the corpora or has no letters"
        tokens["large" if lower else "small"] += len(sample)  # every token of the sample, EOD included
    share = tokens["large"] / (tokens["large"] + tokens["small"])
    weight = blend.weights[0] / sum(blend.weights)
    tolerance = 3 * math.sqrt(weight * (1 - weight) / n)  # 0.031 for 2000 samples
    assert abs(share - weight) <= tolerance, (share, weight, tolerance)

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = [IndexedDataset(p) for p in (blend.large, blend.small)]  # kept: its arrays map its files
    sizes = [int(dataset.sequence_lengths.sum()) for dataset in indexed]
    by_size = sizes[0] / sum(sizes)
    assert by_size > 0.8 and abs(by_size - weight) > 10 * tolerance


def test_blend_without_validation_builds(blend):
    """``--eval-iters 0`` (validation requested from no part) and ``--split 100,0,0`` (no valid part)."""
    train, valid, _ = build(blend.data_path, trainer_args(blend.data_path, "--train-iters", "3", "--eval-iters", "0",
                                                         "--split", "90,10,0"))
    assert len(train) >= 24 and len(valid) == 0
    train, valid, test = build(blend.data_path, trainer_args(blend.data_path, "--train-iters", "3",
                                                            "--split", "100,0,0"))
    assert len(train) >= 24 and valid is None and test is None


@pytest.mark.timeout(120)  # Megatron-Core alone loops forever here
def test_samples_requested_from_an_empty_part_are_an_error(blend):
    """The small corpus has 60 documents: a 0.5% validation part holds none of them. Asking it for
    validation samples is an error naming the corpus and the split; asking nothing of it is fine."""
    with pytest.raises(ValueError, match=r"upper_text_document: the valid part of split '995,5,0' holds none of its "
                                         r"60 documents, but \d+ samples were requested"):
        build(blend.data_path, trainer_args(blend.data_path, "--train-iters", "3", "--split", "995,5,0"))
    train, valid, _ = build(blend.data_path, trainer_args(blend.data_path, "--train-iters", "3", "--eval-iters", "0",
                                                         "--split", "995,5,0"))
    assert len(train) >= 24 and len(valid) == 0
