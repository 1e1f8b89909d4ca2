"""GPU check of PackedDocumentAttention's two non-TE paths: flash varlen vs one SDPA call per document.

Needs CUDA (skips with a message without it). For packed rows of 4K and 16K tokens (long-tailed document lengths,
GQA 14/2 heads of 64 as in Qwen2.5-0.5B), it prints the largest difference of each
path's bf16 output and input gradients from an fp32 per-document reference, and
the forward+backward time of each path (median of 10 after 3 warm-ups).

    python bench/gpu_packed_attention.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def long_tailed_lengths(total: int, generator: torch.Generator) -> list[int]:
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.empty(1).log_normal_(5.5, 1.2, generator=generator).clamp(1, total).item()))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_packed_attention.py: skipped, needs a CUDA GPU")
        return

    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_exact.model import attention
    from megatron_exact.model.builder import transformer_config
    from megatron_exact.model.config import get_preset
    from megatron_exact.platform.distributed import initialize_model_parallel

    initialize_model_parallel(1, 1, 1)
    if attention._VARLEN_ATTENTION is None:
        sys.exit(f"torch {torch.__version__} has no torch.nn.attention.varlen: only the per-document path exists")
    arch = get_preset("qwen2.5-0.5b").replace(num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                                             hidden_size=args.heads * args.head_dim)
    module = attention.PackedDocumentAttention(transformer_config(arch), 1, AttnMaskType.causal).cuda()
    varlen = attention._VARLEN_ATTENTION
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; heads {args.heads}/{args.kv_heads} x {args.head_dim}")
    print(f"{'tokens':>7} {'docs':>5} {'path':>13} {'max|out-ref|':>13} {'max|grad-ref|':>14} {'fwd+bwd ms':>11}")
    for total in args.tokens:
        generator = torch.Generator().manual_seed(total)
        lengths = long_tailed_lengths(total, generator)
        cu = torch.tensor([0] + lengths).cumsum(0).int()
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
        q = torch.randn(total, args.heads, args.head_dim, generator=generator).cuda()
        k = torch.randn(total, args.kv_heads, args.head_dim, generator=generator).cuda()
        v = torch.randn(total, args.kv_heads, args.head_dim, generator=generator).cuda()
        grad_out = torch.randn(total, args.heads * args.head_dim, generator=generator).cuda()

        def run(path, dtype):
            leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            if path == "varlen":
                out = varlen(*leaves, cu.cuda(), max(lengths), module.softmax_scale).reshape(total, -1)
            else:  # the per-document loop, which fp32 (and CPU) always take
                attention._VARLEN_ATTENTION = None
                try:
                    out = module(*leaves, None, packed_seq_params=params)
                finally:
                    attention._VARLEN_ATTENTION = varlen
            out.backward(grad_out.to(dtype))
            return out.float(), [t.grad.float() for t in leaves]

        ref_out, ref_grads = run("per_document", torch.float32)
        for path in ("varlen", "per_document"):
            out, grads = run(path, torch.bfloat16)
            times = []
            for i in range(13):
                torch.cuda.synchronize()
                start = time.perf_counter()
                run(path, torch.bfloat16)
                torch.cuda.synchronize()
                if i >= 3:
                    times.append((time.perf_counter() - start) * 1e3)
            grad_diff = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
            print(f"{total:>7} {len(lengths):>5} {path:>13} {(out - ref_out).abs().max().item():>13.4f} "
                  f"{grad_diff:>14.4f} {statistics.median(times):>11.2f}")


if __name__ == "__main__":
    main()
