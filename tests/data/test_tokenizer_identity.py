"""Tokenizer identity: data made with one tokenizer is refused under another of the same size."""

import pytest

from megatron_exact.data.tokenizers import (
    build_tokenizer,
    check_tokenizer_matches,
    tokenizer_description,
    tokenizer_fingerprint,
    write_tokenizer_sidecar,
)


def _word_level_tokenizer(directory, words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{word: i + 2 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """Same size, same EOD id, same words; only two words swap ids."""
    root = tmp_path_factory.mktemp("tokenizers")
    words = ["the", "quick", "brown", "fox", "dog", "lazy"]
    swapped = ["quick", "the", *words[2:]]
    return _word_level_tokenizer(root / "a", words), _word_level_tokenizer(root / "b", swapped)


def test_fingerprint_tells_same_size_tokenizers_apart(two_tokenizers):
    a, b = (build_tokenizer("HuggingFaceTokenizer", path) for path in two_tokenizers)
    assert (a.vocab_size, a.eod) == (b.vocab_size, b.eod)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    again = build_tokenizer("HuggingFaceTokenizer", two_tokenizers[0])
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(a)
    byte = build_tokenizer("ByteTokenizer")
    assert tokenizer_fingerprint(byte) == tokenizer_fingerprint(build_tokenizer("ByteTokenizer"))
    assert tokenizer_fingerprint(byte).startswith("sha256:")


def test_sidecar_check_refuses_another_tokenizer_of_the_same_size(two_tokenizers, tmp_path):
    a, b = (build_tokenizer("HuggingFaceTokenizer", path) for path in two_tokenizers)
    prefix = str(tmp_path / "data_text_document")
    write_tokenizer_sidecar(prefix, tokenizer_description("HuggingFaceTokenizer", two_tokenizers[0], a))
    check_tokenizer_matches(prefix, a)
    with pytest.raises(ValueError, match="different tokenizer .* than the one given"):
        check_tokenizer_matches(prefix, b)
