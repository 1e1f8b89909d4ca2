"""ExactGPTDataset: boundaries from the indices equal boundaries read off the raw documents."""

import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_exact.data.dataset import all_segment_lengths, build_train_valid_test_datasets
from megatron_exact.data.preprocess import PreprocessConfig, preprocess
from megatron_exact.data.tokenizers import build_tokenizer

SEQ = 64
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _write_documents(prefix, lengths, doc_offset=0):
    """Document d's token at position p is 1000 * (d + 1) + p: its identity is in the tokens."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d, length in enumerate(lengths):
        builder.add_document(1000 * (d + 1 + doc_offset) + np.arange(length), [int(length)])
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    # Lengths from 1 to 5 x SEQ: many documents shorter than a sample, some longer.
    _write_documents(str(root / "a"), rng.integers(1, 5 * SEQ, size=150))
    _write_documents(str(root / "b"), rng.integers(1, 40, size=300), doc_offset=500)
    return root


def _expected_from_tokens(window):
    """Boundaries read off a sample's S+1 tokens alone: a document starts where the
    document id changes or the in-document position does not continue."""
    doc, pos = window // 1000, window % 1000
    starts = np.ones(window.size, dtype=bool)
    starts[1:] = (doc[1:] != doc[:-1]) | (pos[1:] != pos[:-1] + 1)
    start_index = np.flatnonzero(starts)
    S = window.size - 1
    last_start = np.maximum.accumulate(np.where(starts, np.arange(window.size), 0))
    position_ids = (np.arange(window.size) - last_start)[:S]
    loss_mask = (~starts[1:]).astype(np.float32)
    cu = np.full(S + 1, S)
    in_sample = start_index[start_index < S]
    cu[: in_sample.size] = in_sample
    return position_ids, loss_mask, cu, pos[0] != 0


def _build(data_path, tokenizer, tmp_path, masking=True, num_samples=(400, 40, 0)):
    # Megatron-Core caches blends only under torch.distributed: blends go uncached here.
    blended = len(data_path) > 1
    return build_train_valid_test_datasets(
        data_path, "90,10,0", SEQ, 1234, num_samples, document_masking=masking,
        cache_path=None if blended else str(tmp_path / "cache"), tokenizer=tokenizer,
    )


@pytest.mark.parametrize("blend", [False, True])
def test_boundaries_match_raw_documents(corpus, tmp_path, blend):
    tokenizer = build_tokenizer("ByteTokenizer")
    data_path = ["0.7", str(corpus / "a"), "0.3", str(corpus / "b")] if blend else [str(corpus / "a")]
    train, valid, _ = _build(data_path, tokenizer, tmp_path)
    starts_mid_document = single_document_samples = 0
    for dataset in (train, valid):
        for idx in np.random.default_rng(1).choice(len(dataset), size=min(150, len(dataset)), replace=False):
            sample = dataset[int(idx)]
            window = np.append(sample["tokens"].numpy(), sample["labels"].numpy()[-1])
            np.testing.assert_array_equal(window[1:], sample["labels"].numpy())
            position_ids, loss_mask, cu, mid = _expected_from_tokens(window)
            np.testing.assert_array_equal(sample["position_ids"].numpy(), position_ids)
            np.testing.assert_array_equal(sample["loss_mask"].numpy(), loss_mask)
            np.testing.assert_array_equal(sample["cu_seqlens"].numpy(), cu)
            assert sample["cu_seqlens"].dtype == torch.int32 and sample["position_ids"].dtype == torch.int64
            starts_mid_document += int(mid)
            single_document_samples += int(cu[1] == SEQ)
    # The random samples did exercise both hard cases.
    assert starts_mid_document > 10 and single_document_samples > 5


def test_masking_off_gives_plain_positions(corpus, tmp_path):
    tokenizer = build_tokenizer("ByteTokenizer")
    train, _, _ = _build([str(corpus / "a")], tokenizer, tmp_path, masking=False)
    for idx in range(0, len(train), 37):
        sample = train[idx]
        np.testing.assert_array_equal(sample["position_ids"].numpy(), np.arange(SEQ))
        np.testing.assert_array_equal(sample["loss_mask"].numpy(), np.ones(SEQ))
        np.testing.assert_array_equal(sample["cu_seqlens"].numpy(), [0] + [SEQ] * SEQ)


def test_default_collate_stacks_samples(corpus, tmp_path):
    tokenizer = build_tokenizer("ByteTokenizer")
    train, _, _ = _build(["0.5", str(corpus / "a"), "0.5", str(corpus / "b")], tokenizer, tmp_path)
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch["tokens"].shape == (4, SEQ) and batch["cu_seqlens"].shape == (4, SEQ + 1)


def test_vectorised_segments_equal_per_sample(corpus, tmp_path):
    tokenizer = build_tokenizer("ByteTokenizer")
    train, _, _ = _build([str(corpus / "a")], tokenizer, tmp_path)
    ids = np.arange(len(train))
    lengths, owner = all_segment_lengths(train, ids)
    for idx in range(0, len(train), 7):
        assert lengths[owner == idx].tolist() == train.segment_lengths(idx)
        assert lengths[owner == idx].sum() == SEQ + 1


def test_megatron_lm_built_dataset_needs_explicit_tokenizer(tmp_path):
    prefix = os.path.join(FIXTURES, "golden", "text_eod_text_document")
    with pytest.raises(ValueError, match="no tokenizer given"):
        _build([prefix], None, tmp_path, num_samples=(10, 0, 0))
    tokenizer = build_tokenizer("HuggingFaceTokenizer", os.path.join(FIXTURES, "hf_tokenizer"))
    train, _, _ = build_train_valid_test_datasets([prefix], "100,0,0", 16, 1, (20, None, None),
                                                  cache_path=str(tmp_path / "c"), tokenizer=tokenizer)
    sample = train[0]
    # Every document ends with EOD here, so every in-sample document start follows an EOD input.
    starts = sample["cu_seqlens"].numpy()
    starts = starts[(starts > 0) & (starts < 16)]
    assert (sample["tokens"].numpy()[starts - 1] == tokenizer.eod).all()


def test_sentence_level_prefix_is_refused(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "One sentence here. Another one there. And a third."}\n' * 3)
    preprocess(PreprocessConfig(input=str(corpus), output_prefix=str(tmp_path / "s"), tokenizer_type="ByteTokenizer",
                                split_sentences=True, append_eod=True), log=lambda m: None)
    prefix = str(tmp_path / "s_text_sentence")
    with pytest.raises(ValueError, match=f"{prefix}.idx is sentence-level"):
        _build([prefix], None, tmp_path, num_samples=(10, 0, 0))


def test_tokenizer_mismatch_with_sidecar_is_refused(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "some text for the sidecar check"}\n')
    preprocess(PreprocessConfig(input=str(corpus), output_prefix=str(tmp_path / "d"), tokenizer_type="ByteTokenizer"),
               log=lambda m: None)
    other = build_tokenizer("HuggingFaceTokenizer", os.path.join(FIXTURES, "hf_tokenizer"))
    with pytest.raises(ValueError, match="tokenizer_info.json: data was tokenized with vocab_size=258"):
        _build([str(tmp_path / "d_text_document")], other, tmp_path, num_samples=(10, 0, 0))


def test_sample_order_digest_tells_orders_apart(corpus):
    """Equal digests for the same samples in the same order (also of plans asking for other numbers of
    samples within one epoch); other digests once the plan needs more epochs (Megatron-Core then
    shuffles the documents of all epochs together), under another seed, or for a blend's other draw.
    The digest reads the indices only; the truth it is checked against is the samples' tokens."""
    from megatron_exact.data.dataset import sample_order_digest

    tokenizer = build_tokenizer("ByteTokenizer")

    def train(num_samples, seed=1234, data=(str(corpus / "a"),)):
        return build_train_valid_test_datasets(list(data), "100,0,0", SEQ, seed, (num_samples, 0, 0),
                                               tokenizer=tokenizer)[0]

    def tokens(dataset, count):
        return [dataset[i]["tokens"].tolist() for i in range(count)]

    epoch = len(train(None))
    short, longer, two_epochs = train(40), train(epoch - 5), train(epoch + 40)
    assert tokens(short, 40) == tokens(longer, 40) != tokens(two_epochs, 40)
    assert sample_order_digest(short, 40) == sample_order_digest(longer, 40)
    assert sample_order_digest(short, 40) != sample_order_digest(two_epochs, 40)
    assert sample_order_digest(short, 40) != sample_order_digest(train(40, seed=7), 40)
    assert sample_order_digest(short, 40) != sample_order_digest(short, 39)
    # Past the limit, an evenly spread subset: still equal for equal orders, different otherwise.
    assert sample_order_digest(short, 40, limit=8) == sample_order_digest(longer, 40, limit=8)
    assert sample_order_digest(short, 40, limit=8) != sample_order_digest(two_epochs, 40, limit=8)
    # A blend: which corpus each sample comes from counts too.
    blend = ("0.5", str(corpus / "a"), "0.5", str(corpus / "b"))
    other = ("0.3", str(corpus / "a"), "0.7", str(corpus / "b"))
    assert sample_order_digest(train(40, data=blend), 40) == sample_order_digest(train(60, data=blend), 40)
    assert sample_order_digest(train(40, data=blend), 40) != sample_order_digest(train(40, data=other), 40)
