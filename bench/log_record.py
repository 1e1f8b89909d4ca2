"""The logging rank's per-iteration record-building cost (``batch_sha1`` and the FLOP count's
document term), before and after it was built from what each rank holds.

- before (the removed code path): the logging rank read the whole global batch again from the
  dataset and hashed it (``dataset[i]`` for every sample of the step);
- after: every rank hashes and measures only its own samples while fetching them (which it does
  anyway), the logging rank's data-parallel group all-gathers 20 bytes per sample and one integer
  per rank, and the logging rank combines the digests in sample order. Timed here: the logging
  rank's share (its own ``LOCAL`` samples' digests and document lengths, then combining the
  global batch's digests); the all-gather of ``20 x samples`` bytes is not (one small collective).

Samples of 16K tokens from a generated corpus (documents of mean 2,000 tokens), indices fresh.

    python bench/log_record.py [--samples 64 256] [--seq-length 16384] [--local 8] [--rounds 5]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dataset_fetch import build, make_corpus  # noqa: E402

from megatron_exact.data.dataset import ExactGPTDataset, ExactGPTDatasetConfig  # noqa: E402
from megatron_exact.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_exact.model.packing import document_lengths  # noqa: E402
from megatron_exact.training.logging import sum_squared_document_lengths  # noqa: E402
from megatron_exact.training.trainer import batch_sha1, collate, combine_sample_sha1s, sample_sha1  # noqa: E402


def before(dataset, samples: int):
    """Trainer._log_iteration as it was: the global batch read again, hashed, its documents measured."""
    batch = [dataset[i] for i in range(samples)]
    squared = sum(length * length for s in batch for length in document_lengths(s["cu_seqlens"].view(1, -1)))
    return batch_sha1(batch), squared


def after(dataset, samples: int, local: int):
    """The logging rank's share now: its own samples (already fetched for training) hashed and measured
    as they are collated, then every rank's digests combined in sample order."""
    own = [dataset[i] for i in range(local)]  # fetched for training anyway: not timed
    start = time.perf_counter()
    digests = [sample_sha1(sample) for sample in own]
    squared = sum_squared_document_lengths(collate(own)["cu_seqlens"])
    gathered = digests * (samples // local)  # the other ranks' digests arrive by the all-gather
    combine_sample_sha1s(gathered)
    return time.perf_counter() - start, squared


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seq-length", type=int, default=16384)
    parser.add_argument("--local", type=int, default=8, help="samples the logging rank holds per step")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer("ByteTokenizer", None)
    with tempfile.TemporaryDirectory() as root:
        prefix = os.path.join(root, "corpus")
        make_corpus(prefix, (max(args.samples) + 1) * args.seq_length + 1, tokenizer.eod)
        dataset = build(ExactGPTDataset, ExactGPTDatasetConfig, prefix, args.seq_length, max(args.samples),
                        tokenizer, os.path.join(root, "cache"), reset_position_ids=False, reset_attention_mask=False,
                        eod_mask_loss=False, create_attention_mask=False, document_masking=True)
        before(dataset, 4)  # warm the page cache and the lazily loaded indices
        print(f"logging rank's record building per iteration, {args.seq_length}-token samples "
              f"(median of {args.rounds} rounds; after: {args.local} samples held by the logging rank)")
        print(f"{'samples':>8} {'before ms':>10} {'after ms':>9} {'ratio':>7}")
        for samples in args.samples:
            old, new = [], []
            for _ in range(args.rounds):
                start = time.perf_counter()
                _, squared_before = before(dataset, samples)
                old.append(time.perf_counter() - start)
                seconds, _ = after(dataset, samples, args.local)
                new.append(seconds)
            assert squared_before > 0
            old_ms, new_ms = 1000 * float(np.median(old)), 1000 * float(np.median(new))
            print(f"{samples:>8} {old_ms:>10.1f} {new_ms:>9.2f} {old_ms / new_ms:>6.0f}x")


if __name__ == "__main__":
    main()
