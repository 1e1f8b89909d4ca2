"""The synthetic long-range language: deterministic, facts recalled later, a word-level tokenizer of
exactly its words, probe prompts with the evidence at the requested distance."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_exact.synthetic import LanguageConfig, SyntheticLanguage, build_corpus
from megatron_exact.synthetic.language import KEY_MARK, QUERY_MARK


def test_documents_are_deterministic_and_independent_of_order():
    a, b = SyntheticLanguage(LanguageConfig(seed=3)), SyntheticLanguage(LanguageConfig(seed=3))
    assert a.document(17) == b.document(17)
    assert list(a.documents(3, start=15))[2] == " ".join(b.document(17))
    assert a.document(17) != SyntheticLanguage(LanguageConfig(seed=4)).document(17)


def test_every_recall_repeats_an_earlier_fact_and_lengths_are_heavy_tailed():
    language = SyntheticLanguage(LanguageConfig())
    lengths, recalls = [], 0
    for index in range(400):
        words = language.document(index)
        lengths.append(sum(word.startswith("w") for word in words))  # the Pareto-drawn filler length
        facts = {}
        for i, word in enumerate(words):
            if word == KEY_MARK:
                facts[words[i + 1]] = (i + 2, words[i + 2])
            elif word == QUERY_MARK:
                key, value = words[i + 1], words[i + 2]
                assert key in facts and facts[key][1] == value and facts[key][0] < i, (index, i)
                recalls += 1
    lengths = np.array(lengths)
    assert recalls > 400 * 5  # dense recalls: one per ~4 words of each document's second half
    # Pareto(0.9), scale 32: the median near 32 * 2^(1/0.9) ~ 69, a few documents beyond a 512 window.
    assert 50 < np.median(lengths) < 95 and (lengths >= 512).mean() > 0.03 and lengths.max() <= 2048


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="unknown setting"):
        LanguageConfig.from_dict({"num_kyes": 3})
    with pytest.raises(ValueError, match="pareto_shape"):
        LanguageConfig(pareto_shape=0)


def test_corpus_build_tokenizer_data_spec_and_reuse(tmp_path):
    from transformers import AutoTokenizer

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    config = LanguageConfig(max_length=256)
    messages = []
    corpus = build_corpus(str(tmp_path / "c"), config, 50, log=messages.append)
    language = SyntheticLanguage(config)
    tokenizer = AutoTokenizer.from_pretrained(corpus.tokenizer_dir)
    assert len(tokenizer) == corpus.vocab_size == len(language.vocabulary)
    # One id per word, in the language's vocabulary order; the data is exactly the documents + EOD.
    data = IndexedDataset(corpus.data_prefix)
    for index in (0, 7, 49):
        expected = [language.vocabulary.index(w) for w in language.document(index)] + [tokenizer.eos_token_id]
        assert data[index].tolist() == expected
    assert tokenizer.decode(data[7][:-1].tolist()) == " ".join(language.document(7))
    spec = json.load(open(corpus.probe_spec))
    assert spec["answers"] == language.values and spec["keys"] == language.keys
    assert set(spec["filler"]["words"]) == set(language.filler_words)
    sidecar = json.load(open(corpus.data_prefix + ".tokenizer_info.json"))
    assert sidecar["tokenizer_model"] == corpus.tokenizer_dir

    again = build_corpus(str(tmp_path / "c"), config, 50, log=messages.append)
    assert not again.rebuilt and "reusing" in messages[-1]
    changed = build_corpus(str(tmp_path / "c"), config, 60, log=messages.append)
    assert changed.rebuilt and "documents 50 -> 60" in messages[-1]


def test_the_evaluation_probe_reads_the_spec_in_the_corpus_language(tmp_path):
    from transformers import AutoTokenizer

    from megatron_exact.eval.probe import TokenizerCodec, build_sample
    from megatron_exact.eval.spec import load_spec

    corpus = build_corpus(str(tmp_path / "c"), LanguageConfig(max_length=256), 20, log=lambda m: None)
    spec = load_spec(corpus.probe_spec)
    codec = TokenizerCodec(AutoTokenizer.from_pretrained(corpus.tokenizer_dir))
    sample = build_sample(spec, codec, length=512, distance=300, index=3)
    # One token per word: ... KEY k v <300 filler words> QUERY k | v, in 512 tokens with the answer.
    words = codec.tokenizer.convert_ids_to_tokens(sample.present)
    start, end = sample.fact_span
    assert words[start:end] == [KEY_MARK, sample.key, sample.answer] and end - start == 3
    assert words[sample.question_start:] == [QUERY_MARK, sample.key]
    assert sample.question_start - end == 300 and len(sample.present) + 1 == 512
    assert all(w.startswith("w") for w in words[:start] + words[end:sample.question_start])
    assert sample.candidates[sample.answer_index] == sample.answer and set(sample.candidates) <= set(spec.answers)


def test_the_probe_spec_filler_is_the_corpus_markov_chain(tmp_path):
    from megatron_exact.eval.spec import load_spec

    config = LanguageConfig(max_length=256)
    corpus = build_corpus(str(tmp_path / "c"), config, 5, log=lambda m: None)
    filler = load_spec(corpus.probe_spec).filler
    language = SyntheticLanguage(config)
    assert filler.type == "markov" and filler.jump_probability == config.jump_probability
    assert [list(row) for row in filler.successors] == language.successor_table
    assert list(filler.weights) == language.successor_probabilities
