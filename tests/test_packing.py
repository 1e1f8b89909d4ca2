"""pack_batch and batch_from_documents against computations written out independently here.

The reference layout (Transformer Engine's ``thd_get_partitioned_indices``):
every document padded to a multiple of 2*CP (2*CP*TP with sequence parallelism),
split into 2*CP equal chunks, CP rank r holding chunks r and 2*CP-1-r of every
document, documents in order.
"""

import random

import pytest
import torch

from megatron_exact.model.packing import batch_from_documents, pack_batch

FIELDS = ("tokens", "labels", "loss_mask", "position_ids")


def _contract_batch(samples):
    """A batch of the contract from per-sample document lengths, built position by position.

    Token values encode (sample, document, position) so any misplaced token is visible;
    the last position of every document but the sample's last is unsupervised.
    """
    seq_length = sum(samples[0])
    rows = {name: [] for name in FIELDS}
    cu_rows = []
    for s, lengths in enumerate(samples):
        assert sum(lengths) == seq_length
        row = {name: [] for name in FIELDS}
        for d, length in enumerate(lengths):
            for p in range(length):
                row["tokens"].append(100000 * (s + 1) + 1000 * (d + 1) + p)
                row["labels"].append(-(100000 * (s + 1) + 1000 * (d + 1) + p))
                row["position_ids"].append(p)
                row["loss_mask"].append(0.0 if p == length - 1 and d < len(lengths) - 1 else 1.0)
        for name in FIELDS:
            rows[name].append(row[name])
        bounds = [0]
        for length in lengths:
            bounds.append(bounds[-1] + length)
        cu_rows.append(bounds + [seq_length] * (seq_length + 1 - len(bounds)))
    batch = {name: torch.tensor(rows[name]) for name in FIELDS}
    batch["loss_mask"] = batch["loss_mask"].float()
    batch["cu_seqlens"] = torch.tensor(cu_rows, dtype=torch.int32)
    return batch


def _documents(batch, samples):
    """Each document's values, per field, in packing order (sample-major)."""
    docs = []
    for s, lengths in enumerate(samples):
        start = 0
        for length in lengths:
            docs.append({name: batch[name][s, start:start + length] for name in FIELDS})
            start += length
    return docs


def _random_samples(rng, num_samples, seq_length):
    """Documents of random, mostly odd lengths, including length-1 documents."""
    samples = []
    for _ in range(num_samples):
        lengths, left = [], seq_length
        while left:
            length = min(left, rng.choice([1, 1, 3, 5, 7, 11, 13, 29, 2 * rng.randrange(20) + 1]))
            lengths.append(length)
            left -= length
        samples.append(lengths)
    return samples


def test_no_context_parallelism_is_a_flattening():
    samples = [[5, 1, 10], [16]]
    batch = _contract_batch(samples)
    packed = pack_batch(batch)
    for name in FIELDS:
        assert torch.equal(getattr(packed, name), batch[name].reshape(1, -1)), name
    params = packed.packed_seq_params
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 5, 6, 16, 32]
    assert params.cu_seqlens_q_padded.tolist() == [0, 5, 6, 16, 32]
    assert params.cu_seqlens_kv.tolist() == params.cu_seqlens_q.tolist()
    assert params.max_seqlen_q == params.max_seqlen_kv == 16
    assert params.cu_seqlens_q.dtype == torch.int32
    assert packed.tokens.dtype == torch.int64 and packed.loss_mask.dtype == torch.float32


@pytest.mark.parametrize(
    "cp,tp,sequence_parallel,multiple",
    [(2, 1, False, 4), (4, 1, False, 8), (2, 2, True, 8), (2, 2, False, 4), (1, 2, True, 4)],
)
def test_context_parallel_pieces_reassemble_into_padded_documents(cp, tp, sequence_parallel, multiple):
    rng = random.Random(cp * 10 + tp)
    samples = _random_samples(rng, num_samples=3, seq_length=97)
    batch = _contract_batch(samples)
    docs = _documents(batch, samples)
    lengths = [len(d["tokens"]) for d in docs]
    padded = [-(-n // multiple) * multiple for n in lengths]
    expected_cu_padded = [0]
    for p in padded:
        expected_cu_padded.append(expected_cu_padded[-1] + p)

    pieces = [
        pack_batch(batch, context_parallel_size=cp, context_parallel_rank=r,
                   tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
        for r in range(cp)
    ]
    for packed in pieces:
        params = packed.packed_seq_params
        # Global boundaries on every rank: real ones and padded ones.
        assert params.cu_seqlens_q.tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
        assert params.cu_seqlens_q_padded.tolist() == expected_cu_padded
        assert all(b % multiple == 0 for b in params.cu_seqlens_q_padded.tolist())
        assert params.max_seqlen_q == max(padded)
        assert packed.num_tokens == sum(padded) // cp
        if sequence_parallel:
            assert packed.num_tokens % tp == 0

    for d, (doc, length, pad_len) in enumerate(zip(docs, lengths, padded)):
        chunk = pad_len // (2 * cp)
        offset = expected_cu_padded[d] // cp  # this document's place in every rank's row
        for name in FIELDS:
            chunks = [None] * (2 * cp)
            for r, packed in enumerate(pieces):
                local = getattr(packed, name)[0, offset:offset + 2 * chunk]
                chunks[r], chunks[2 * cp - 1 - r] = local[:chunk], local[chunk:]
            whole = torch.cat(chunks)
            assert torch.equal(whole[:length], doc[name]), (d, name)
            if name == "loss_mask":
                assert torch.all(whole[length:] == 0), f"document {d}: padding is supervised"
            if name == "position_ids":
                assert whole[:length].tolist() == list(range(length))


def test_mismatched_cu_seqlens_are_refused():
    batch = _contract_batch([[4, 4]])
    batch["cu_seqlens"] = torch.tensor([[0, 4, 6, 8, 8, 8, 8, 8, 8]], dtype=torch.int32)
    batch["cu_seqlens"][0, 2:] = 6  # documents cover 6 of the 8 tokens
    with pytest.raises(ValueError, match="cover 6 tokens"):
        pack_batch(batch)


# batch_from_documents: a sample of S + 1 tokens; labels are the inputs shifted by one.
@pytest.mark.parametrize(
    "documents,seq_length,loss_mask,position_ids,cu_seqlens",
    [
        # three documents; the last input of the first two predicts the next document
        ([[1, 2, 3], [4, 5], [6, 7, 8]], 7, [1, 1, 0, 1, 0, 1, 1], [0, 1, 2, 0, 1, 0, 1], [0, 3, 5, 7, 7, 7, 7, 7]),
        # one document filling the sample
        ([[1, 2, 3, 4, 5]], 4, [1, 1, 1, 1], [0, 1, 2, 3], [0, 4, 4, 4, 4]),
        # a final one-token document exists only as the last label
        ([[1, 2, 3], [4]], 3, [1, 1, 0], [0, 1, 2], [0, 3, 3, 3]),
        # one-token documents inside the sample: their only target is in another document
        ([[1], [2], [3, 4]], 3, [0, 0, 1], [0, 0, 0], [0, 1, 2, 3]),
    ],
)
def test_batch_from_documents_hand_built(documents, seq_length, loss_mask, position_ids, cu_seqlens):
    batch = batch_from_documents(documents, seq_length)
    flat = [t for d in documents for t in d]
    assert batch["tokens"].tolist() == [flat[:-1]]
    assert batch["labels"].tolist() == [flat[1:]]
    assert batch["loss_mask"].tolist() == [loss_mask]
    assert batch["position_ids"].tolist() == [position_ids]
    assert batch["cu_seqlens"].tolist() == [cu_seqlens]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["loss_mask"].dtype == torch.float32


@pytest.mark.parametrize("documents,seq_length", [([[1, 2], [3]], 3), ([[1, 2], [], [3, 4]], 3)])
def test_batch_from_documents_refuses_bad_input(documents, seq_length):
    with pytest.raises(ValueError, match="seq_length"):
        batch_from_documents(documents, seq_length)
