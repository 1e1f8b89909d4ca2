"""``--eval-probe SPEC``: the distance-resolved evidence probe on the trainer's own model.

At every ``--eval-interval`` (and at the end, as validation) the trainer scores the probe's
samples (:mod:`megatron_exact.eval.probe`: teacher-forced log-probabilities of the candidate
answers, no generation) with the evidence present and ablated, and logs accuracy and mean
margin per distance to the metrics file and tensorboard. The samples and the scoring are the
offline probe's own (``python -m megatron_exact.eval probe``), and the prompts are encoded with
the HF tokenizer files ``export-hf`` writes for the run's tokenizer, so the logged numbers are
the ones the offline probe gives on the exported checkpoint with the same specification and seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from typing import Callable, Optional

import torch

from megatron_exact.errors import UserError
from megatron_exact.training.arguments import ConfigError

SUPPORTED_TOKENIZERS = ("ByteTokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer")


def probe_codec(tokenizer_record: dict):
    """A codec (``encode``/``bos``) over the HF tokenizer files ``export-hf`` writes for this
    tokenizer, checked to give the ids the run trains with."""
    from transformers import AutoTokenizer

    from megatron_exact.data.tokenizers import check_hf_tokenizer_ids, save_hf_tokenizer
    from megatron_exact.eval.codec import TokenizerCodec

    kind = tokenizer_record["tokenizer_type"]
    if kind not in SUPPORTED_TOKENIZERS:
        raise ConfigError(f"--eval-probe needs a tokenizer transformers can load to encode the task specification "
                          f"({', '.join(SUPPORTED_TOKENIZERS)}); the run's is {kind}")
    with tempfile.TemporaryDirectory(prefix="eval-probe-tokenizer-") as scratch:
        try:
            save_hf_tokenizer(tokenizer_record, scratch)
            check_hf_tokenizer_ids(scratch, tokenizer_record)
        except UserError as err:
            raise ConfigError(f"--eval-probe: {err}") from None
        return TokenizerCodec(AutoTokenizer.from_pretrained(scratch, local_files_only=True))


def build_probe_samples(args: argparse.Namespace, tokenizer_record: dict, vocab_size: int) -> list:
    """The probe's samples for the ``--eval-probe*`` flags (the distance sweep at
    ``--eval-probe-length``); raises :class:`ConfigError` naming the flag."""
    from megatron_exact.eval import probe
    from megatron_exact.eval.spec import load_spec

    if args.pipeline_model_parallel_size > 1:
        raise ConfigError("--eval-probe does not run with --pipeline-model-parallel-size > 1 yet: "
                          "probe the exported checkpoint with python -m megatron_exact.eval probe instead")
    try:
        spec = load_spec(args.eval_probe)
    except UserError as err:
        raise ConfigError(f"--eval-probe: {err}") from None
    length = args.eval_probe_length or args.seq_length
    if length < 1 or length > args.seq_length:
        raise ConfigError(f"--eval-probe-length {length}: must be in [1, --seq-length {args.seq_length}]")
    if args.eval_probe_samples < 1:
        raise ConfigError(f"--eval-probe-samples must be positive, got {args.eval_probe_samples}")
    distances = args.eval_probe_distances or probe.default_distances(length)  # the offline probe's default
    if any(d < 0 for d in distances):
        raise ConfigError(f"--eval-probe-distances {' '.join(map(str, distances))}: must be >= 0")
    args.eval_probe_distances = sorted(set(distances))
    key = json.dumps([dataclasses.asdict(spec), length, args.eval_probe_distances, args.eval_probe_samples,
                      args.eval_probe_seed, tokenizer_record, vocab_size], sort_keys=True, default=repr)
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = _sweep(args, tokenizer_record, vocab_size, spec, length)
    return _BUILT[key]


# The samples of the last build_probe_samples call, by its inputs: validate_args builds them (to
# check the flags at start-up), the trainer then takes the same list instead of building it again.
_BUILT: dict = {}


def _sweep(args: argparse.Namespace, tokenizer_record: dict, vocab_size: int, spec, length: int) -> list:
    from megatron_exact.eval import probe

    codec = probe_codec(tokenizer_record)
    try:
        samples = probe.distance_sweep(spec, codec, length=length, distances=args.eval_probe_distances,
                                       num_samples=args.eval_probe_samples, seed=args.eval_probe_seed)
    except UserError as err:
        flag = "--eval-probe-distances/--eval-probe-length" if "does not fit" in str(err) else "--eval-probe"
        raise ConfigError(f"{flag}: {err}") from None
    largest = max(max(s.present + [t for c in s.candidate_ids for t in c]) for s in samples)
    if largest >= vocab_size:
        raise ConfigError(f"--eval-probe {args.eval_probe}: the specification's text encodes to token id {largest}, "
                          f"outside the model's vocabulary ({vocab_size}, --vocab-size)")
    return samples


def probe_record(iteration: int, args: argparse.Namespace, records: list) -> dict:
    """The metrics-file record of one probe evaluation: one cell per distance (as the offline probe's table)."""
    from megatron_exact.eval.probe import summarize

    return {"iteration": iteration, "split": "eval_probe", "spec": args.eval_probe, "seed": args.eval_probe_seed,
            "cells": summarize(records)}


def run_probe(samples: list, logits_fn: Callable[[torch.Tensor, int], torch.Tensor], *, rank: int = 0,
              size: int = 1, all_gather: Optional[Callable[[list], list]] = None) -> list:
    """Per-sample records of the offline probe's scoring over ``logits_fn`` (collective when it is),
    in the samples' order. Over ``size`` data-parallel replicas, replica ``rank`` scores
    ``samples[rank::size]`` and ``all_gather`` (this replica's records -> every replica's, by rank)
    puts them together."""
    from megatron_exact.eval.backend import ForwardScorer
    from megatron_exact.eval.probe import score_samples

    records = score_samples(ForwardScorer(logits_fn), samples[rank::size])
    if size == 1:
        return records
    shares = all_gather(records)
    return [shares[i % size][i // size] for i in range(len(samples))]


def scalars(record: dict) -> dict:
    """Tensorboard/W&B scalars of a probe record: ``<metric>/d<distance>``."""
    values: dict = {}
    for cell in record["cells"]:
        for metric in ("accuracy_present", "accuracy_ablated", "margin_present", "margin_ablated"):
            values[f"{metric}/d{cell['distance']}"] = cell[metric]
    return values


def describe(record: dict) -> str:
    cells = " ".join(f"[d={c['distance']}: acc {c['accuracy_present']:.2f}/{c['accuracy_ablated']:.2f} "
                     f"margin {c['margin_present']:+.3f}/{c['margin_ablated']:+.3f}]" for c in record["cells"])
    return (f"evidence probe at iteration {record['iteration']} | {record['cells'][0]['length']} tokens | "
            f"per distance [present/ablated] {cells}")
