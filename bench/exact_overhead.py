"""Cost of the EXACT loss over the uniform one, per forward/backward step, on CPU.

One process, a tiny Qwen2-style model (so the model is cheap and the loss
side is as large a share of the step as it gets: a conservative setting),
Megatron DDP + ``finalize_model_grads`` + the no-pipelining schedule, one
packed micro-batch of documents with long-tailed lengths. ``uniform`` and
``exact`` steps alternate in ABBA order (drift hits both alike); each step
includes ``begin_step`` (bucket counts, the count all-reduce and the weights)
and ``step_statistics`` as the trainer calls them.

    python bench/exact_overhead.py [--seq-lengths 4096 16384] [--steps 9]

Prints the median and spread of the step time per objective (process CPU
time, which other jobs on a shared machine disturb far less than wall time;
wall medians alongside) and the overhead, plus the loss's own work timed
alone (begin_step, loss_func and its backward, step_statistics on a fixed
per-token CE), which isolates what EXACT adds from step-to-step noise.
Results are recorded in BENCHMARKS.md ("EXACT overhead").
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_exact.platform.distributed import destroy_model_parallel, initialize_model_parallel  # noqa: E402


def long_tailed_documents(seq_length: int, generator: torch.Generator) -> list[list[int]]:
    """Documents with log-uniform lengths (8 .. seq_length) filling seq_length + 1 tokens."""
    lengths, remaining = [], seq_length + 1
    while remaining > 0:
        length = int(torch.exp(torch.empty(1).uniform_(torch.log(torch.tensor(8.0)), torch.log(torch.tensor(float(seq_length))), generator=generator)))
        lengths.append(min(length, remaining))
        remaining -= lengths[-1]
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


class Timing(NamedTuple):
    wall: float
    cpu: float  # process CPU time over all threads: robust to other jobs on a shared machine


def interleaved(run, pairs: int, label: str = "") -> dict[str, list[Timing]]:
    """Time ``run("uniform")`` and ``run("exact")`` alternately in ABBA order (drift hits both alike)."""
    times = {"uniform": [], "exact": []}
    for pair in range(pairs):
        for name in ("uniform", "exact") if pair % 2 == 0 else ("exact", "uniform"):
            wall, cpu = time.perf_counter(), time.process_time()
            run(name)
            times[name].append(Timing(time.perf_counter() - wall, time.process_time() - cpu))
        if label:
            print(f"  {label}: pair {pair + 1}/{pairs}  uniform {times['uniform'][-1].cpu:.3f} s CPU "
                  f"({times['uniform'][-1].wall:.3f} s wall)  exact {times['exact'][-1].cpu:.3f} s CPU "
                  f"({times['exact'][-1].wall:.3f} s wall)", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--steps", type=int, default=9, help="timed steps per objective and sequence length (>= 5)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.steps < 5:
        parser.error("--steps must be at least 5")
    torch.set_num_threads(args.threads)

    initialize_model_parallel(1, 1, 1, seed=1234)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_exact.loss import ExactConfig, ExactLoss
    from megatron_exact.model.builder import build_gpt_model, transformer_config
    from megatron_exact.model.config import get_preset
    from megatron_exact.model.packing import batch_from_documents, pack_batch

    arch = get_preset("tiny-qwen2")
    print(f"model tiny-qwen2 ({arch.num_layers} layers, hidden {arch.hidden_size}), {args.threads} threads, "
          f"{args.steps} timed steps per objective after 1 warm-up each", flush=True)
    rows = []
    for seq_length in args.seq_lengths:
        config = transformer_config(arch)
        model = build_gpt_model(arch, config, seq_length=seq_length)
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = ddp.no_sync
        packed = pack_batch(batch_from_documents(long_tailed_documents(seq_length, torch.Generator().manual_seed(0)), seq_length))
        losses = {
            "uniform": ExactLoss(ExactConfig(weighting="uniform"), seq_length),
            "exact": ExactLoss(ExactConfig(weighting="exact"), seq_length),
        }

        def step(loss: ExactLoss) -> None:
            ddp.zero_grad_buffer()
            loss.begin_step([packed])

            def forward_step(data_iterator, model):
                pb = next(data_iterator)
                output = model(pb.tokens, pb.position_ids, None, labels=pb.labels, packed_seq_params=pb.packed_seq_params)
                return output, functools.partial(loss.loss_func, pb)

            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([packed]), model=[ddp], num_microbatches=1,
                seq_length=packed.num_tokens, micro_batch_size=1, forward_only=False,
            )
            loss.step_statistics()

        def loss_side(loss: ExactLoss) -> None:
            """The loss's own work on a fixed per-token CE (no model): everything EXACT adds is in here."""
            loss.begin_step([packed])
            value, _, _ = loss.loss_func(packed, token_losses)
            value.backward()
            loss.step_statistics()

        token_losses = torch.rand(1, packed.num_tokens, requires_grad=True)
        loss_times = interleaved(lambda name: loss_side(losses[name]), pairs=40)
        loss_ms = {name: statistics.median(t.cpu for t in values) * 1e3 for name, values in loss_times.items()}
        print(f"  seq {seq_length}: loss side alone (CPU time, median of 40): uniform {loss_ms['uniform']:.2f} ms, "
              f"exact {loss_ms['exact']:.2f} ms", flush=True)

        step(losses["uniform"]), step(losses["exact"])  # warm-up
        times = interleaved(lambda name: step(losses[name]), pairs=args.steps, label=f"seq {seq_length}")
        stats = losses["exact"].step_statistics()
        tail = sum(c for c, e in zip(stats["bucket_tokens"], stats["bucket_lower_edges"]) if e >= stats["tau"])
        rows.append((seq_length, times, loss_ms, tail / stats["tokens"], max(stats["bucket_weights"])))
        del ddp, model

    print()
    print("| seq | uniform step, CPU s: median (min-max) | exact step, CPU s: median (min-max) "
          "| overhead (CPU): ratio of medians (range of pair ratios) | wall s medians: uniform / exact "
          "| loss side alone, CPU ms: uniform / exact (extra as % of a step) | tail share / max weight |")
    print("|---|---|---|---|---|---|---|")
    for seq_length, times, loss_ms, tail_share, max_weight in rows:
        cpu = {name: [t.cpu for t in values] for name, values in times.items()}
        wall = {name: statistics.median(t.wall for t in values) for name, values in times.items()}
        cells = [f"{statistics.median(cpu[n]):.3f} ({min(cpu[n]):.3f}-{max(cpu[n]):.3f})" for n in ("uniform", "exact")]
        overhead = statistics.median(cpu["exact"]) / statistics.median(cpu["uniform"]) - 1
        ratios = [e / u - 1 for u, e in zip(cpu["uniform"], cpu["exact"])]
        extra = (loss_ms["exact"] - loss_ms["uniform"]) / 1e3 / statistics.median(cpu["uniform"])
        print(f"| {seq_length} | {cells[0]} | {cells[1]} | {overhead:+.1%} ({min(ratios):+.1%} .. {max(ratios):+.1%}) "
              f"| {wall['uniform']:.3f} / {wall['exact']:.3f} | {loss_ms['uniform']:.2f} / {loss_ms['exact']:.2f} ({extra:+.3%}) "
              f"| {tail_share:.2f} / {max_weight:.3f} |")
    destroy_model_parallel()


if __name__ == "__main__":
    main()
