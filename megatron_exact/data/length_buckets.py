"""Split a preprocessed corpus into length-bucketed corpora, for data-mixture arms.

The common window-centric alternative to EXACT changes the *data*: it
upsamples long documents. :func:`split_by_length` writes one Megatron indexed
dataset per document-length range (``{output_prefix}_len{lo}-{hi}`` with the
usual ``.bin/.idx`` and the tokenizer sidecar), every document of the input in
exactly one of them, in input order; :func:`blend_weights` turns per-bucket
upsampling factors into the weights of a Megatron ``--data-path`` blend
(weight of a bucket = its share of the tokens x its factor, normalised).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np

from megatron_exact import atomic_io
from megatron_exact.errors import UserError


@dataclass(frozen=True)
class LengthBucket:
    prefix: str
    low: int  # document length in tokens, inclusive
    high: Optional[int]  # exclusive; None: no upper limit
    documents: int
    tokens: int

    @property
    def label(self) -> str:
        return f"[{self.low}, {self.high if self.high is not None else 'inf'})"


def bucket_prefix(output_prefix: str, low: int, high: Optional[int]) -> str:
    return f"{output_prefix}_len{low}-{high if high is not None else 'inf'}"


def _check_edges(edges: Sequence[int]) -> List[int]:
    edges = [int(e) for e in edges]
    if not edges or edges[0] != 0:
        edges = [0, *edges]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise UserError(f"length bucket edges must increase strictly, got {edges}")
    return edges


def split_by_length(data_prefix: str, output_prefix: str, edges: Sequence[int],
                    log: Callable[[str], None] = print) -> List[LengthBucket]:
    """Write the documents of ``data_prefix`` into one dataset per ``[edges[i], edges[i+1])`` length range
    (the last range is open). Ranges that receive no document are not written (and not returned)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from megatron_exact.data.tokenizers import read_tokenizer_sidecar, sidecar_path

    edges = _check_edges(edges)
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(data_prefix + suffix):
            raise UserError(f"{data_prefix}{suffix} does not exist (give the prefix without suffix, as written by "
                            "tools/preprocess_data.py)")
    dataset = IndexedDataset(data_prefix, mmap=True)
    sequence_lengths = dataset.sequence_lengths.astype(np.int64)
    document_indices = dataset.document_indices.astype(np.int64)
    first_sequence, end_sequence = document_indices[:-1], document_indices[1:]
    sequence_end = np.concatenate([[0], np.cumsum(sequence_lengths)])
    document_lengths = sequence_end[end_sequence] - sequence_end[first_sequence]
    which = np.searchsorted(np.asarray(edges[1:]), document_lengths, side="right")
    sidecar = read_tokenizer_sidecar(data_prefix) if os.path.exists(sidecar_path(data_prefix)) else None
    dtype = dataset.index.dtype

    buckets = []
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    for b in range(len(edges)):
        low, high = edges[b], edges[b + 1] if b + 1 < len(edges) else None
        members = np.flatnonzero(which == b)
        if members.size == 0:
            log(f"length bucket [{low}, {high if high is not None else 'inf'}): no documents, not written")
            continue
        prefix = bucket_prefix(output_prefix, low, high)
        with atomic_io.atomic_path(prefix + ".bin") as bin_tmp, atomic_io.atomic_path(prefix + ".idx") as idx_tmp:
            builder = IndexedDatasetBuilder(str(bin_tmp), dtype=dtype)
            tokens = 0
            for doc in members.tolist():
                lo_seq, hi_seq = int(first_sequence[doc]), int(end_sequence[doc])
                lengths = sequence_lengths[lo_seq:hi_seq].tolist()
                parts = [dataset[s] for s in range(lo_seq, hi_seq)]
                ids = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
                builder.add_document(ids, lengths)
                tokens += int(ids.size)
            builder.finalize(str(idx_tmp))
        if sidecar is not None:
            record = {k: v for k, v in sidecar.items() if k != "format_version"}
            record.update(num_documents=int(members.size), num_tokens=tokens,
                          length_bucket={"low": low, "high": high, "source": os.path.abspath(data_prefix)})
            from megatron_exact.data.tokenizers import write_tokenizer_sidecar

            write_tokenizer_sidecar(prefix, record)
        buckets.append(LengthBucket(prefix, low, high, int(members.size), tokens))
        log(f"length bucket [{low}, {high if high is not None else 'inf'}): {members.size} documents, "
            f"{tokens} tokens -> {prefix}")
    atomic_io.write_json(output_prefix + "_length_buckets.json",
                         {"source": os.path.abspath(data_prefix), "edges": edges,
                          "buckets": [asdict(b) for b in buckets]})
    return buckets


def blend_weights(buckets: Sequence[LengthBucket], upsample: Sequence[float]) -> List[float]:
    """Blend weights (summing to 1) giving bucket ``i`` ``upsample[i]`` times its natural token share."""
    if len(upsample) != len(buckets):
        raise UserError(f"{len(upsample)} upsampling factor(s) for {len(buckets)} length bucket(s) "
                        f"({', '.join(b.label for b in buckets)})")
    if any(f < 0 for f in upsample) or not any(f > 0 for f in upsample):
        raise UserError(f"upsampling factors must be >= 0 and not all zero, got {list(upsample)}")
    raw = [b.tokens * f for b, f in zip(buckets, upsample)]
    total = sum(raw)
    return [r / total for r in raw]


def blend_data_path(buckets: Sequence[LengthBucket], weights: Sequence[float]) -> List[str]:
    """``--data-path w1 prefix1 w2 prefix2 ...`` (zero-weight buckets left out)."""
    path = []
    for bucket, weight in zip(buckets, weights):
        if weight > 0:
            path += [f"{weight:.6g}", bucket.prefix]
    return path
