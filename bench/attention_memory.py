"""Peak memory of document-masked attention vs a dense block-diagonal mask (CPU, forward + backward).

Compares, on the same packed row of documents:

* ``document``: :class:`megatron_exact.model.attention.PackedDocumentAttention`, the CPU
  core attention of our layer spec (causal attention per document, no ``T x T`` tensor);
* ``dense_mask``: one ``scaled_dot_product_attention`` call over the whole row with a
  dense ``[T, T]`` block-diagonal causal mask, what attention without document-aware
  kernels must do.

Each (method, length) case runs in a fresh interpreter; the number reported is the
growth of the process's peak RSS (``ru_maxrss``) from the end of setup (imports,
inputs) to the end of forward + backward. Document lengths are drawn log-normally
(long-tailed, like web text) and scaled to fill the row.

Usage: python bench/attention_memory.py [--seq-lengths 4096 8192 16384] [--num-documents 100]
Writes a table to stdout and JSON + PNG to --output-dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("document", "dense_mask")


def document_lengths(total: int, num_documents: int, seed: int) -> list[int]:
    """Long-tailed document lengths (log-normal, sigma 1) summing to ``total``, each >= 1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    weights = torch.empty(num_documents).log_normal_(0.0, 1.0, generator=gen)
    lengths = (weights / weights.sum() * (total - num_documents)).floor().long() + 1
    lengths[torch.argmax(lengths)] += total - int(lengths.sum())
    return lengths.tolist()


def _child(method: str, seq_length: int, num_documents: int, heads: int, head_dim: int, seed: int) -> dict:
    """Run one case in this (fresh) process and return its measurements."""
    import resource

    import torch
    import torch.nn.functional as F

    from megatron_exact.platform.distributed import initialize_model_parallel

    initialize_model_parallel(1, 1, 1)
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_exact.model.attention import PackedDocumentAttention

    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                               kv_channels=head_dim, attention_dropout=0.0, hidden_dropout=0.0)
    module = PackedDocumentAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal)

    def forward_backward(lengths, q, k, v):
        total = sum(lengths)
        if method == "document":
            cu_seqlens = torch.tensor([0] + lengths).cumsum(0).int()
            params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                     max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
            out = module(q, k, v, None, packed_seq_params=params)
        else:
            doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            causal = torch.ones(total, total, dtype=torch.bool).tril_()
            mask = (doc_ids[:, None] == doc_ids[None, :]) & causal
            out = F.scaled_dot_product_attention(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), attn_mask=mask)
        out.float().sum().backward()

    def inputs(total):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(total, heads, head_dim, generator=gen).requires_grad_() for _ in range(3)]

    # Warm-up on a short row so one-time costs (kernel selection, thread pools) are not counted.
    forward_backward(document_lengths(256, 8, seed), *inputs(256))
    lengths = document_lengths(seq_length, num_documents, seed)
    q, k, v = inputs(seq_length)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    forward_backward(lengths, q, k, v)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method, "seq_length": seq_length, "num_documents": num_documents,
        "max_document": max(lengths), "heads": heads, "head_dim": head_dim,
        "peak_increase_mib": (peak_kib - baseline_kib) / 1024, "seconds": seconds,
    }


def _run_case(args, method: str, seq_length: int) -> dict:
    command = [sys.executable, __file__, "--child", method, str(seq_length), "--num-documents", str(args.num_documents),
               "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--seed", str(args.seed)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{method} at {seq_length} tokens failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        points = [(r["seq_length"], r["peak_increase_mib"]) for r in rows if r["method"] == method]
        ax.plot(*zip(*points), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("packed tokens T")
    ax.set_ylabel("peak RSS increase, fwd+bwd (MiB)")
    ax.set_title("Attention memory: per-document vs dense mask (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--num-documents", type=int, default=100)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per case (default 1, for stable numbers)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SEQ_LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, seq_length = args.child
        print(json.dumps(_child(method, int(seq_length), args.num_documents, args.heads, args.head_dim, args.seed)))
        return

    rows = []
    print(f"{'tokens':>7} {'method':>10} {'max doc':>8} {'peak MiB':>9} {'seconds':>8}", flush=True)
    for seq_length in args.seq_lengths:
        for method in METHODS:
            row = _run_case(args, method, seq_length)
            rows.append(row)
            print(f"{seq_length:>7} {method:>10} {row['max_document']:>8} {row['peak_increase_mib']:>9.1f} "
                  f"{row['seconds']:>8.2f}", flush=True)

    print(f"\n{'tokens':>7} {'document MiB':>13} {'dense MiB':>10} {'dense/doc':>10}")
    by_key = {(r["method"], r["seq_length"]): r["peak_increase_mib"] for r in rows}
    for seq_length in args.seq_lengths:
        doc, dense = by_key["document", seq_length], by_key["dense_mask", seq_length]
        print(f"{seq_length:>7} {doc:>13.1f} {dense:>10.1f} {dense / doc:>10.1f}")
    # Growth exponent p in memory ~ T^p between the shortest and longest rows: ~1 linear, ~2 quadratic.
    lo, hi = min(args.seq_lengths), max(args.seq_lengths)
    for method in METHODS:
        exponent = math.log(by_key[method, hi] / by_key[method, lo]) / math.log(hi / lo)
        print(f"{method}: memory grows as T^{exponent:.2f} from {lo} to {hi} tokens")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / "attention_memory.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, json_path)
    png_path = args.output_dir / "attention_memory.png"
    _plot(rows, png_path)
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
