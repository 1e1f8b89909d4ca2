"""Training throughput of a preset on one GPU: tokens/s, TFLOP/s, MFU, peak memory, EXACT's cost.

For every preset x sequence length (default ``llama3.2-1b`` and
``qwen2.5-0.5b`` at 4096 and 16384 tokens): a randomly initialised model
built as the trainer builds it (same layer spec, fused kernels and output
loss: the implementation choice of :mod:`megatron_exact.model.paths`, printed),
bf16 on CUDA, Megatron DDP + Adam + the no-pipelining schedule, then
``--warmup`` steps and ``--steps`` timed steps of each loss weighting,
``uniform`` and ``exact`` alternating in ABBA order on the same model and the
same batches. A step is what the trainer's step is: ``begin_step``, the
forward/backward of every micro-batch through :class:`ExactLoss`,
``step_statistics`` and the optimizer step (data preparation excluded).

Data: synthetic packed samples of ``seq_length + 1`` tokens (uniform random
ids) whose document lengths are drawn from a log-normal distribution with
median 1,000 tokens and sigma 1.5 (heavy-tailed: a document is longer than
8K tokens with probability ~8%), cut at the sample's end as Megatron's
GPTDataset does. Each micro-batch packs ``--micro-batch-size`` samples into
one THD row (default: as many as make a 16K-token row); a step holds
``--tokens-per-step`` tokens (default 65,536).

FLOPs per step as in ``megatron_exact/training/logging.py``
(``6*N_nonemb*T + 6*d*V*T + 6*L*d_attn*sum_docs(l_d^2)``, causal attention
counted per document, recompute not counted); MFU against the GPU's dense
bf16 peak (``--peak-tflops`` overrides the lookup). One JSON line per
configuration (to stdout and ``--out``).

    python bench/train_throughput.py                      # the GPU measurement (needs CUDA)
    python bench/train_throughput.py --loss-paths fused plain --presets qwen2.5-0.5b --seq-lengths 16384
    python bench/train_throughput.py --dry-run            # tiny preset, few steps, CPU
    python bench/train_throughput.py --summarize runs/gpu_check/train_throughput.jsonl   # the table

``--loss-paths``: ``auto`` (the default choice), ``fused`` or ``plain``
(forced with the trainer's ``--cross-entropy-loss-fusion`` /
``--no-cross-entropy-loss-fusion``); with several, each line of a later path
also gives its peak memory relative to the first one's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DOCUMENT_MEDIAN, DOCUMENT_SIGMA = 1000.0, 1.5
LOSS_PATHS = {"auto": None, "fused": True, "plain": False}


def document_lengths(seq_length: int, generator: torch.Generator) -> list[int]:
    """Log-normal lengths (median DOCUMENT_MEDIAN, sigma DOCUMENT_SIGMA) filling seq_length + 1 tokens."""
    lengths, remaining = [], seq_length + 1
    while remaining > 0:
        draw = torch.empty(1).log_normal_(math.log(DOCUMENT_MEDIAN), DOCUMENT_SIGMA, generator=generator)
        lengths.append(min(max(int(draw.item()), 1), remaining))
        remaining -= lengths[-1]
    return lengths


def synthetic_steps(steps: int, microbatches: int, samples: int, seq_length: int, vocab: int, seed: int) -> list:
    """``steps`` lists of micro-batches (each a batch of the contract, ``samples`` x seq_length)."""
    from megatron_exact.model.packing import batch_from_documents

    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(steps):
        step = []
        for _ in range(microbatches):
            batch = []
            for _ in range(samples):
                docs = [torch.randint(0, vocab, (n,), generator=generator).tolist()
                        for n in document_lengths(seq_length, generator)]
                batch.append(batch_from_documents(docs, seq_length))
            step.append({key: torch.cat([b[key] for b in batch]) for key in batch[0]})
        result.append(step)
    return result


@dataclasses.dataclass
class Setup:
    preset: str
    seq_length: int
    micro_batch_size: int
    num_microbatches: int
    loss_path: str


def measure(setup: Setup, args, device: torch.device) -> dict:
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from megatron_exact.loss import ExactConfig, ExactLoss
    from megatron_exact.model.builder import build_gpt_model, padded_vocab_size, transformer_config
    from megatron_exact.model.config import get_preset
    from megatron_exact.model.packing import pack_batch
    from megatron_exact.model.paths import PathRequest, select_paths
    from megatron_exact.training.logging import (FLOPS_FORMULA, model_flops, peak_tflops,
                                                 sum_squared_document_lengths, throughput)

    cuda = device.type == "cuda"
    bf16 = cuda and not args.fp32
    arch = get_preset(setup.preset)
    paths = select_paths(PathRequest(cross_entropy_loss_fusion=LOSS_PATHS[setup.loss_path], bf16=bf16,
                                     cross_entropy_chunk_tokens=args.cross_entropy_chunk_tokens))
    print(f"[{setup.preset} seq {setup.seq_length} loss {setup.loss_path}] {paths.describe()}", flush=True)
    overrides = dict(paths.config_overrides())
    if args.recompute_granularity:
        overrides["recompute_granularity"] = args.recompute_granularity
        if args.recompute_granularity == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
    config = transformer_config(arch, bf16=bf16, **overrides)
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    vocab = padded_vocab_size(arch.vocab_size)
    build_start = time.perf_counter()
    model = build_gpt_model(arch, config, seq_length=setup.seq_length, paths=paths)
    if cuda:
        model.cuda(device)
    if bf16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-5, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32),
        [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp.no_sync
    build_s = time.perf_counter() - build_start

    batches = synthetic_steps(2, setup.num_microbatches, setup.micro_batch_size, setup.seq_length, arch.vocab_size,
                              args.seed)
    packed_steps, flops = [], []
    for step in batches:
        packed = []
        for batch in step:
            pb = pack_batch(batch)
            if cuda:
                pb.packed_seq_params.cu_seqlens_q = pb.packed_seq_params.cu_seqlens_q.to(device)
                pb.packed_seq_params.cu_seqlens_kv = pb.packed_seq_params.cu_seqlens_kv.to(device)
                pb.packed_seq_params.cu_seqlens_q_padded = pb.packed_seq_params.cu_seqlens_q_padded.to(device)
                pb.packed_seq_params.cu_seqlens_kv_padded = pb.packed_seq_params.cu_seqlens_kv_padded.to(device)
                pb = dataclasses.replace(pb, **{k: getattr(pb, k).to(device)
                                                for k in ("tokens", "labels", "loss_mask", "position_ids")})
            packed.append(pb)
        packed_steps.append(packed)
        tokens = sum(b["tokens"].numel() for b in step)
        squared = sum(sum_squared_document_lengths(b["cu_seqlens"]) for b in step)
        flops.append(model_flops(arch, vocab, tokens, squared))
    tokens_per_step = setup.num_microbatches * setup.micro_batch_size * setup.seq_length
    losses = {name: ExactLoss(ExactConfig(weighting=name), setup.seq_length) for name in ("uniform", "exact")}
    forward_backward = get_forward_backward_func()

    def train_step(weighting: str, index: int) -> tuple[float, float]:
        microbatches, loss = packed_steps[index % 2], losses[weighting]
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss.begin_step(microbatches)

        def forward_step(data_iterator, model):
            pb = next(data_iterator)
            output = model(pb.tokens, pb.position_ids, None, labels=pb.labels, packed_seq_params=pb.packed_seq_params)
            return output, functools.partial(loss.loss_func, pb)

        forward_backward(forward_step_func=forward_step, data_iterator=iter(microbatches), model=[ddp],
                         num_microbatches=len(microbatches), seq_length=microbatches[0].num_tokens,
                         micro_batch_size=1, forward_only=False)
        stats = loss.step_statistics()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, stats["objective"]

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = {"uniform": [], "exact": []}
    first_loss = {}
    for index in range(args.warmup):
        for name in ("uniform", "exact"):
            _, value = train_step(name, index)
            first_loss.setdefault(name, value)
    for pair in range(args.steps):
        for name in ("uniform", "exact") if pair % 2 == 0 else ("exact", "uniform"):
            seconds, value = train_step(name, pair)
            first_loss.setdefault(name, value)
            times[name].append(seconds)
    peak = peak_tflops(args.peak_tflops)
    record = {
        "preset": setup.preset, "seq_length": setup.seq_length, "micro_batch_size": setup.micro_batch_size,
        "num_microbatches": setup.num_microbatches, "tokens_per_step": tokens_per_step,
        "loss_path": setup.loss_path, "paths": paths.record(), "paths_reasons": paths.reasons,
        "recompute": args.recompute_granularity, "dtype": "bf16" if bf16 else "fp32",
        "documents": f"log-normal(median {DOCUMENT_MEDIAN:g}, sigma {DOCUMENT_SIGMA:g}) cut to seq_length + 1",
        "flops_formula": FLOPS_FORMULA, "peak_tflops": peak, "warmup_steps": args.warmup,
        "timed_steps": args.steps, "build_s": round(build_s, 2),
    }
    mean_flops = statistics.mean(flops)
    for name, values in times.items():
        median = statistics.median(values)
        tflops, mfu = throughput(mean_flops, median, 1, peak)
        record[name] = {"step_s_median": median, "step_s_min": min(values), "step_s_max": max(values),
                        "tokens_per_s": tokens_per_step / median, "tflops_per_gpu": tflops, "mfu": mfu,
                        "first_loss": first_loss[name]}
    record["exact_over_uniform_step_time"] = record["exact"]["step_s_median"] / record["uniform"]["step_s_median"]
    record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    if cuda:
        record["device"] = torch.cuda.get_device_name(device)
    del ddp, model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return record


def summarize(path: str) -> None:
    """The BENCHMARKS.md table of a JSON-lines file: one row per preset x length x loss path x weighting."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    print("| preset | seq | loss path | weighting | tokens/step | step s (median) | tokens/s | TFLOP/s/GPU | MFU "
          "| peak GiB | exact/uniform step time | paths |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in records:
        p = r["paths"]
        paths = f"{p['transformer_impl']}, attention {p['attention']}, norm {p['norm']}, swiglu {p['swiglu']}, loss {p['loss']}"
        for name in ("uniform", "exact"):
            m = r[name]
            mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "-"
            peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
            print(f"| {r['preset']} | {r['seq_length']} | {r['loss_path']} | {name} | {r['tokens_per_step']} "
                  f"| {m['step_s_median']:.3f} | {m['tokens_per_s']:.0f} | {m['tflops_per_gpu']:.1f} | {mfu} | {peak} "
                  f"| {r['exact_over_uniform_step_time']:.4f} | {paths} |")
    for r in records:
        for key, value in r.items():
            if key.startswith("peak_memory_vs_"):
                print(f"\n{r['preset']} at {r['seq_length']}: peak memory of the {r['loss_path']} output loss = "
                      f"{value:.3f} x the {key.removeprefix('peak_memory_vs_')} one's ({r['peak_memory_gib']:.1f} GiB)")


def versions() -> dict:
    from importlib import metadata

    found = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("megatron-core", "liger-kernel", "transformer-engine"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["llama3.2-1b", "qwen2.5-0.5b"])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--micro-batch-size", type=int,
                        help="samples packed per micro-batch (default: enough for a 16K-token row)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per weighting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per weighting first")
    parser.add_argument("--loss-paths", nargs="+", choices=sorted(LOSS_PATHS), default=["auto"])
    parser.add_argument("--cross-entropy-chunk-tokens", type=int, default=1024)
    parser.add_argument("--recompute-granularity", choices=("full", "selective"))
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 on CUDA")
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", help="also append the JSON lines here")
    parser.add_argument("--summarize", metavar="JSONL", help="print the markdown table of a results file and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU check of the whole measurement: tiny-qwen2 at 128 tokens, 512 tokens per step "
                             "(2 micro-batches of 2 samples), 1 warm-up + 2 timed steps, fused and plain loss")
    args = parser.parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return 0
    if args.dry_run:
        args.presets, args.seq_lengths, args.tokens_per_step = ["tiny-qwen2"], [128], 512
        args.micro_batch_size, args.steps, args.warmup, args.loss_paths = 2, 2, 1, ["fused", "plain"]
    elif not torch.cuda.is_available():
        print("bench/train_throughput.py: skipped, needs a CUDA GPU (--dry-run checks it on the CPU)")
        return 0
    for value, flag in ((args.steps, "--steps"), (args.tokens_per_step, "--tokens-per-step")):
        if value < 1:
            parser.error(f"{flag} must be positive")

    from megatron_exact.platform.distributed import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1, 1, 1, seed=args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    print(f"versions: {json.dumps(versions())}", flush=True)
    out = open(args.out, "a") if args.out else None
    try:
        for preset in args.presets:
            for seq_length in args.seq_lengths:
                samples = args.micro_batch_size or max(1, 16384 // seq_length)
                if args.tokens_per_step % (samples * seq_length):
                    parser.error(f"--tokens-per-step {args.tokens_per_step} is not a multiple of micro-batch size "
                                 f"{samples} x seq length {seq_length}")
                first_peak = None
                for loss_path in args.loss_paths:
                    setup = Setup(preset, seq_length, samples, args.tokens_per_step // (samples * seq_length), loss_path)
                    record = measure(setup, args, device)
                    record["versions"] = versions()
                    if first_peak is None:
                        first_peak = (loss_path, record["peak_memory_gib"])
                    elif first_peak[1]:
                        record[f"peak_memory_vs_{first_peak[0]}"] = record["peak_memory_gib"] / first_peak[1]
                    line = json.dumps(record)
                    print(line, flush=True)
                    if out:
                        out.write(line + "\n")
                        out.flush()
    finally:
        if out:
            out.close()
        destroy_model_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
