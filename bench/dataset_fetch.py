"""Per-sample fetch cost: ExactGPTDataset vs Megatron-Core's GPTDataset, at 4K and 16K.

Three datasets over the same generated corpus (documents of mean 2,000 tokens,
each ending with EOD) and the same indices:
- ``GPTDataset`` without masks (no reset flags, create_attention_mask=False): the baseline;
- ``ExactGPTDataset`` with document masking (boundaries, positions, loss mask);
- ``GPTDataset`` with Megatron-Core's own document masking (reset_position_ids,
  reset_attention_mask, eod_mask_loss, create_attention_mask): S x S mask per sample.

    python bench/dataset_fetch.py [--seq-lengths 4096 16384]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402

from megatron_exact.data.dataset import ExactGPTDataset, ExactGPTDatasetConfig  # noqa: E402
from megatron_exact.data.tokenizers import build_tokenizer  # noqa: E402


def make_corpus(prefix, total_tokens, eod, seed=0):
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    written = 0
    while written < total_tokens:
        length = int(rng.exponential(2000)) + 2
        doc = rng.integers(0, 256, size=length, dtype=np.uint16)
        doc[-1] = eod
        builder.add_document(doc, [length])
        written += length
    builder.finalize(prefix + ".idx")


def build(cls, config_cls, prefix, seq_length, num_samples, tokenizer, cache, **flags):
    config = config_cls(random_seed=1234, sequence_length=seq_length, blend=([prefix], None), split="100,0,0",
                        tokenizer=tokenizer, path_to_cache=cache, **flags)
    return BlendedMegatronDatasetBuilder(cls, [num_samples, 0, 0], lambda: True, config).build()[0]


def seconds_per_sample(dataset, ids, rounds=3):
    """Best per-sample CPU time (process time: robust to other jobs on a shared machine)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for i in ids:
            dataset[int(i)]
        best = min(best, (time.process_time() - start) / len(ids))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--samples", type=int, default=300, help="samples timed per dataset (fast paths)")
    parser.add_argument("--rounds", type=int, default=9, help="alternating timing rounds (best kept)")
    parser.add_argument("--mask-samples", type=int, default=3, help="samples timed on Megatron's S x S mask path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer("ByteTokenizer")
    plain = dict(reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    masked = dict(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True, create_attention_mask=True)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "corpus")
        make_corpus(prefix, 4 * 2**20, tokenizer.eod)
        print(f"{'S':>6} {'GPTDataset':>12} {'ours':>10} {'overhead':>9} | {'Mcore masks':>12} {'mask MiB':>9}")
        for S in args.seq_lengths:
            n = min(args.samples, (4 * 2**20) // (S + 1) - 1)
            base = build(GPTDataset, GPTDatasetConfig, prefix, S, n, tokenizer, os.path.join(tmp, "c"), **plain)
            ours = build(ExactGPTDataset, ExactGPTDatasetConfig, prefix, S, n, tokenizer, os.path.join(tmp, "c"), **plain)
            mcore = build(GPTDataset, GPTDatasetConfig, prefix, S, n, tokenizer, os.path.join(tmp, "c"), **masked)
            ids = np.random.default_rng(0).permutation(n)
            for dataset in (base, ours):  # warm the page cache and the lazily loaded indices
                seconds_per_sample(dataset, ids[:20], rounds=1)
            # Alternate rounds so both see the same machine load; keep each one's best.
            t_base = t_ours = float("inf")
            for _ in range(args.rounds):
                t_base = min(t_base, seconds_per_sample(base, ids, rounds=1))
                t_ours = min(t_ours, seconds_per_sample(ours, ids, rounds=1))
            t_mcore = seconds_per_sample(mcore, ids[: args.mask_samples], rounds=1)
            mask = mcore[int(ids[0])]["attention_mask"]
            mask_mib = mask.numel() * mask.element_size() / 2**20
            print(f"{S:>6} {t_base * 1e3:>10.3f}ms {t_ours * 1e3:>8.3f}ms {t_ours / t_base - 1:>+8.1%} | "
                  f"{t_mcore * 1e3:>10.1f}ms {mask_mib:>9.0f}")


if __name__ == "__main__":
    main()
