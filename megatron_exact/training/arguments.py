"""Command-line flags of the trainer and their validation.

Flags keep Megatron-LM's names wherever the concept is the same. Everything
that can be checked without building a model is checked in
:func:`validate_args` (parallel sizes against the world size, heads and KV
groups against TP, sequence length against the model's limits, the data's
vocabulary against the model's, missing data files), so a bad launch fails in
seconds with an error naming the flag, before any memory is allocated.
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_exact.errors import UserError
from megatron_exact.flags import add_data_args, add_exact_args, exact_config_from_args
from megatron_exact.model.config import PRESETS, ModelArch, RopeScaling, arch_from_hf_config, get_preset
from megatron_exact.model.parallel_layout import ParallelLayoutError, check_parallel_layout
from megatron_exact.model.paths import PathError, add_path_args, path_request_from_args, select_paths


class ConfigError(UserError, ValueError):
    """A launch configuration that cannot work; the message names the flag."""

    exit_code = 2


class ConfigWarning(UserWarning):
    """A launch configuration that works but is probably not what was meant."""


# Megatron-Core's asynchronous save (dist_checkpointing.save(..., async_sharded_save=True) run by
# an AsyncCallsQueue) forks a writer after torch.cuda.synchronize() and agrees on completion by
# all-reducing CUDA tensors, so it cannot run on the CPU; on GPUs the trainer's save would have to
# move its rename into place, tracker update and pruning into the queue's finalize step, which is
# not built. Refused rather than silently saving synchronously.
ASYNC_SAVE_REFUSAL = (
    "--async-save is not supported by this trainer: Megatron-Core's asynchronous checkpoint writer "
    "(dist_checkpointing's AsyncCallsQueue) synchronises and all-reduces on CUDA devices, so it cannot run on "
    "the CPU, and on GPUs this trainer does not yet finish a save (rename into place, tracker, --most-recent-k) "
    "from its finalize step. Drop --async-save: checkpoints are written synchronously, every rank in parallel"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_exact.py",
        description="Long-context continued pretraining with EXACT on Megatron-Core (launch with torchrun).",
        allow_abbrev=False,
    )

    group = parser.add_argument_group("model")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=sorted(PRESETS), help="a named architecture preset")
    source.add_argument("--hf-config", help="a HF model directory (or its config.json) giving the architecture")
    # Megatron-LM's architecture flags, as overrides of the preset/HF config (tiny test models).
    group.add_argument("--num-layers", type=int)
    group.add_argument("--hidden-size", type=int)
    group.add_argument("--ffn-hidden-size", type=int)
    group.add_argument("--num-attention-heads", type=int)
    group.add_argument("--num-query-groups", type=int)
    group.add_argument("--max-position-embeddings", type=int)
    group.add_argument("--vocab-size", type=int, help="true (unpadded) vocabulary size of the model")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="pad the embedding to a multiple of this x TP (trimmed again at HF export)")
    # RoPE flags change the model: the checkpoint records them, a resume must repeat them (--finetune may change
    # them), and HF export writes them.
    group.add_argument("--rotary-base", type=float, help="RoPE theta (default: the model's)")
    group.add_argument("--use-rope-scaling", action="store_true",
                       help="apply LLaMA-3.1-style RoPE frequency scaling (factor --rope-scaling-factor, default 8)")
    group.add_argument("--rope-scaling-factor", type=float,
                       help="LLaMA-3.1-style RoPE scaling factor (replaces the model's; implies --use-rope-scaling)")
    group.add_argument("--rotary-seq-len-interpolation-factor", type=float,
                       help="linear position interpolation: positions are divided by this factor")

    group = parser.add_argument_group("parallelism")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--context-parallel-size", type=int, default=1)
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument("--use-distributed-optimizer", action="store_true")
    group.add_argument("--overlap-grad-reduce", action="store_true",
                       help="start each gradient bucket's data-parallel reduction as soon as its gradients are "
                            "ready, overlapped with the rest of the backward pass")
    group.add_argument("--overlap-param-gather", action="store_true",
                       help="all-gather the updated parameters of each bucket in the next forward pass, overlapped "
                            "with it (needs --use-distributed-optimizer and --overlap-grad-reduce)")
    group.add_argument("--ddp-bucket-size", type=int,
                       help="parameters per gradient-reduction bucket (default: Megatron-Core's, "
                            "max(40M, 1M x DP) with --overlap-grad-reduce, one bucket without)")

    group = parser.add_argument_group("training")
    group.add_argument("--micro-batch-size", type=int, default=1)
    group.add_argument("--global-batch-size", type=int)
    group.add_argument("--train-iters", type=int, required=True)
    group.add_argument("--bf16", action="store_true")
    group.add_argument("--hidden-dropout", type=float, default=0.0,
                       help="dropout after attention and MLP (Megatron-LM's flag; 0 as usual in CPT)")
    group.add_argument("--attention-dropout", type=float, default=0.0,
                       help="dropout of the attention probabilities (Megatron-LM's flag; 0 as usual in CPT)")
    group.add_argument("--recompute-granularity", choices=("full", "selective"))
    group.add_argument("--recompute-method", choices=("uniform", "block"), default="uniform",
                       help="with --recompute-granularity full")
    group.add_argument("--recompute-num-layers", type=int, default=1,
                       help="with --recompute-granularity full")
    group.add_argument("--nan-loss-policy", choices=("stop", "skip"), default="stop",
                       help="on a NaN/Inf loss: stop the run with a message, or skip the optimizer step")

    group = parser.add_argument_group("optimizer and schedule")
    group.add_argument("--lr", type=float, required=True)
    group.add_argument("--min-lr", type=float, default=0.0)
    group.add_argument("--lr-warmup-iters", type=int, default=0)
    group.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    group.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"),
                       default="cosine")
    group.add_argument("--lr-wsd-decay-style", choices=("exponential", "linear", "cosine"), default="exponential")
    group.add_argument("--lr-wsd-decay-iters", type=int)
    group.add_argument("--weight-decay", type=float, default=0.01)
    group.add_argument("--adam-beta1", type=float, default=0.9)
    group.add_argument("--adam-beta2", type=float, default=0.999)
    group.add_argument("--adam-eps", type=float, default=1e-8)
    group.add_argument("--clip-grad", type=float, default=1.0)

    add_data_args(parser)
    add_exact_args(parser)
    add_path_args(parser)

    group = parser.add_argument_group("checkpointing")
    group.add_argument("--save", help="checkpoint directory")
    group.add_argument("--load", help="checkpoint directory to resume (or --finetune) from")
    group.add_argument("--save-interval", type=int)
    group.add_argument("--finetune", action="store_true",
                       help="load model weights only and start at iteration 0 (CPT from a converted HF checkpoint)")
    group.add_argument("--no-load-optim", action="store_true")
    group.add_argument("--no-load-rng", action="store_true")
    group.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                       dest="override_opt_param_scheduler", action="store_true",
                       help="on resume, the learning-rate/weight-decay schedule follows this run's flags (at the "
                            "checkpoint's step count) instead of the checkpoint's; needed when they differ")
    group.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                       dest="use_checkpoint_opt_param_scheduler", action="store_true",
                       help="on resume, keep the checkpoint's learning-rate/weight-decay schedule and ignore "
                            "this run's schedule flags")
    group.add_argument("--ckpt-format", choices=("torch_dist",), default="torch_dist")
    group.add_argument("--most-recent-k", type=int, default=-1,
                       help="keep the K most recent checkpoints in --save, deleting older ones once a newer one "
                            "is complete (Megatron-LM's CheckpointConfig.most_recent_k); -1 keeps all")
    group.add_argument("--async-save", action="store_true",
                       help="Megatron-LM's asynchronous save: refused here (see the message)")
    group.add_argument("--exit-interval", type=int,
                       help="save (with --save) and exit after an iteration divisible by this; resume with --load")
    group.add_argument("--exit-signal-handler", action="store_true",
                       help="on SIGTERM/SIGUSR1 save a checkpoint after the current iteration and exit cleanly")

    group = parser.add_argument_group("validation and logging")
    group.add_argument("--eval-interval", type=int, default=1000)
    group.add_argument("--eval-iters", type=int, default=10, help="global batches per validation")
    group.add_argument("--eval-probe", metavar="SPEC",
                       help="task specification (JSON, as python -m megatron_exact.eval probe --spec takes): run the "
                            "distance-resolved evidence probe on the model at every --eval-interval and at the end")
    group.add_argument("--eval-probe-length", type=int,
                       help="total length of the probe's prompts (default: --seq-length)")
    group.add_argument("--eval-probe-distances", type=int, nargs="+",
                       help="evidence distances in tokens (default: 64, 128, ... up to half of the length)")
    group.add_argument("--eval-probe-samples", type=int, default=20, help="probe samples per distance")
    group.add_argument("--eval-probe-seed", type=int, default=0, help="probe generation seed (the offline --seed)")
    group.add_argument("--log-interval", type=int, default=100)
    group.add_argument("--metrics-file", help="one JSON line per iteration and per validation")
    group.add_argument("--tensorboard-dir")
    group.add_argument("--wandb-project")
    group.add_argument("--wandb-exp-name")
    group.add_argument("--check-weight-hash-across-dp-replicas-interval", type=int,
                       help="every this many iterations, check that all data-parallel replicas hold identical weights")
    group.add_argument("--peak-tflops", type=float,
                       help="peak dense TFLOP/s of one GPU for MFU (default: looked up from the device name)")
    return parser


@dataclass
class RunLayout:
    """Sizes derived from the flags and the world size."""

    world_size: int
    data_parallel_size: int
    num_microbatches: int


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size  # completed against DP in validate_args
        args.global_batch_size_from_default = True
    else:
        args.global_batch_size_from_default = False
    return args


def resolve_arch(args: argparse.Namespace) -> ModelArch:
    """The architecture from --model/--hf-config with Megatron-LM's size flags applied on top."""
    try:
        arch = get_preset(args.model) if args.model else arch_from_hf_config(args.hf_config)
    except (FileNotFoundError, ValueError) as err:
        flag = "--model" if args.model else "--hf-config"
        raise ConfigError(f"{flag}: {err}") from None
    overrides = {
        "num_layers": args.num_layers,
        "hidden_size": args.hidden_size,
        "ffn_hidden_size": args.ffn_hidden_size,
        "num_attention_heads": args.num_attention_heads,
        "num_query_groups": args.num_query_groups,
        "max_position_embeddings": args.max_position_embeddings,
        "vocab_size": args.vocab_size,
    }
    arch = arch.replace(**{k: v for k, v in overrides.items() if v is not None})
    if args.num_attention_heads is not None and args.num_query_groups is None:
        # Megatron-LM: without --num-query-groups attention is multi-head.
        arch = arch.replace(num_query_groups=arch.num_attention_heads)
    if args.rope_scaling_factor is not None or args.use_rope_scaling:
        factor = args.rope_scaling_factor or (arch.rope_scaling.factor if arch.rope_scaling else 8.0)
        base = arch.rope_scaling or RopeScaling(factor=factor)
        arch = arch.replace(rope_scaling=RopeScaling(factor, base.low_freq_factor, base.high_freq_factor,
                                                     base.original_max_position_embeddings))
    if args.rotary_base is not None:
        arch = arch.replace(rotary_base=float(args.rotary_base))
    if args.rotary_seq_len_interpolation_factor is not None:
        arch = arch.replace(rotary_seq_len_interpolation_factor=float(args.rotary_seq_len_interpolation_factor))
    return arch


# The flags that set each field of the architecture, for messages about a checkpoint's record.
ARCH_FIELD_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups",
    "vocab_size": "--vocab-size",
    "max_position_embeddings": "--max-position-embeddings/--seq-length",
    "rotary_base": "--rotary-base",
    "rope_scaling": "--use-rope-scaling/--rope-scaling-factor",
    "rotary_seq_len_interpolation_factor": "--rotary-seq-len-interpolation-factor",
}


def describe_arch_value(field: str, value) -> str:
    if field == "rope_scaling":
        if value is None:
            return "off"
        return (f"factor {value['factor']} (low_freq_factor {value['low_freq_factor']}, high_freq_factor "
                f"{value['high_freq_factor']}, original_max_position_embeddings "
                f"{value['original_max_position_embeddings']})")
    if field == "rotary_seq_len_interpolation_factor" and value is None:
        return "off"
    return str(value)


def check_checkpoint_arch(load: str, saved: dict, arch: ModelArch, weights_only: bool) -> list[str]:
    """Compare the architecture a checkpoint records (``saved``, its dict) with this run's.

    Context-extension settings (RoPE, max_position_embeddings) may change when only the
    weights are loaded (``--finetune`` or a converted ``release``): the changes are returned,
    one line each, for the log. A resume must match: anything else raises :class:`ConfigError`
    naming the flag and both values.
    """
    from megatron_exact.checkpoint import CONTEXT_EXTENSION_FIELDS, arch_differences

    changes = []
    for field, (theirs, ours) in arch_differences(saved, arch).items():
        flag = ARCH_FIELD_FLAGS.get(field, field)
        both = f"{describe_arch_value(field, theirs)} in the checkpoint, {describe_arch_value(field, ours)} in this run"
        if field in CONTEXT_EXTENSION_FIELDS and weights_only:
            changes.append(f"{flag}: {describe_arch_value(field, theirs)} -> {describe_arch_value(field, ours)}")
        elif field in CONTEXT_EXTENSION_FIELDS:
            raise ConfigError(f"--load {load}: {flag} differs from the checkpoint's ({both}); resume with the "
                              "checkpoint's setting, or pass --finetune to start a new run from its weights")
        else:
            raise ConfigError(f"--load {load}: the model differs from the checkpoint's: {flag} ({both})")
    return changes


def data_prefixes(data_path: Sequence[str], split: str) -> list[str]:
    from megatron_exact.data.dataset import parse_data_path, parse_split

    try:
        prefixes, _ = parse_data_path(data_path)
        parse_split(split)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return prefixes


def resolve_tokenizer_record(args: argparse.Namespace, prefixes: Sequence[str]) -> dict:
    """The tokenizer (type, model, vocab size, EOD) of the run, checked against the data's sidecar."""
    from megatron_exact.data.tokenizers import (
        build_tokenizer,
        check_tokenizer_matches,
        read_tokenizer_sidecar,
        sidecar_path,
    )

    try:
        sidecars = {p: read_tokenizer_sidecar(p) for p in prefixes if os.path.exists(sidecar_path(p))}
    except ValueError as err:
        raise ConfigError(f"--data-path: {err}") from None
    if sidecars:
        first_prefix, first = next(iter(sidecars.items()))
        identity = lambda record: (record["vocab_size"], record["eod"], record.get("fingerprint"))
        for prefix, record in sidecars.items():
            ours, theirs = identity(record), identity(first)
            if ours[:2] != theirs[:2] or (ours[2] and theirs[2] and ours[2] != theirs[2]):
                raise ConfigError(
                    f"--data-path: {prefix} and {first_prefix} were tokenized with different tokenizers "
                    f"({record['tokenizer_type']} {record.get('tokenizer_model')}, vocab_size {record['vocab_size']} "
                    f"vs {first['tokenizer_type']} {first.get('tokenizer_model')}, vocab_size {first['vocab_size']}; "
                    f"see {sidecar_path(prefix)} and {sidecar_path(first_prefix)})")
    if args.tokenizer_type is None:
        if not sidecars:
            raise ConfigError(f"--tokenizer-type is required: the data has no tokenizer sidecar "
                              f"({sidecar_path(prefixes[0])}), e.g. because Megatron-LM preprocessed it")
        record = dict(next(iter(sidecars.values())))
        if args.tokenizer_model is not None:
            raise ConfigError("--tokenizer-model needs --tokenizer-type")
        return record
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    record = {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
              "vocab_size": int(tokenizer.vocab_size), "eod": int(tokenizer.eod)}
    given = f"--tokenizer-type {args.tokenizer_type}" + (
        f" --tokenizer-model {args.tokenizer_model}" if args.tokenizer_model else "")
    for prefix in sidecars:
        try:
            check_tokenizer_matches(prefix, tokenizer)  # by fingerprint (vocabulary, special ids)
        except ValueError as err:
            raise ConfigError(f"{given} does not match the tokenizer that made {prefix}: {err}") from None
    return record


def validate_args(args: argparse.Namespace, world_size: int) -> tuple[ModelArch, RunLayout, dict]:
    """Check the whole configuration before any model is built.

    Returns the architecture, the derived layout and the tokenizer record;
    raises :class:`ConfigError` naming the offending flag.
    """
    for flag in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                 "micro_batch_size", "global_batch_size", "seq_length", "train_iters", "eval_iters",
                 "eval_interval", "log_interval", "make_vocab_size_divisible_by"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag in ("train_iters", "eval_iters") else 1):
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    for flag in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, flag) < 1.0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be in [0, 1), got {getattr(args, flag)}")
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}) x --context-parallel-size ({cp}) = {model_parallel}"
        )
    dp = world_size // model_parallel
    if args.global_batch_size_from_default:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"({args.micro_batch_size}) x data-parallel size ({dp} = world {world_size} / TP*PP*CP {model_parallel})"
        )
    if args.sequence_parallel and tp == 1:
        warnings.warn("--sequence-parallel has no effect with --tensor-model-parallel-size 1", ConfigWarning)

    arch = resolve_arch(args)
    if arch.num_attention_heads % arch.num_query_groups:
        raise ConfigError(f"--num-query-groups {arch.num_query_groups} does not divide "
                          f"--num-attention-heads {arch.num_attention_heads}")
    try:
        check_parallel_layout(arch, tp, pp)
    except ParallelLayoutError as err:
        raise ConfigError(str(err)) from None
    extended = args.use_rope_scaling or args.rope_scaling_factor or args.rotary_seq_len_interpolation_factor \
        or args.rotary_base
    if args.seq_length > arch.max_position_embeddings and not extended:
        warnings.warn(
            f"--seq-length {args.seq_length} exceeds the model's max_position_embeddings "
            f"{arch.max_position_embeddings} and no context-extension flag is set (--rotary-base, "
            "--use-rope-scaling/--rope-scaling-factor, --rotary-seq-len-interpolation-factor): positions beyond "
            "the original limit were never trained",
            ConfigWarning,
        )
    if arch.sliding_window is not None:
        window, fields = arch.sliding_window, arch.model_family.sliding_window_fields
        source = f"--hf-config {args.hf_config}" if args.hf_config else f"--model {args.model}"
        if window < args.seq_length:
            raise ConfigError(
                f"{source}: sliding-window attention ({fields}: a {window}-token window) is not supported: the "
                f"model here attends to the whole document, which equals the window only up to {window} tokens, "
                f"and --seq-length is {args.seq_length}. Use --seq-length <= {window}, or a config.json without "
                "the window"
            )
        warnings.warn(
            f"{source}: the config's {window}-token sliding window ({fields}) covers --seq-length "
            f"{args.seq_length}: training with full attention, which is the same for sequences this long",
            ConfigWarning,
        )
    if args.rotary_seq_len_interpolation_factor is not None and args.rotary_seq_len_interpolation_factor < 1:
        raise ConfigError(f"--rotary-seq-len-interpolation-factor must be >= 1, got "
                          f"{args.rotary_seq_len_interpolation_factor}")
    if args.rotary_base is not None and args.rotary_base <= 0:
        raise ConfigError(f"--rotary-base must be positive, got {args.rotary_base}")
    # The model has now been trained at --seq-length: its record (and HF export) says so.
    arch = arch.replace(max_position_embeddings=max(arch.max_position_embeddings, args.seq_length))

    prefixes = data_prefixes(args.data_path, args.split)
    from megatron_exact.data.indexed_files import check_indexed_files

    for prefix in prefixes:
        try:
            _, documents = check_indexed_files(prefix)
        except UserError as err:
            raise ConfigError(f"--data-path: {err}") from None
        if documents == 0:
            raise ConfigError(f"--data-path: {prefix} holds no documents; preprocess a non-empty corpus")
    tokenizer = resolve_tokenizer_record(args, prefixes)
    if tokenizer["vocab_size"] > arch.vocab_size:
        raise ConfigError(
            f"--data-path: the data's tokenizer has {tokenizer['vocab_size']} tokens but the model "
            f"({args.model or args.hf_config}) only {arch.vocab_size} (--vocab-size); token ids would overflow "
            "the embedding"
        )

    try:
        exact_config_from_args(args).check_tail(args.seq_length)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    from megatron_exact.atomic_io import check_writable

    for flag, path, directory in (("--save", args.save, True), ("--metrics-file", args.metrics_file, False),
                                  ("--tensorboard-dir", args.tensorboard_dir, True)):
        if path:
            try:
                check_writable(path, directory=directory)
            except UserError as err:
                raise ConfigError(f"{flag} {path}: {err}") from None
    try:
        select_paths(path_request_from_args(args))
    except PathError as err:
        raise ConfigError(str(err)) from None
    # Megatron-LM's refusals.
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather only supported with distributed optimizer "
                          "(add --use-distributed-optimizer)")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise ConfigError("Must use --overlap-param-gather with --overlap-grad-reduce")
    if args.ddp_bucket_size is not None and args.ddp_bucket_size < 1:
        raise ConfigError(f"--ddp-bucket-size must be positive, got {args.ddp_bucket_size}")
    if args.ddp_bucket_size is not None and not args.overlap_grad_reduce:
        warnings.warn("--ddp-bucket-size has no effect without --overlap-grad-reduce (one bucket)", ConfigWarning)
    if args.save_interval is not None and args.save_interval < 1:
        raise ConfigError(f"--save-interval must be positive, got {args.save_interval}")
    if args.save_interval and not args.save:
        raise ConfigError("--save-interval needs --save (the checkpoint directory)")
    if args.most_recent_k == 0 or args.most_recent_k < -1:
        raise ConfigError(f"--most-recent-k must be a positive number of checkpoints to keep, or -1 to keep all; "
                          f"got {args.most_recent_k}")
    if args.most_recent_k != -1 and not args.save:
        raise ConfigError("--most-recent-k has no effect without --save (the checkpoint directory it prunes)")
    if args.async_save:
        raise ConfigError(ASYNC_SAVE_REFUSAL)
    if args.exit_signal_handler and not args.save:
        raise ConfigError("--exit-signal-handler needs --save (it saves a checkpoint before exiting)")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each "
                          "other: give one (this run's schedule, or the checkpoint's)")
    if args.finetune and not args.load:
        raise ConfigError("--finetune needs --load (the checkpoint whose weights to start from)")
    if args.load:
        from megatron_exact.checkpoint import RELEASE, find_checkpoint, read_model_record

        try:
            found = find_checkpoint(args.load)  # a tracker that names no complete checkpoint fails here
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"--load {args.load}: {err}") from None
        if found is None and args.finetune:
            raise ConfigError(f"--load {args.load}: no checkpoint there to --finetune from")
        if found is not None:
            directory, iteration = found
            saved = read_model_record(directory).get("model_arch")
            if saved is not None:
                check_checkpoint_arch(args.load, saved, arch, weights_only=args.finetune or iteration == RELEASE)
    if args.lr_warmup_iters > (args.lr_decay_iters or args.train_iters) and args.train_iters:
        raise ConfigError(f"--lr-warmup-iters {args.lr_warmup_iters} exceeds the decay iterations "
                          f"({args.lr_decay_iters or args.train_iters})")
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    if args.wandb_project:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("--wandb-project needs the optional package wandb (pip install wandb)")
    if args.eval_probe:
        from megatron_exact.training.eval_probe import build_probe_samples

        build_probe_samples(args, tokenizer, arch.vocab_size)  # kept: the trainer takes the same list
    layout = RunLayout(world_size, dp, args.global_batch_size // (args.micro_batch_size * dp))
    return arch, layout, tokenizer
