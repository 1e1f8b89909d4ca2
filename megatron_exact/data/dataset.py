"""Packed GPT samples with exact document boundaries, on Megatron-Core's GPTDataset.

Megatron-Core builds the document/sample/shuffle indices, caches them, blends and
splits; ``ExactGPTDataset`` only adds, per sample, where its documents begin. They
come from those indices and the sequence lengths (never from scanning for EOD), so
they are exact even for data without EOD tokens. Each sample is a dict (the batch
contract: what :func:`megatron_exact.model.packing.pack_batch` takes), ``S = seq_length``:

- ``tokens [S] int64``, ``labels [S] int64`` (Megatron-Core's own);
- ``position_ids [S] int64``: restart at 0 at every document start in the sample (a
  document continued from the previous sample restarts too: under document masking
  its earlier part is invisible);
- ``loss_mask [S] float32``: 0 where the label is in another document than the input
  token, and for padding (and, being Megatron-Core's own mask edited in place, where
  the label is the tokenizer's pad id, which Megatron-Core rewrites to 0);
- ``cu_seqlens [S+1] int32``: document starts, then ``S``, padded with ``S``.

With ``document_masking=False`` it is what Megatron-LM does without
``--reset-position-ids/--reset-attention-mask/--eod-mask-loss``: positions
``0..S-1``, ``cu_seqlens = [0, S, S, ...]``, Megatron-Core's loss_mask (1 on every
real token). No ``S x S`` mask is built in either mode.

Public API::

    build_train_valid_test_datasets(
        data_path: list[str],         # Megatron blend: ["w1", "p1", "w2", "p2"] or ["p1", "p2"]
        split: str,                   # "969,30,1"
        seq_length: int,
        seed: int,
        num_samples: tuple[int | None, int | None, int | None],  # None: one epoch (not with weights)
        document_masking: bool = True,
        cache_path: str | None = None,
        tokenizer=None,               # None: built from the first prefix's sidecar
    ) -> (train, valid, test)         # each a Dataset of the dicts above, or None
    # A part of the split that holds no documents of a corpus may be asked for 0 samples (or None),
    # never for more (ValueError).
    read_tokenizer_sidecar(prefix) -> dict          # megatron_exact.data.tokenizers
    build_tokenizer(tokenizer_type, tokenizer_model) # megatron_exact.data.tokenizers
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import get_blend_from_list

from megatron_exact.data.indexed_files import check_indexed_files, data_fingerprint
from megatron_exact.data.tokenizers import build_tokenizer, check_tokenizer_matches, read_tokenizer_sidecar, sidecar_path


@dataclass
class ExactGPTDatasetConfig(GPTDatasetConfig):
    document_masking: bool = True
    """Positions restart and cross-document targets are masked at document starts."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reset_position_ids or self.reset_attention_mask or self.eod_mask_loss or self.create_attention_mask:
            raise ValueError(
                "ExactGPTDatasetConfig derives boundaries itself: set reset_position_ids, reset_attention_mask, "
                "eod_mask_loss and create_attention_mask to False (use document_masking)"
            )
        if not self.add_extra_token_to_sequence:
            raise ValueError("ExactGPTDatasetConfig needs add_extra_token_to_sequence=True (labels are the next tokens)")


def check_document_level(dataset: IndexedDataset, path_prefix: str) -> None:
    """Refuse an index whose documents hold several sequences (sentence-level output):
    GPTDataset treats every sequence as a document and would shuffle sentences apart."""
    per_document = np.diff(dataset.document_indices)
    if per_document.size and int(per_document.max()) > 1:
        doc = int(np.argmax(per_document > 1))
        raise ValueError(
            f"{path_prefix}.idx is sentence-level (document {doc} holds {int(per_document[doc])} sequences); "
            "packed training needs document-level data: rerun tools/preprocess_data.py without --split-sentences"
        )


class ExactGPTDataset(GPTDataset):
    """GPTDataset whose samples also carry exact document boundaries (see module doc)."""

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig) -> IndexedDataset:
        check_indexed_files(dataset_path)
        dataset = GPTDataset.build_low_level_dataset(dataset_path, config)
        check_document_level(dataset, dataset_path)
        return dataset

    def _build_document_sample_shuffle_indices(self):
        # Megatron-Core keys its index cache by the dataset's path and settings, so re-preprocessed
        # data under the same prefix would reuse indices built for the old data (wrong sample counts,
        # or an IndexError). The content fingerprint makes the key name the data itself.
        self.unique_identifiers["data_fingerprint"] = data_fingerprint(self.dataset.path_prefix)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4,
                                             default=lambda obj: obj.unique_identifiers)
        self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8"),
                                                   usedforsecurity=False).hexdigest()
        return super()._build_document_sample_shuffle_indices()

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config) -> None:
        if indexed_indices is not None and len(indexed_indices) == 0 and num_samples is not None:
            # Megatron-Core loops forever asking an empty part for tokens (GPTDataset._get_num_epochs),
            # also for 0 samples; with nothing requested the part is simply empty.
            if num_samples > 0:
                raise ValueError(
                    f"{dataset_path}: the {index_split.name} part of split {config.split!r} holds none of its "
                    f"{len(indexed_dataset.document_indices) - 1} documents, but {num_samples} samples were "
                    "requested from it; give that part a larger share of the split (or the corpus more documents)"
                )
            num_samples = None
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self._sequence_lengths = self.dataset.sequence_lengths
        self._plain = None
        S = self.config.sequence_length
        self._arange = np.arange(S, dtype=np.int64)
        self._plain_cu_seqlens = np.full(S + 1, S, dtype=np.int32)
        self._plain_cu_seqlens[0] = 0

    def _plain_indices(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shuffle, sample and document indices as plain ndarray views. Indexing a
        numpy.memmap (how Megatron-Core loads cached indices) costs several times more
        per call than the same memory as an ndarray, so Megatron's own per-sample query
        is given the views too."""
        if self._plain is None:
            if self.shuffle_index is None:
                self._query_document_sample_shuffle_indices(0)  # lazily memory-maps the indices
            self._plain = tuple(
                np.asarray(a).view(np.ndarray) for a in (self.shuffle_index, self.sample_index, self.document_index)
            )
            self.shuffle_index, self.sample_index, self.document_index = self._plain
        return self._plain

    def _piece_lengths(self, idx: int) -> List[int]:
        """Lengths of the document pieces making up the ``seq_length + 1`` tokens of
        sample ``idx`` (padding excluded), in order, from the indices alone; may hold
        zero-length pieces (empty documents)."""
        shuffle_index, sample_index, document_index = self._plain or self._plain_indices()
        # ndarray.item gives Python ints without creating array or numpy-scalar objects:
        # on this per-sample path the number of numpy calls, not the bytes, sets the cost.
        i = shuffle_index.item(idx)
        beg, beg_offset = sample_index.item(i, 0), sample_index.item(i, 1)
        end, end_offset = sample_index.item(i + 1, 0), sample_index.item(i + 1, 1)
        if end - beg < 32:
            length_of, document = self._sequence_lengths.item, document_index.item
            lengths = [length_of(document(j)) for j in range(beg, end + 1)]
        else:  # many short documents: one vectorised gather
            lengths = self._sequence_lengths[document_index[beg : end + 1]].tolist()
        # The last piece runs to end_offset inclusive (the extra label token), clipped
        # to the document as IndexedDataset.get clips it; the first starts at beg_offset.
        lengths[-1] = min(lengths[-1], end_offset + 1)
        lengths[0] -= beg_offset
        return lengths

    def segment_lengths(self, idx: int) -> List[int]:
        """Lengths of the non-empty document pieces making up sample ``idx``."""
        return [length for length in self._piece_lengths(idx) if length > 0]

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        # Per-sample cost is dominated by the number of numpy/torch calls, not by bytes
        # (bench/dataset_fetch.py): a handful of pieces per sample, so a plain loop over
        # Python ints with one slice write per piece, two new arrays, and Megatron's own
        # per-sample loss_mask edited in place rather than replaced.
        sample = super().__getitem__(idx)
        S = self.config.sequence_length
        pieces = self._piece_lengths(0 if idx is None else idx)
        real = sum(pieces)  # tokens of the S+1 window that are not padding
        # Megatron's per-sample loss_mask, edited in place: already 0 where the label is
        # its pad id (padding, and any real token equal to that id, which Megatron
        # rewrites to 0 and so must not be supervised). Only the first call hands out
        # Megatron's cached mask itself, which must stay untouched.
        loss_mask = sample["loss_mask"]
        if loss_mask is self.cached_loss_mask:
            loss_mask = sample["loss_mask"] = loss_mask.clone()
        loss_mask = loss_mask.numpy()
        arange = self._arange
        cu_seqlens = self._plain_cu_seqlens.copy()
        if not self.config.document_masking:
            position_ids = arange.copy()
        else:
            position_ids = np.empty(S, dtype=np.int64)
            start = 0
            k = 0
            for length in pieces:
                if length <= 0:
                    continue
                if start:
                    loss_mask[start - 1] = 0.0  # its label opens this document
                    if start >= S:
                        break
                    k += 1
                    cu_seqlens[k] = start
                position_ids[start : start + length] = arange[: min(length, S - start)]
                start += length
            if real < S:  # Megatron padded the window: the padding is one more segment
                position_ids[real:] = arange[: S - real]
                if real:
                    cu_seqlens[k + 1] = real
        if real <= S:
            loss_mask[max(real - 1, 0) :] = 0.0  # labels (and inputs) from padding
        sample["position_ids"] = torch.from_numpy(position_ids)
        sample["cu_seqlens"] = torch.from_numpy(cu_seqlens)
        return sample


def _sample_documents(dataset: ExactGPTDataset, sample_ids: np.ndarray):
    """The document pieces of many samples, from the indices alone: ``(documents, lengths,
    sample_of_piece, first_piece, count, first_offset)`` (pieces in sample order, zero-length
    ones included; per sample: its first piece, number of pieces, offset into its first document)."""
    shuffle_index, sample_index, document_index = dataset._plain_indices()
    shuffled = shuffle_index[np.asarray(sample_ids, dtype=np.int64)]
    beg, beg_offset = sample_index[shuffled, 0].astype(np.int64), sample_index[shuffled, 1].astype(np.int64)
    end, end_offset = sample_index[shuffled + 1, 0].astype(np.int64), sample_index[shuffled + 1, 1].astype(np.int64)
    count = end - beg + 1
    owner = np.repeat(np.arange(len(shuffled)), count)
    first = np.cumsum(count) - count
    within = np.arange(int(count.sum())) - np.repeat(first, count)
    documents = document_index[np.repeat(beg, count) + within]
    lengths = dataset.dataset.sequence_lengths[documents].astype(np.int64)
    last = first + count - 1
    lengths[last] = np.minimum(lengths[last], end_offset + 1)
    lengths[first] -= beg_offset
    return documents, lengths, owner, first, count, beg_offset


def all_segment_lengths(dataset: ExactGPTDataset, sample_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Vectorised ``segment_lengths`` over many samples: ``(lengths, sample_of_piece)``
    (pieces in sample order; zero-length pieces dropped)."""
    _, lengths, owner, _, _, _ = _sample_documents(dataset, sample_ids)
    keep = lengths > 0
    return lengths[keep], owner[keep]


def sample_order_digest(dataset, count: int, limit: int = 65536) -> str:
    """sha1 of what the first ``count`` samples of ``dataset`` are made of, in order: for each
    sample its corpus (in a blend), documents, and the token ranges taken from them, from the
    indices alone (no token is read). Past ``limit`` samples, of ``limit`` of them evenly spread
    over the ``count`` (a bounded cost; Megatron-Core's reshuffle for another number of epochs
    moves all of them). Equal digests: the same samples in the same order."""
    if count <= limit:
        sample_ids = np.arange(count, dtype=np.int64)
    else:
        sample_ids = np.unique(np.linspace(0, count - 1, limit).astype(np.int64))
    digest = hashlib.sha1()
    _update_order_digest(digest, dataset, sample_ids)
    return digest.hexdigest()


def _update_order_digest(digest, dataset, sample_ids: np.ndarray) -> None:
    if isinstance(dataset, BlendedDataset):
        corpus = np.asarray(dataset.dataset_index[sample_ids], dtype=np.int64)
        within = np.asarray(dataset.dataset_sample_index[sample_ids], dtype=np.int64)
        digest.update(corpus.tobytes())
        for index, part in enumerate(dataset.datasets):
            _update_order_digest(digest, part, within[corpus == index])
        return
    documents, lengths, _, _, count, beg_offset = _sample_documents(dataset, sample_ids)
    for array in (count, beg_offset, documents.astype(np.int64), lengths):
        digest.update(np.ascontiguousarray(array).tobytes())


def parse_data_path(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's blend syntax (``--data-path``) -> ``(prefixes, weights or None)``."""
    parts = [p for item in data_path for p in str(item).split()]
    if not parts:
        raise ValueError("--data-path is empty")
    try:
        return get_blend_from_list(parts)
    except (AssertionError, ValueError) as err:
        raise ValueError(f"--data-path {' '.join(parts)!r}: expected 'prefix ...' or 'weight prefix ...' ({err})") from None


def parse_split(split: str) -> List[float]:
    """Megatron's ``--split`` ("969,30,1", "98,2", "100"; ``/`` also separates): up to three
    non-negative proportions, not all zero. Megatron-Core pulls numbers out of any text (so
    "-1,2,x" would silently read as [1, 2]); this refuses it instead."""
    parts = re.split(r"[,/]", str(split))
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"--split {split!r}: expected up to three non-negative train,valid,test proportions, "
                         "not all zero, separated by commas (e.g. 969,30,1)")
    return values + [0.0] * (3 - len(values))


def _resolve_tokenizer(prefixes: Sequence[str], tokenizer):
    import os

    with_sidecar = [p for p in prefixes if os.path.exists(sidecar_path(p))]
    if tokenizer is None:
        if not with_sidecar:
            raise ValueError(
                f"no tokenizer given and no {sidecar_path(prefixes[0])}: pass a tokenizer "
                "(datasets made by Megatron-LM carry no sidecar)"
            )
        record = read_tokenizer_sidecar(with_sidecar[0])
        tokenizer = build_tokenizer(record["tokenizer_type"], record.get("tokenizer_model"))
    for prefix in with_sidecar:
        check_tokenizer_matches(prefix, tokenizer)
    return tokenizer


def build_config(
    data_path: Sequence[str],
    split: str,
    seq_length: int,
    seed: int,
    document_masking: bool = True,
    cache_path: Optional[str] = None,
    tokenizer=None,
) -> ExactGPTDatasetConfig:
    prefixes, weights = parse_data_path(data_path)
    parse_split(split)
    return ExactGPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_path,
        tokenizer=_resolve_tokenizer(prefixes, tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        document_masking=document_masking,
    )


def build_train_valid_test_datasets(
    data_path: Sequence[str],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: Sequence[Optional[int]],
    document_masking: bool = True,
    cache_path: Optional[str] = None,
    tokenizer=None,
):
    """``(train, valid, test)`` datasets of packed samples with boundaries (see module doc)."""
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must give (train, valid, test), got {num_samples}")
    config = build_config(data_path, split, seq_length, seed, document_masking, cache_path, tokenizer)
    if cache_path and config.blend[1] is not None and not torch.distributed.is_initialized():
        # Megatron-Core's BlendedDataset asks torch.distributed for the rank when it caches.
        raise ValueError("a weighted --data-path blend with a cache path needs torch.distributed initialised; "
                         "initialise it first or pass cache_path=None")
    return tuple(BlendedMegatronDatasetBuilder(ExactGPTDataset, list(num_samples), lambda: True, config).build())
