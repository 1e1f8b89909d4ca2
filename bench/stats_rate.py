"""Effective-context stats rate (tokens per second, one core).

Builds a packed dataset (documents of mean 1,000 tokens) and times
``effective_context_stats`` over many epochs' worth of samples, with document
masking on and off; the counting reads only the dataset's indices.

    python bench/stats_rate.py [--seq-length 4096] [--samples 100000]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402

from megatron_exact.data.dataset import build_train_valid_test_datasets  # noqa: E402
from megatron_exact.data.stats import effective_context_stats  # noqa: E402
from megatron_exact.data.tokenizers import build_tokenizer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=100000)
    parser.add_argument("--corpus-tokens", type=int, default=8 * 2**20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer("ByteTokenizer")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "corpus")
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        written = 0
        while written < args.corpus_tokens:
            length = int(rng.exponential(1000)) + 1
            builder.add_document(np.zeros(length, dtype=np.uint16), [length])
            written += length
        builder.finalize(prefix + ".idx")
        print(f"{'masking':>8} {'samples':>9} {'tokens':>13} {'seconds':>8} {'M tokens/s':>11}")
        for masking in (True, False):
            start = time.perf_counter()
            train, _, _ = build_train_valid_test_datasets([prefix], "100,0,0", args.seq_length, 1, (args.samples, 0, 0),
                                                          document_masking=masking, tokenizer=tokenizer)
            build_seconds = time.perf_counter() - start
            stats = effective_context_stats(train)
            tokens = stats.num_samples * args.seq_length
            print(f"{'on' if masking else 'off':>8} {stats.num_samples:>9,} {tokens:>13,} {stats.seconds:>8.3f} "
                  f"{tokens / stats.seconds / 1e6:>11.1f}   (index build, not counted: {build_seconds:.1f} s)")


if __name__ == "__main__":
    main()
