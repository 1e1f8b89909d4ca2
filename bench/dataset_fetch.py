"""Per-sample fetch cost: ExactGPTDataset vs Megatron-Core's GPTDataset, at 4K and 16K.

Datasets over the same generated corpus (documents of mean 2,000 tokens, each ending
with EOD) and the same indices:
- ``GPTDataset`` without masks (no reset flags, create_attention_mask=False, so its
  loss_mask/position_ids come from its cache): the baseline;
- ``ExactGPTDataset`` with document masking (boundaries, positions, loss mask);
- ``GPTDataset`` with Megatron-Core's own document masking (reset_position_ids,
  reset_attention_mask, eod_mask_loss, create_attention_mask): S x S mask per sample.

Two index modes: ``fresh`` (the process that builds the indices holds them as ndarrays)
and ``cached`` (every later run and every other rank loads them from the cache as
numpy.memmap; ExactGPTDataset hands Megatron's query plain ndarray views of them, so
there a third row, GPTDataset given the same views, separates that gain from the
boundary cost). Rounds alternate between the datasets in random order so all see the
same machine load; the overhead is the per-round ratio, median and quartiles, in
process CPU time and in wall time.

    python bench/dataset_fetch.py [--seq-lengths 4096 16384] [--rounds 15]
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


def seconds_per_sample(dataset, ids):
    """(CPU seconds, wall seconds) per sample over ``ids``."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in ids:
        dataset[int(i)]
    return (time.process_time() - cpu) / len(ids), (time.perf_counter() - wall) / len(ids)


def give_plain_views(dataset):
    """Megatron's cached indices as plain ndarray views (what ExactGPTDataset does)."""
    for name in ("shuffle_index", "sample_index", "document_index"):
        setattr(dataset, name, np.asarray(getattr(dataset, name)).view(np.ndarray))
    return dataset


def time_interleaved(datasets, ids, rounds, rng):
    """Per-round (cpu, wall) seconds per sample for each dataset, rounds in random order."""
    times = {name: [] for name in datasets}
    for name, dataset in datasets.items():  # warm the page cache and the lazily loaded indices
        seconds_per_sample(dataset, ids[:20])
    for _ in range(rounds):
        for name in rng.permutation(list(datasets)):
            times[name].append(seconds_per_sample(datasets[name], ids))
    return {name: np.array(t) for name, t in times.items()}


def quartiles(values):
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return f"{median:+7.1%} [{q1:+.1%}, {q3:+.1%}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--samples", type=int, default=300, help="samples timed per dataset and round (at most)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--mask-samples", type=int, default=3, help="samples timed on Megatron's S x S mask path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer("ByteTokenizer")
    plain = dict(reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    masked = dict(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True, create_attention_mask=True)
    rng = np.random.default_rng(0)
    print(f"load average at start: {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "corpus")
        make_corpus(prefix, 4 * 2**20, tokenizer.eod)
        cache = os.path.join(tmp, "cache")
        print(f"{'S':>6} {'indices':>7} {'dataset':>22} {'CPU/sample':>11} {'CPU overhead [quartiles]':>28} "
              f"{'wall overhead [quartiles]':>28}")
        for S in args.seq_lengths:
            n = min(args.samples, (4 * 2**20) // (S + 1) - 1)
            ids = rng.permutation(n)

            def build_both():
                return {"GPTDataset": build(GPTDataset, GPTDatasetConfig, prefix, S, n, tokenizer, cache, **plain),
                        "ExactGPTDataset": build(ExactGPTDataset, ExactGPTDatasetConfig, prefix, S, n, tokenizer,
                                                 cache, **plain)}

            modes = {"fresh": build_both()}  # builds and caches the indices
            modes["cached"] = build_both()  # loads them back as numpy.memmap
            assert type(modes["cached"]["GPTDataset"].shuffle_index) is np.memmap
            modes["cached"]["GPTDataset + views"] = give_plain_views(
                build(GPTDataset, GPTDatasetConfig, prefix, S, n, tokenizer, cache, **plain))
            for mode, datasets in modes.items():
                times = time_interleaved(datasets, ids, args.rounds, rng)
                base_cpu, base_wall = times["GPTDataset"][:, 0], times["GPTDataset"][:, 1]
                for name, t in times.items():
                    overheads = "" if name == "GPTDataset" else (
                        f"{quartiles(t[:, 0] / base_cpu - 1):>28} {quartiles(t[:, 1] / base_wall - 1):>28}")
                    print(f"{S:>6} {mode:>7} {name:>22} {np.median(t[:, 0]) * 1e3:>9.3f}ms {overheads}")
            mcore = build(GPTDataset, GPTDatasetConfig, prefix, S, n, tokenizer, cache, **masked)
            t_mcore, _ = seconds_per_sample(mcore, ids[: args.mask_samples])
            mask = mcore[int(ids[0])]["attention_mask"]
            print(f"{S:>6} Megatron-Core document masking (reset_attention_mask): {t_mcore * 1e3:.1f} ms CPU per "
                  f"sample, S x S mask of {mask.numel() * mask.element_size() / 2**20:.0f} MiB per sample")
    print(f"load average at end: {os.getloadavg()[0]:.1f} (1 min)")


if __name__ == "__main__":
    main()
