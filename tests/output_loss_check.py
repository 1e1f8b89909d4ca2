"""Plain vs fused output loss on one model: the EXACT loss and every gradient, compared.

Used in-process by tests/test_output_loss.py (TP=1) and as a torchrun script
(TP=2, with and without sequence parallelism):

    torchrun --nproc-per-node=2 tests/output_loss_check.py --out results.json

One model, one packed micro-batch of several samples (micro-batch size > 1:
their documents packed into one THD row), EXACT weights with a real tail. The
same forward/backward runs twice, once through Megatron-Core's plain
vocab-parallel path (``model.output_loss = None``) and once through the fused
one; this rank's losses and parameter gradients are compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEQ = 96
TAU = 16
SAMPLE_DOCUMENTS = ([97], [30, 50, 17], [9, 88])  # three samples: one packed row of 3 x SEQ tokens


def packed_microbatch(tensor_model_parallel_size: int = 1, sequence_parallel: bool = False, vocab: int = 256):
    from megatron_exact.model.packing import batch_from_documents, pack_batch

    generator = torch.Generator().manual_seed(7)
    samples = [batch_from_documents([torch.randint(0, vocab, (n,), generator=generator).tolist() for n in docs], SEQ)
               for docs in SAMPLE_DOCUMENTS]
    batch = {key: torch.cat([s[key] for s in samples]) for key in samples[0]}
    return pack_batch(batch, tensor_model_parallel_size=tensor_model_parallel_size, sequence_parallel=sequence_parallel)


def compare(preset: str = "tiny-qwen2", *, tensor_model_parallel_size: int = 1, sequence_parallel: bool = False,
            recompute: str | None = None, impl: str = "chunked", chunk_tokens: int = 50) -> dict:
    """Max |fused - plain| of the EXACT loss and of every gradient on this rank (Megatron's state set up)."""
    from megatron_exact.loss import ExactConfig, ExactLoss
    from megatron_exact.model.builder import build_gpt_model, transformer_config
    from megatron_exact.model.config import get_preset
    from megatron_exact.model.output_loss import FusedOutputLoss

    arch = get_preset(preset)
    overrides = {}
    if recompute == "full":
        overrides = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        overrides = dict(recompute_granularity="selective")
    config = transformer_config(arch, tensor_model_parallel_size=tensor_model_parallel_size,
                                sequence_parallel=sequence_parallel, **overrides)
    fused = FusedOutputLoss(impl=impl, chunk_tokens=chunk_tokens)
    torch.manual_seed(0)
    model = build_gpt_model(arch, config, seq_length=SEQ, output_loss=fused)
    packed = packed_microbatch(tensor_model_parallel_size, sequence_parallel)
    loss = ExactLoss(ExactConfig(weighting="exact", tau=TAU), SEQ)

    def step(output_loss):
        model.output_loss = output_loss
        model.zero_grad(set_to_none=True)
        loss.begin_step([packed])
        token_losses = model(packed.tokens, packed.position_ids, None, labels=packed.labels,
                             packed_seq_params=packed.packed_seq_params)
        value, _, _ = loss.loss_func(packed, token_losses)
        value.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        return token_losses.detach(), value.detach(), grads, loss.step_statistics()

    plain_tokens, plain_loss, plain_grads, plain_stats = step(None)
    fused_tokens, fused_loss, fused_grads, _ = step(fused)
    if set(plain_grads) != set(fused_grads):
        raise AssertionError(f"different parameters got gradients: {sorted(set(plain_grads) ^ set(fused_grads))}")
    grad_diffs = {name: float((fused_grads[name] - g).abs().max()) for name, g in plain_grads.items()}
    return {
        "loss": float(plain_loss),
        "loss_diff": abs(float(fused_loss) - float(plain_loss)),
        "token_loss_diff": float((fused_tokens - plain_tokens).abs().max()),
        "grad_diff": max(grad_diffs.values()),
        "worst_grad": max(grad_diffs, key=grad_diffs.get),
        "grad_scale": max(float(g.abs().max()) for g in plain_grads.values()),
        "parameters": len(plain_grads),
        "max_weight": max(plain_stats["bucket_weights"]),
        "tokens": packed.num_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from megatron_exact.platform.distributed import destroy_model_parallel, initialize_model_parallel

    results = {}
    for preset in ("tiny-qwen2", "tiny-llama3"):
        for sequence_parallel in (False, True):
            initialize_model_parallel(2, 1, 1, seed=1)
            name = f"{preset}-tp2{'-sp' if sequence_parallel else ''}"
            results[name] = compare(preset, tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
    rank = torch.distributed.get_rank()
    Path(f"{args.out}.rank{rank}").write_text(json.dumps(results))
    destroy_model_parallel()


if __name__ == "__main__":
    main()
