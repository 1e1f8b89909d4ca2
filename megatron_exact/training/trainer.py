"""The EXACT trainer: one class, built from Megatron-Core parts.

``GPTModel`` (our builder) -> ``DistributedDataParallel`` (gradients
all-reduced by ``finalize_model_grads``) -> ``get_megatron_optimizer`` (plain
or distributed) -> ``OptimizerParamScheduler``; each optimizer step runs
``get_forward_backward_func()`` over this rank's micro-batches with
:class:`megatron_exact.loss.ExactLoss` as the loss.

Data: each data-parallel rank reads its own slice of the global batch with
Megatron-LM's ``MegatronPretrainingSampler`` semantics (driven by the number
of consumed samples, so a resume continues at exactly the next sample):
micro-batch ``j`` of a step starting at ``consumed`` holds samples
``consumed + j*mbs*DP + dp_rank*mbs + [0, mbs)``. All pipeline stages read
the data (``ExactLoss.begin_step`` needs the counts on every stage), and
every micro-batch goes through :func:`megatron_exact.model.packing.pack_batch`
with this rank's CP/TP layout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import math
import random
import signal
import time
from typing import Optional

import numpy as np
import torch

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_exact.checkpoint.probe import Probe, probe_documents, probe_positions
from megatron_exact.data.dataset import build_train_valid_test_datasets, sample_order_digest
from megatron_exact.data.tokenizers import build_tokenizer, tokenizer_description
from megatron_exact.flags import exact_config_from_args
from megatron_exact.loss import ExactLoss
from megatron_exact.model.builder import build_gpt_model, padded_vocab_size, transformer_config
from megatron_exact.model.config import ModelArch
from megatron_exact.model.packing import PackedBatch, batch_from_documents, pack_batch, pad_multiple
from megatron_exact.model.paths import path_request_from_args, select_paths
from megatron_exact.platform.distributed import initialize_model_parallel
from megatron_exact.training import eval_probe
from megatron_exact.training.arguments import ConfigError, RunLayout
from megatron_exact.training.checkpointing import (load_checkpoint, remove_old_checkpoints, remove_stale_temporaries,
                                                   save_checkpoint)
from megatron_exact.training.logging import (RunLogger, model_flops, peak_tflops, sum_squared_document_lengths, tail_share,
                                             throughput)
from megatron_exact.training.validation import BucketedCrossEntropy

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf and ``--nan-loss-policy stop`` is in force."""


class ExitSignalHandler:
    """Remembers SIGTERM/SIGUSR1 (SLURM preemption) so the loop can checkpoint and exit between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[int] = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum


def split_sample_counts(args: argparse.Namespace) -> tuple[int, int, int]:
    """Samples the run reads from the train, valid and test parts of ``--split``.

    Megatron-LM's counts (``train_iters x gbs``; ``eval_iters x gbs`` per evaluation),
    always numbers: Megatron-Core's blend builder needs a size for every part of a
    weighted blend. Unlike Megatron-LM, every evaluation reads the same first
    ``--eval-iters`` batches (see ``validation.py``), so the valid part needs no more
    than one evaluation's worth, and the test part, which the trainer never reads, none.
    """
    gbs = args.global_batch_size
    return args.train_iters * gbs, args.eval_iters * gbs, 0


def schedule_policy(args: argparse.Namespace) -> str:
    """What a resume does when the schedule flags differ from the checkpoint's (Megatron-LM's flags)."""
    if args.override_opt_param_scheduler:
        return "override"
    return "checkpoint" if args.use_checkpoint_opt_param_scheduler else "refuse"


def collate(samples: list[dict]) -> dict:
    return {key: torch.stack([torch.as_tensor(sample[key]) for sample in samples]) for key in SAMPLE_KEYS}


def sample_sha1(sample: dict) -> bytes:
    """sha1 of one sample's tokens and labels (int64 bytes)."""
    digest = hashlib.sha1()
    digest.update(torch.as_tensor(sample["tokens"]).to(torch.int64).numpy().tobytes())
    digest.update(torch.as_tensor(sample["labels"]).to(torch.int64).numpy().tobytes())
    return digest.digest()


def combine_sample_sha1s(digests) -> str:
    """``batch_sha1`` from the per-sample digests of a global batch, in sample order."""
    digest = hashlib.sha1()
    for sample_digest in digests:
        digest.update(bytes(sample_digest))
    return digest.hexdigest()


def batch_sha1(samples: list[dict]) -> str:
    """Hash of a global batch's tokens and labels (in sample order): equal across paired runs and
    parallel layouts. The trainer builds it from the digests each data-parallel rank takes of its
    own samples (:meth:`Trainer._gather_batch_record`); this is the same value from the samples."""
    return combine_sample_sha1s(sample_sha1(sample) for sample in samples)


@dataclasses.dataclass
class StepData:
    """What one rank learns of its own samples while fetching a step's micro-batches, for the log:
    their digests (in this rank's order: micro-batch by micro-batch) and the sum over their
    documents of the squared lengths (the attention term of the FLOP count)."""

    sample_sha1s: list
    squared_document_lengths: int


class Trainer:
    def __init__(self, args: argparse.Namespace, arch: ModelArch, layout: RunLayout, tokenizer_record: dict):
        self.args, self.arch, self.layout = args, arch, layout
        tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
        initialize_model_parallel(tp, pp, cp, seed=args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        self.is_last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.is_logging_rank = (
            self.is_last_stage
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
        )
        # The logging rank's data-parallel group: the ranks whose samples make up its global batch.
        self.in_logging_group = (self.is_last_stage and parallel_state.get_tensor_model_parallel_rank() == 0
                                 and parallel_state.get_context_parallel_rank() == 0)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

        self._build_model_and_optimizer()
        self._build_data(tokenizer_record)
        self.exact_loss = ExactLoss(exact_config_from_args(args), args.seq_length)
        self.validator = BucketedCrossEntropy(args.seq_length)
        self.probe_samples = (eval_probe.build_probe_samples(args, self.tokenizer_record, arch.vocab_size)
                              if args.eval_probe else None)
        self.forward_backward = get_forward_backward_func()
        self.signals = ExitSignalHandler() if args.exit_signal_handler else None

        self.iteration = 0
        self.consumed_train_samples = 0
        if args.save:
            for removed in remove_stale_temporaries(args.save):  # rank 0 only
                self._print(f"removed {removed} (what an interrupted save left; the tracker names the last "
                            "complete checkpoint)")
        if args.load:
            loaded = load_checkpoint(
                args.load, self.module, self.optimizer, self.scheduler,
                arch=arch, padded_vocab_size=self.padded_vocab_size, finetune=args.finetune,
                load_optimizer=not args.no_load_optim, load_rng=not args.no_load_rng,
                schedule_policy=schedule_policy(args),
            )
            if loaded is not None:
                self.iteration, self.consumed_train_samples = loaded.iteration, loaded.consumed_train_samples
                self._print(f"loaded {loaded.directory} (iteration {self.iteration}, "
                            f"{self.consumed_train_samples} samples consumed{', weights only' if args.finetune else ''})")
                for change in loaded.arch_changes:
                    self._print(f"context extension: {change} (the checkpoint's setting -> this run's)")
                if loaded.optimizer_change:
                    self._print(f"optimizer state {loaded.optimizer_change}: Adam's moments and step carried over "
                                "per parameter, in the layout this run keeps them")
                if loaded.schedule_changes:
                    kept = ("this run's flags (--override-opt_param-scheduler)" if args.override_opt_param_scheduler
                            else "the checkpoint's (--use-checkpoint-opt_param-scheduler)")
                    self._print(f"learning-rate schedule from {kept}; differences: "
                                + "; ".join(loaded.schedule_changes))
                if not args.finetune:
                    self._check_data_order(loaded)
            else:
                self._print(f"--load {args.load}: no checkpoint yet, starting from scratch")
        self.logger = RunLogger(args, self.iteration) if self.is_logging_rank else None

    def _check_data_order(self, loaded) -> None:
        """Refuse a resume that would read the consumed samples in another order (so repeat or skip
        some): the data indices depend on the number of samples asked for (``--train-iters``)."""
        recorded = loaded.common.get("data_position", {}).get("train_sample_order_sha1")
        if recorded is None or self.iteration >= self.args.train_iters:
            return
        if sample_order_digest(self.train_dataset, self.consumed_train_samples) != recorded:
            before = (loaded.common.get("args") or {}).get("train_iters")
            raise ConfigError(
                f"--load {loaded.directory}: with --train-iters {self.args.train_iters} the training data comes in "
                f"another order than the checkpoint's run (--train-iters {before}) read it, so the extension would "
                f"repeat or skip samples: Megatron-Core shuffles all the epochs a plan needs together, and this plan "
                f"needs another number of epochs of the training split (or --data-path, --split, --seed or "
                f"--seq-length changed). Extend within the epochs the first plan needed, or start a new run from "
                f"these weights (--load {loaded.directory.parent} --finetune, a new --save)"
            )

    # -- construction ---------------------------------------------------------------
    def _build_model_and_optimizer(self) -> None:
        args, arch = self.args, self.arch
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        self.pad_multiple = pad_multiple(args.context_parallel_size, tp, args.sequence_parallel)
        overrides = {}
        if args.recompute_granularity == "full":
            overrides = dict(recompute_granularity="full", recompute_method=args.recompute_method,
                             recompute_num_layers=args.recompute_num_layers)
        elif args.recompute_granularity == "selective":
            overrides = dict(recompute_granularity="selective")
        # Per-document padding (CP/SP) makes packed lengths vary between micro-batches:
        # the pipeline then sends tensor shapes ahead of the tensors.
        variable_seq_lengths = pp > 1 and self.pad_multiple > 1
        if variable_seq_lengths:
            # Megatron-Core refuses variable lengths with its default MoE token dispatcher
            # ("allgather") even for dense models like ours, where no dispatcher runs.
            overrides["moe_token_dispatcher_type"] = "alltoall"
        self.paths = select_paths(path_request_from_args(args))
        self._print(self.paths.describe())
        overrides.update(self.paths.config_overrides())
        self.config = transformer_config(
            arch,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=args.context_parallel_size,
            sequence_parallel=args.sequence_parallel,
            bf16=args.bf16,
            hidden_dropout=args.hidden_dropout,
            attention_dropout=args.attention_dropout,
            variable_seq_lengths=variable_seq_lengths,
            **overrides,
        )
        self.padded_vocab_size = padded_vocab_size(arch.vocab_size, args.make_vocab_size_divisible_by, tp)
        model = build_gpt_model(arch, self.config, seq_length=args.seq_length,
                                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, paths=self.paths)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if args.bf16:
            model = Float16Module(self.config, model)
        self.module = model  # what checkpoints see
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=args.overlap_grad_reduce,
            overlap_param_gather=args.overlap_param_gather,
            bucket_size=args.ddp_bucket_size,
            use_distributed_optimizer=args.use_distributed_optimizer,
        )
        self.ddp = DistributedDataParallel(self.config, ddp_config, module=model)
        self.model = [self.ddp]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                clip_grad=args.clip_grad, bf16=args.bf16,
                params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                use_distributed_optimizer=args.use_distributed_optimizer,
            ),
            self.model,
        )
        # Megatron-LM's wiring: DP gradient all-reduce (and division by the global token count), loss scaling.
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.config.no_sync_func = self.ddp.no_sync
        gbs = args.global_batch_size
        decay_iters = args.lr_decay_iters or args.train_iters
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=args.lr,
            min_lr=args.min_lr,
            lr_warmup_steps=args.lr_warmup_iters * gbs,
            lr_decay_steps=decay_iters * gbs,
            lr_decay_style=args.lr_decay_style,
            start_wd=args.weight_decay,
            end_wd=args.weight_decay,
            wd_incr_steps=args.train_iters * gbs,
            wd_incr_style="constant",
            wsd_decay_steps=args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters else None,
            lr_wsd_decay_style=args.lr_wsd_decay_style,
            use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler=args.override_opt_param_scheduler,
        )

    def _build_data(self, tokenizer_record: dict) -> None:
        args = self.args
        tokenizer = build_tokenizer(tokenizer_record["tokenizer_type"], tokenizer_record.get("tokenizer_model"))
        # What the checkpoints record (and export-hf writes HF files from); the dataset checks it
        # against every corpus' sidecar by fingerprint.
        self.tokenizer_record = tokenizer_description(
            tokenizer_record["tokenizer_type"], tokenizer_record.get("tokenizer_model"), tokenizer)
        sample_counts = split_sample_counts(args)
        self.train_dataset, self.valid_dataset, _ = build_train_valid_test_datasets(
            args.data_path, args.split, args.seq_length, args.seed, sample_counts,
            document_masking=args.document_masking, cache_path=args.data_cache_path, tokenizer=tokenizer,
        )
        if self.train_dataset is None:
            raise ValueError(f"--split {args.split} leaves no training data")
        if args.eval_iters and self.valid_dataset is None:
            self._print(f"--split {args.split} has no validation part: validation is off")

    # -- data -------------------------------------------------------------------------
    def _microbatches(self, dataset, first_sample: int, step_data: Optional[StepData] = None) -> list[PackedBatch]:
        """This rank's micro-batches of the global batch starting at sample ``first_sample``
        (and, into ``step_data``, what the log needs to know of them)."""
        args, layout = self.args, self.layout
        mbs, dp = args.micro_batch_size, layout.data_parallel_size
        microbatches = []
        for j in range(layout.num_microbatches):
            start = first_sample + j * mbs * dp + self.dp_rank * mbs
            samples = [dataset[start + i] for i in range(mbs)]
            batch = collate(samples)
            if step_data is not None:
                step_data.sample_sha1s.extend(sample_sha1(sample) for sample in samples)
                step_data.squared_document_lengths += sum_squared_document_lengths(batch["cu_seqlens"])
            packed = pack_batch(
                batch,
                context_parallel_size=args.context_parallel_size,
                context_parallel_rank=parallel_state.get_context_parallel_rank(),
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                sequence_parallel=args.sequence_parallel,
            )
            microbatches.append(self._to_device(packed))
        return microbatches

    def _to_device(self, packed: PackedBatch) -> PackedBatch:
        if self.device.type == "cpu":
            return packed
        params = packed.packed_seq_params
        for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            setattr(params, name, getattr(params, name).to(self.device))
        return dataclasses.replace(
            packed,
            **{name: getattr(packed, name).to(self.device) for name in ("tokens", "labels", "loss_mask", "position_ids")},
        )

    def _forward_step(self, loss_func, data_iterator, model):
        packed = next(data_iterator)
        output = model(packed.tokens, packed.position_ids, None, labels=packed.labels,
                       packed_seq_params=packed.packed_seq_params)
        return output, functools.partial(loss_func, packed)

    def _run_schedule(self, microbatches: list[PackedBatch], loss_func, forward_only: bool) -> list:
        return self.forward_backward(
            forward_step_func=functools.partial(self._forward_step, loss_func),
            data_iterator=iter(microbatches),
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=microbatches[0].num_tokens,  # one packed row per micro-batch
            micro_batch_size=1,
            forward_only=forward_only,
        )

    # -- one optimizer step -------------------------------------------------------------
    def train_step(self, microbatches: list[PackedBatch]) -> tuple[dict, Optional[float], bool]:
        """Forward/backward over the micro-batches, then the optimizer step (or a skip on a bad loss)."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.exact_loss.begin_step(microbatches)
        self._run_schedule(microbatches, self.exact_loss.loss_func, forward_only=False)
        stats = self.exact_loss.step_statistics()  # last stage: global over DP x CP
        finite = stats["objective"] is None or (math.isfinite(stats["objective"]) and math.isfinite(stats["lm_loss"]))
        if not self._all_ranks_agree(finite):
            message = (f"iteration {self.iteration + 1}: the loss is NaN/Inf (--nan-loss-policy "
                       f"{self.args.nan_loss_policy})")
            if self.args.nan_loss_policy == "stop":
                raise NonFiniteLossError(message + "; lower --lr, check the data, or resume from the last checkpoint")
            self._print(message + ": optimizer step skipped")
            return stats, None, True
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=self.args.global_batch_size)
        return stats, (float(grad_norm) if grad_norm is not None else None), not updated

    def _all_ranks_agree(self, value: bool) -> bool:
        """True only when ``value`` is true on every rank of the job."""
        flag = torch.tensor([0 if value else 1], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag) == 0

    @contextlib.contextmanager
    def _parameters_gathered(self):
        """With --overlap-param-gather the updated parameters arrive only in the next forward
        pass (its pre-hooks): gather them now for what reads the weights outside a training
        forward (validation, the probe, checkpoints, the replica check), as Megatron-LM does."""
        if not self.args.overlap_param_gather:
            yield
            return
        for chunk in self.model:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()

    def check_weight_hash_across_dp_replicas(self) -> None:
        """Raise unless every data-parallel replica holds bit-identical weights (gradients really all-reduced)."""
        with self._parameters_gathered():
            self._check_weight_hash_across_dp_replicas()

    def _check_weight_hash_across_dp_replicas(self) -> None:
        digest = hashlib.sha1()
        for param in self.module.parameters():
            digest.update(param.detach().float().cpu().numpy().tobytes())
        group = parallel_state.get_data_parallel_group()
        hashes = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(hashes, digest.hexdigest(), group=group)
        if len(set(hashes)) != 1:
            raise RuntimeError(f"iteration {self.iteration}: data-parallel replicas hold different weights "
                               f"(sha1 per DP rank: {hashes})")
        self._print(f"iteration {self.iteration}: weights identical across {len(hashes)} data-parallel "
                    f"replica(s) (sha1 {hashes[0][:12]})")

    # -- validation ---------------------------------------------------------------------
    def evaluate(self) -> Optional[dict]:
        with self._parameters_gathered():
            return self._evaluate()

    def _evaluate(self) -> Optional[dict]:
        args = self.args
        if not args.eval_iters or self.valid_dataset is None:
            return None
        for chunk in self.model:
            chunk.eval()
        reports = []
        with torch.no_grad():
            for batch in range(args.eval_iters):
                microbatches = self._microbatches(self.valid_dataset, batch * args.global_batch_size)
                reports.extend(self._run_schedule(microbatches, self.validator.loss_func, forward_only=True))
        for chunk in self.model:
            chunk.train()
        if not self.is_last_stage:
            return None
        record = self.validator.summarize(reports, self.dp_cp_group)
        record = {"iteration": self.iteration, "split": "valid", **record}
        if self.logger:
            self.logger.write_record(record)
            self.logger.validation_line(record)
            self.logger.scalars("valid", {"lm_loss": record["lm_loss"]}, self.iteration)
        return record

    # -- probe logits (the reference export-hf --verify checks against) -----------------------
    def probe(self) -> Optional[Probe]:
        """Logits of the model as it is now on the fixed probe batch (``checkpoint/probe.py``).

        Collective: every rank runs its part of the forward in this run's own layout; the
        rank that logs (last stage, TP/DP/CP rank 0) gets the probe, every other rank None.
        """
        documents = probe_documents(self.arch.vocab_size, self.args.seq_length)
        positions = probe_positions(sum(len(doc) for doc in documents))
        logits = self._logits_at(documents, positions)
        if not self.is_logging_rank:
            return None
        return Probe(documents, positions, logits.cpu(), "bfloat16" if self.args.bf16 else "float32")

    def _logits_at(self, documents: list[list[int]], positions: torch.Tensor) -> Optional[torch.Tensor]:
        """fp32 logits ``[len(positions), vocab]`` (the real vocabulary) of the model in eval mode on
        ``documents`` packed into one row, at ``positions`` of that row; on every rank of the last
        pipeline stage (None elsewhere). Collective: every rank runs its part in this run's layout."""
        args = self.args
        total = sum(len(doc) for doc in documents)
        # batch_from_documents wants seq_length + 1 tokens (the last is only a label): a 1-token tail.
        batch = batch_from_documents(documents + [[0]], seq_length=total)
        packed = self._to_device(pack_batch(
            batch,
            context_parallel_size=args.context_parallel_size,
            context_parallel_rank=parallel_state.get_context_parallel_rank(),
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            sequence_parallel=args.sequence_parallel,
        ))
        for chunk in self.model:
            chunk.eval()
        with torch.no_grad():
            reports = self.forward_backward(
                forward_step_func=functools.partial(self._probe_forward_step, positions),
                data_iterator=iter([packed]), model=self.model, num_microbatches=1,
                seq_length=packed.num_tokens, micro_batch_size=1, forward_only=True,
            )
        for chunk in self.model:
            chunk.train()
        return reports[0]["probe"] if self.is_last_stage else None

    # -- the evidence probe (--eval-probe) ------------------------------------------------
    def _eval_probe_logits(self, tokens: torch.Tensor, last: int) -> torch.Tensor:
        """``ForwardScorer``'s logits function: the last ``last`` positions of one prompt row."""
        total = tokens.shape[1]
        logits = self._logits_at([tokens[0].tolist()], torch.arange(total - last, total))
        return logits.cpu().unsqueeze(0)

    def evaluate_probe(self) -> Optional[dict]:
        """Score the probe's samples, split over the data-parallel replicas (each scores its share
        with the TP/CP ranks of its model; the records are gathered over DP); the logging rank logs."""
        if self.probe_samples is None:
            return None
        start = time.time()
        group = parallel_state.get_data_parallel_group()
        size = parallel_state.get_data_parallel_world_size()

        def all_gather(records: list) -> list:
            shares: list = [None] * size
            torch.distributed.all_gather_object(shares, records, group=group)
            return shares

        with self._parameters_gathered():
            records = eval_probe.run_probe(self.probe_samples, self._eval_probe_logits, all_gather=all_gather,
                                           rank=parallel_state.get_data_parallel_rank(), size=size)
        record = eval_probe.probe_record(self.iteration, self.args, records)
        record["time_s"] = time.time() - start
        if self.logger:
            self.logger.write_record(record)
            print(eval_probe.describe(record), flush=True)
            self.logger.scalars("eval_probe", eval_probe.scalars(record), self.iteration)
        return record

    def _probe_forward_step(self, positions, data_iterator, model):
        packed = next(data_iterator)
        output = model(packed.tokens, packed.position_ids, None, packed_seq_params=packed.packed_seq_params)
        return output, functools.partial(self._probe_logits, packed, positions)

    def _probe_logits(self, packed: PackedBatch, positions: torch.Tensor, output: torch.Tensor):
        """The logits at ``positions`` of the whole row: this rank's rows gathered over the
        vocabulary (TP), then summed over the CP ranks, each of which holds other rows."""
        from megatron.core import tensor_parallel

        source = packed.source_index.to(output.device)
        wanted = positions.to(output.device)
        kept = torch.isin(source, wanted)
        rows = tensor_parallel.gather_from_tensor_model_parallel_region(output[0][kept].float().contiguous())
        logits = torch.zeros(len(wanted), self.arch.vocab_size, dtype=torch.float32, device=output.device)
        logits[torch.searchsorted(wanted, source[kept])] = rows[:, : self.arch.vocab_size]
        if self.args.context_parallel_size > 1:
            torch.distributed.all_reduce(logits, group=parallel_state.get_context_parallel_group())
        no_loss = torch.zeros((), device=output.device)
        return no_loss, torch.zeros((), dtype=torch.int, device=output.device), {"probe": logits}

    # -- the loop -------------------------------------------------------------------------
    def save(self) -> None:
        with self._parameters_gathered():
            self._save()

    def _save(self) -> None:
        args = self.args
        layout = {"tp": args.tensor_model_parallel_size, "pp": args.pipeline_model_parallel_size,
                  "cp": args.context_parallel_size, "dp": self.layout.data_parallel_size,
                  "world": self.layout.world_size}
        record = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
        record["layout"] = layout
        start = time.time()
        path = save_checkpoint(
            args.save, self.iteration, self.module, self.optimizer, self.scheduler,
            arch=self.arch, padded_vocab_size=self.padded_vocab_size,
            consumed_train_samples=self.consumed_train_samples, args_record=record, probe=self.probe(),
            train_sample_order_sha1=sample_order_digest(self.train_dataset, self.consumed_train_samples),
            tokenizer=self.tokenizer_record,
        )
        self._print(f"saved checkpoint {path} in {time.time() - start:.1f} s")
        if args.most_recent_k > 0 and torch.distributed.get_rank() == 0:
            for removed in remove_old_checkpoints(args.save, args.most_recent_k):
                print(f"--most-recent-k {args.most_recent_k}: removed checkpoint {removed}", flush=True)

    def train(self) -> None:
        args = self.args
        gbs, seq = args.global_batch_size, args.seq_length
        peak = peak_tflops(args.peak_tflops)
        saved_at = self.iteration if args.load else None
        # Throughput counts training steps only (not validation or checkpointing).
        interval_time, interval_iterations = 0.0, 0
        self._print(f"training iterations {self.iteration + 1}..{args.train_iters}: global batch {gbs} x {seq} "
                    f"tokens, {self.layout.num_microbatches} micro-batch(es) of {args.micro_batch_size} per DP rank, "
                    f"DP={self.layout.data_parallel_size} TP={args.tensor_model_parallel_size} "
                    f"PP={args.pipeline_model_parallel_size} CP={args.context_parallel_size}, "
                    f"loss weighting {args.loss_weighting}")
        evaluated_at = None
        while self.iteration < args.train_iters:
            step_start = time.time()
            step_data = StepData([], 0) if self.in_logging_group else None
            microbatches = self._microbatches(self.train_dataset, self.consumed_train_samples, step_data)
            lr = self.optimizer.param_groups[0]["lr"]
            stats, grad_norm, skipped = self.train_step(microbatches)
            logged = self._gather_batch_record(step_data)
            self.iteration += 1
            self.consumed_train_samples += gbs
            step_time = time.time() - step_start
            interval_time += step_time
            interval_iterations += 1
            if self.logger:
                self._log_iteration(stats, lr, grad_norm, skipped, logged, step_time,
                                    interval_time, interval_iterations, peak)
            if self.iteration % args.log_interval == 0:
                interval_time, interval_iterations = 0.0, 0

            interval = args.check_weight_hash_across_dp_replicas_interval
            if interval and self.iteration % interval == 0:
                self.check_weight_hash_across_dp_replicas()
            if args.eval_interval and self.iteration % args.eval_interval == 0:
                self.evaluate()
                self.evaluate_probe()
                evaluated_at = self.iteration
            if args.save and args.save_interval and self.iteration % args.save_interval == 0:
                self.save()
                saved_at = self.iteration
            if self.signals is not None and not self._all_ranks_agree(self.signals.received is None):
                self._print(f"exit signal received: saving at iteration {self.iteration} and exiting")
                if saved_at != self.iteration:
                    self.save()
                return
            if args.exit_interval and self.iteration % args.exit_interval == 0:
                self._print(f"--exit-interval {args.exit_interval}: exiting at iteration {self.iteration}")
                if args.save and saved_at != self.iteration:
                    self.save()
                return
        if evaluated_at != self.iteration:
            self.evaluate()
            self.evaluate_probe()
        if args.save and saved_at != self.iteration:
            self.save()

    def _gather_batch_record(self, step_data: Optional[StepData]) -> Optional[tuple[str, int]]:
        """``(batch_sha1, squared document lengths of the global batch)`` on the logging rank, from
        what every data-parallel rank fetched for itself (None elsewhere). Only the ranks holding
        the logging rank's model part (its data-parallel group) take part: one small all-gather of
        20 bytes per sample and one integer per rank."""
        if step_data is None:
            return None
        mbs, dp = self.args.micro_batch_size, self.layout.data_parallel_size
        digests = torch.tensor([list(digest) for digest in step_data.sample_sha1s], dtype=torch.uint8,
                               device=self.device)
        squared = torch.tensor([step_data.squared_document_lengths], dtype=torch.int64, device=self.device)
        if dp > 1:
            group = parallel_state.get_data_parallel_group()
            all_digests = [torch.empty_like(digests) for _ in range(dp)]
            torch.distributed.all_gather(all_digests, digests, group=group)
            torch.distributed.all_reduce(squared, group=group)
        else:
            all_digests = [digests]
        if not self.is_logging_rank:
            return None
        per_rank = [rows.cpu().numpy() for rows in all_digests]
        # Global sample order: micro-batch j of DP rank r holds samples j*mbs*DP + r*mbs + [0, mbs).
        ordered = (per_rank[r][j * mbs + i].tobytes() for j in range(self.layout.num_microbatches)
                   for r in range(dp) for i in range(mbs))
        return combine_sample_sha1s(ordered), int(squared)

    def _log_iteration(self, stats, lr, grad_norm, skipped, logged, step_time, interval_time,
                       interval_iterations, peak) -> None:
        args = self.args
        sha1, squared = logged
        tokens_processed = args.global_batch_size * args.seq_length
        edges = stats["bucket_lower_edges"]
        weights = stats["bucket_weights"]
        counts = stats["bucket_tokens"]
        supervised = max(sum(counts), 1)
        weight_mean = sum(w * c for w, c in zip(weights, counts)) / supervised
        exact = {
            "tau": stats["tau"],
            "bucket_lower_edges": edges,
            "bucket_tokens": counts,
            "bucket_ce_mean": stats["bucket_ce_mean"],
            "bucket_weights": weights,
            "tail_share": tail_share(counts, edges, stats["tau"]),
            "weight_mean": weight_mean,
            "weight_max": max(w for w, c in zip(weights, counts) if c) if any(counts) else 1.0,
        }
        record = {
            "iteration": self.iteration,
            "loss": stats["objective"],
            "lm_loss": stats["lm_loss"],
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": stats["tokens"],
            "consumed_samples": self.consumed_train_samples,
            "batch_sha1": sha1,
            "step_time_s": step_time,
            "exact": exact,
        }
        if skipped:
            record["skipped"] = True
        self.logger.write_record(record)
        self.logger.scalars("train", {"loss": record["loss"], "lm_loss": record["lm_loss"], "lr": lr,
                                      "grad_norm": grad_norm, "tail_share": exact["tail_share"],
                                      "weight_mean": weight_mean, "weight_max": exact["weight_max"]}, self.iteration)
        if self.logger.tensorboard:
            for edge, count, ce in zip(edges, counts, stats["bucket_ce_mean"] or [None] * len(counts)):
                self.logger.tensorboard.add_scalar(f"exact/token_share/bucket_{edge}", count / supervised, self.iteration)
                if ce is not None:
                    self.logger.tensorboard.add_scalar(f"exact/mean_ce/bucket_{edge}", ce, self.iteration)
        if self.iteration % args.log_interval == 0:
            tokens_per_s = tokens_processed * interval_iterations / max(interval_time, 1e-9)
            tflops = mfu = None
            if torch.cuda.is_available():
                flops = model_flops(self.arch, self.padded_vocab_size, tokens_processed, squared)
                tflops, mfu = throughput(flops, step_time, self.layout.world_size, peak)
            printable = dict(record, loss=record["loss"] if record["loss"] is not None else float("nan"),
                             grad_norm=grad_norm if grad_norm is not None else float("nan"))
            self.logger.training_line(printable, elapsed_s=interval_time, iterations=interval_iterations,
                                      tokens_per_s=tokens_per_s, tflops_per_gpu=tflops, mfu=mfu)

    def close(self) -> None:
        if self.logger:
            self.logger.close()

    def _print(self, text: str) -> None:
        if torch.distributed.get_rank() == 0:
            print(text, flush=True)

