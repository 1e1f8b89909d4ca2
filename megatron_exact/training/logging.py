"""What the trainer reports: console lines, the metrics file, tensorboard, wandb, FLOPs.

Only one rank logs (the last pipeline stage's first TP/DP/CP rank, where the
loss is known); :class:`RunLogger` is constructed there and nowhere else.

Metrics file (``--metrics-file``, its fields listed in the README, "Train a uniform / EXACT pair"):
one JSON object per line, a training line per iteration and a validation
line (``"split": "valid"``) per evaluation. After a resume from iteration
``k`` every line past ``k`` is dropped (atomically) so every iteration
appears exactly once.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from megatron_exact import atomic_io
from megatron_exact.model.config import ModelArch

# Model FLOPs per step (activation recompute not counted); tests/training/test_flops.py derives it by hand.
FLOPS_FORMULA = "6*N_nonemb*T + 6*d*V*T + 6*L*d_attn*sum_docs(l_d^2)"

# Peak dense bf16 TFLOP/s per GPU, looked up by device name (--peak-tflops overrides).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "B200": 2250.0, "GB200": 2500.0}


def non_embedding_parameters(arch: ModelArch) -> int:
    """Parameters outside the embedding and output layer (weights, biases and norms)."""
    d, heads, groups, head_dim = arch.hidden_size, arch.num_attention_heads, arch.num_query_groups, arch.kv_channels
    attention = d * heads * head_dim + 2 * d * groups * head_dim + heads * head_dim * d
    if arch.add_qkv_bias:
        attention += heads * head_dim + 2 * groups * head_dim
    mlp = 3 * d * arch.ffn_hidden_size
    norms = 2 * d + (2 * head_dim if arch.qk_layernorm else 0)
    return arch.num_layers * (attention + mlp + norms) + d  # + final norm


def model_flops(arch: ModelArch, vocab_size: int, tokens: int, sum_squared_document_lengths: int) -> float:
    """Training FLOPs of ``tokens`` token positions whose documents have the given sum of squared lengths."""
    d_attn = arch.num_attention_heads * arch.kv_channels
    return (6.0 * non_embedding_parameters(arch) * tokens
            + 6.0 * arch.hidden_size * vocab_size * tokens
            + 6.0 * arch.num_layers * d_attn * sum_squared_document_lengths)


def sum_squared_document_lengths(cu_seqlens) -> int:
    """Sum of the squared document lengths of a batch's ``cu_seqlens [B, S+1]`` (the attention term of
    the FLOP count): the lengths are its steps, and its padding entries (repeats of ``S``) add 0."""
    steps = np.diff(np.asarray(cu_seqlens, dtype=np.int64).reshape(-1, np.shape(cu_seqlens)[-1]), axis=1)
    return int((steps * steps).sum())


def throughput(flops: float, step_time_s: float, world_size: int, peak: Optional[float]) -> tuple[float, Optional[float]]:
    """TFLOP/s per GPU of a step of ``flops`` model FLOPs over ``world_size`` GPUs, and the MFU
    (that over the GPU's ``peak`` dense TFLOP/s; None without a peak)."""
    tflops_per_gpu = flops / max(step_time_s, 1e-9) / world_size / 1e12
    return tflops_per_gpu, (tflops_per_gpu / peak if peak else None)


def peak_tflops(override: Optional[float]) -> Optional[float]:
    if override:
        return override
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def tail_share(bucket_tokens: list, bucket_lower_edges: list, tau: int) -> float:
    total = sum(bucket_tokens)
    tail = sum(c for c, edge in zip(bucket_tokens, bucket_lower_edges) if edge >= tau)
    return tail / total if total else 0.0


def truncate_metrics_file(path: str, last_iteration: int) -> int:
    """Keep the lines of iterations ``<= last_iteration`` (atomically); returns how many were dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A line cut short by a hard kill: it belongs to an iteration being redone.
                dropped += 1
                continue
            if record.get("iteration", 0) <= last_iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    atomic_io.write_text(path, "".join(kept))
    return dropped


class RunLogger:
    """Console, metrics file, tensorboard and wandb output of the logging rank."""

    def __init__(self, args, resumed_iteration: int):
        self.args = args
        self.metrics_file = None
        if args.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(args.metrics_file)), exist_ok=True)
            dropped = truncate_metrics_file(args.metrics_file, resumed_iteration)
            if dropped:
                print(f"[metrics] dropped {dropped} line(s) past iteration {resumed_iteration} from "
                      f"{args.metrics_file} (resumed from there)", flush=True)
            self.metrics_file = open(args.metrics_file, "a")
        self.tensorboard = None
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=args.tensorboard_dir, purge_step=resumed_iteration + 1)
        self.wandb = None
        if args.wandb_project:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name, config=vars(args),
                                    resume="allow")

    def write_record(self, record: dict) -> None:
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    def scalars(self, prefix: str, values: dict, iteration: int) -> None:
        if self.tensorboard:
            for name, value in values.items():
                if value is not None:
                    self.tensorboard.add_scalar(f"{prefix}/{name}", value, iteration)
        if self.wandb:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items() if v is not None}, step=iteration)

    def training_line(self, record: dict, *, elapsed_s: float, iterations: int, tokens_per_s: float,
                      tflops_per_gpu: Optional[float], mfu: Optional[float]) -> None:
        exact = record["exact"]
        text = (
            f"iteration {record['iteration']:8d}/{self.args.train_iters} | "
            f"loss {record['loss']:.6f} | lm loss {record['lm_loss']:.6f} | lr {record['lr']:.3e} | "
            f"grad norm {record['grad_norm']:.3f} | {1000 * elapsed_s / max(iterations, 1):.1f} ms/iter | "
            f"tokens/s {tokens_per_s:.0f}"
        )
        if tflops_per_gpu is not None:
            text += f" | TFLOP/s/GPU {tflops_per_gpu:.1f}"
            if mfu is not None:
                text += f" | MFU {100 * mfu:.1f}%"
            text += f" (FLOPs = {FLOPS_FORMULA})"
        if record.get("skipped"):
            text += " | SKIPPED (non-finite loss)"
        print(text, flush=True)
        shares = [c / max(sum(exact["bucket_tokens"]), 1) for c in exact["bucket_tokens"]]
        buckets = " ".join(
            f"[{edge}:{share:.3f}/{ce:.3f}]" if ce is not None else f"[{edge}:{share:.3f}/-]"
            for edge, share, ce in zip(exact["bucket_lower_edges"], shares, exact["bucket_ce_mean"] or [None] * len(shares))
            if share > 0
        )
        print(
            f"    exact | tail share (>= {exact['tau']}) {exact['tail_share']:.4f} | weight mean "
            f"{exact['weight_mean']:.4f} max {exact['weight_max']:.4f} | bucket [lower edge: share/mean CE] {buckets}",
            flush=True,
        )

    def validation_line(self, record: dict) -> None:
        buckets = " ".join(
            f"[{edge}:{ce:.3f}]" for edge, ce in zip(record["bucket_lower_edges"], record["bucket_ce_mean"])
            if ce is not None
        )
        print(f"validation at iteration {record['iteration']} | lm loss {record['lm_loss']:.6f} | "
              f"tokens {record['tokens']} | per bucket [lower edge: mean CE] {buckets}", flush=True)

    def close(self) -> None:
        if self.metrics_file:
            self.metrics_file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
