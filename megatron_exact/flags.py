"""Command-line flags shared by the trainer and the tools, defined once (Megatron-LM's names).

:func:`add_data_args`: what decides which samples a run reads (``--data-path``, ``--split``,
``--seed``, ``--seq-length``, document masking, tokenizer, index cache);
:func:`add_exact_args`: the EXACT loss flags. ``tools/pretrain_exact.py`` and
``tools/effective_context_stats.py`` both build their parsers from these, so the stats tool
accepts a training command's flags and their defaults are the trainer's.
"""

from __future__ import annotations

import argparse

from megatron_exact.exact import DEFAULT_ALPHA, DEFAULT_EPS, DEFAULT_GAMMA
from megatron_exact.loss import NORMALIZATIONS, SCOPES, WEIGHTINGS, ExactConfig

DEFAULT_SPLIT = "969,30,1"  # Megatron-LM's
DEFAULT_SEED = 1234  # Megatron-LM's


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("data")
    group.add_argument("--data-path", nargs="+", required=True,
                       help="Megatron blend: 'prefix' or 'weight1 prefix1 weight2 prefix2 ...'")
    group.add_argument("--split", default=DEFAULT_SPLIT, help="train,valid,test proportions")
    group.add_argument("--seed", type=int, default=DEFAULT_SEED,
                       help="random seed: Megatron-Core's sample shuffle (and the trainer's initialisation)")
    group.add_argument("--seq-length", type=int, required=True)
    group.add_argument("--data-cache-path", help="where Megatron-Core caches its sample indices")
    group.add_argument("--no-document-masking", dest="document_masking", action="store_false",
                       help="attend across document boundaries (positions 0..S-1, every real token supervised)")
    group.add_argument("--tokenizer-type", help="default: the data's tokenizer sidecar (checked against it)")
    group.add_argument("--tokenizer-model", help="default: the data's tokenizer sidecar (checked against it)")
    return parser


def add_exact_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The loss flags (Megatron-LM style names)."""
    group = parser.add_argument_group("EXACT loss")
    group.add_argument("--loss-weighting", choices=WEIGHTINGS, default="uniform",
                       help="uniform: standard CPT loss; exact: up-weight rare long effective contexts.")
    group.add_argument("--exact-alpha", type=float, default=DEFAULT_ALPHA,
                       help="Extra weight mass of the tail: sum over tail buckets of q_b (w_b - 1).")
    group.add_argument("--exact-gamma", type=float, default=DEFAULT_GAMMA,
                       help="Rarity exponent: r_b = (q_b + eps)^-gamma.")
    group.add_argument("--exact-eps", type=float, default=DEFAULT_EPS, help="Smoothing of bucket frequencies.")
    group.add_argument("--exact-tau", type=int, default=None,
                       help="Tail threshold in tokens: buckets with lower edge >= tau are weighted "
                            "(default: seq-length / 4).")
    group.add_argument("--exact-scope", choices=SCOPES, default="step",
                       help="Where bucket counts come from: the whole global batch of the optimizer step "
                            "(split-invariant) or each micro-batch (ablation).")
    group.add_argument("--exact-normalization", choices=NORMALIZATIONS, default="tokens",
                       help="Divide the weighted loss sum by the number of supervised tokens or by the sum of weights.")
    return parser


def exact_config_from_args(args: argparse.Namespace) -> ExactConfig:
    return ExactConfig(
        weighting=args.loss_weighting,
        alpha=args.exact_alpha,
        gamma=args.exact_gamma,
        eps=args.exact_eps,
        tau=args.exact_tau,
        scope=args.exact_scope,
        normalization=args.exact_normalization,
    )
