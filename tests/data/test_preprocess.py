"""tools/preprocess_data.py: Megatron-LM byte compatibility, read-back, bad input, formats."""

import glob
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_exact.data.preprocess import BadInputError, PreprocessConfig, preprocess
from megatron_exact.data.tokenizers import (
    BYTE_EOD_ID,
    build_tokenizer,
    read_tokenizer_sidecar,
    save_hf_tokenizer,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CORPUS = os.path.join(FIXTURES, "corpus.jsonl")
HF_DIR = os.path.join(FIXTURES, "hf_tokenizer")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _run(tmp_path, name="out", **overrides):
    config = dict(
        input=CORPUS,
        output_prefix=str(tmp_path / name),
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=HF_DIR,
        log_interval=10**9,
    )
    config.update(overrides)
    return preprocess(PreprocessConfig(**config), log=lambda message: None)


def _indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def _corpus_values(key, path=CORPUS):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f]


def _same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


@pytest.mark.parametrize("workers", [1, 2])
def test_document_output_is_byte_identical_to_megatron_lm(tmp_path, workers):
    # Both keys in one run: each gets a finalized .bin/.idx (Megatron-LM needs one run per key).
    _run(tmp_path, json_keys=("text",), append_eod=True, workers=workers, name="eod")
    _run(tmp_path, json_keys=("title", "text"), workers=workers, name="noeod")
    for ours, golden in [
        ("eod_text_document", "text_eod_text_document"),
        ("noeod_title_document", "title_noeod_title_document"),
    ]:
        for suffix in (".bin", ".idx"):
            assert _same_bytes(tmp_path / (ours + suffix), os.path.join(FIXTURES, "golden", golden + suffix)), ours + suffix
    assert os.path.exists(tmp_path / "noeod_text_document.idx")


def test_read_back_equals_direct_tokenization(tmp_path):
    summary = _run(tmp_path, json_keys=("text",), append_eod=True)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", HF_DIR)
    dataset = _indexed(str(tmp_path / "out_text_document"))
    texts = _corpus_values("text")
    assert dataset.index.dtype == np.uint16  # Megatron's choice for a 400-token vocabulary
    assert len(dataset.document_indices) == len(texts) + 1
    empty = 0
    for doc, text in enumerate(texts):
        begin, end = dataset.document_indices[doc], dataset.document_indices[doc + 1]
        expected = tokenizer.tokenize(text)
        if not expected:  # tokenizes to nothing: a document with no sequence and no EOD
            assert end == begin
            empty += 1
            continue
        assert end - begin == 1
        np.testing.assert_array_equal(dataset[int(begin)], expected + [tokenizer.eod])
    assert empty == 1 and summary.empty_documents["text"] == 1
    sidecar = read_tokenizer_sidecar(str(tmp_path / "out_text_document"))
    assert (sidecar["vocab_size"], sidecar["eod"], sidecar["level"]) == (400, tokenizer.eod, "document")


def test_large_vocabulary_gets_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70000)}
    vocab["<eos>"] = 70000
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(tmp_path / "big")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "w69999 w1 w65535"}) + "\n")
    _run(tmp_path, input=str(corpus), tokenizer_model=str(tmp_path / "big"), append_eod=True)
    dataset = _indexed(str(tmp_path / "out_text_document"))
    assert dataset.index.dtype == np.int32
    np.testing.assert_array_equal(dataset[0], [69999, 1, 65535, 70000])


def test_compressed_directory_and_glob_inputs_match_plain(tmp_path):
    import zstandard

    _run(tmp_path, name="plain", append_eod=True)
    raw = open(CORPUS, "rb").read()
    lines = raw.splitlines(keepends=True)
    shards = tmp_path / "shards"
    shards.mkdir()
    # Three shards, sorted by name, concatenating back to the corpus.
    with gzip.open(shards / "a.jsonl.gz", "wb") as f:
        f.write(b"".join(lines[:4]))
    (shards / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines[4:8])))
    (shards / "c.jsonl").write_bytes(b"".join(lines[8:]))
    _run(tmp_path, name="dir", input=str(shards), append_eod=True)
    _run(tmp_path, name="glob", input=str(shards / "*.jsonl*"), append_eod=True)
    for name in ("dir", "glob"):
        for suffix in (".bin", ".idx"):
            assert _same_bytes(tmp_path / f"{name}_text_document{suffix}", tmp_path / f"plain_text_document{suffix}")


SKIP_KINDS = ["malformed JSON", "missing key", "non-string value", "invalid UTF-8", "empty line", "not a JSON object"]
BAD_LINES = [
    (b'{"text": "ok"\n', "malformed JSON"),
    (b'{"title": "no text key"}\n', "missing key 'text'"),
    (b'{"text": 42}\n', "value of key 'text' is int"),
    (b'{"text": "bad \xff byte"}\n', "invalid UTF-8"),
    (b"\n", "empty line"),
    (b"[1, 2]\n", "expected a JSON object"),
]


@pytest.mark.parametrize("bad_line,message", BAD_LINES)
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_stops_with_file_and_line_and_leaves_no_output(tmp_path, bad_line, message, workers):
    good = [json.dumps({"text": f"document number {i}."}).encode() + b"\n" for i in range(600)]
    corpus = tmp_path / "bad.jsonl"
    # Past the first chunk, so earlier chunks were already written to the temp files.
    corpus.write_bytes(b"".join(good[:500]) + bad_line + b"".join(good[500:]))
    with pytest.raises(BadInputError) as err:
        _run(tmp_path, input=str(corpus), workers=workers)
    assert f"{corpus}:501:" in str(err.value) and message in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_skip_bad_lines_counts_each_kind_and_keeps_good_ones(tmp_path):
    good = [json.dumps({"text": f"document number {i}."}).encode() + b"\n" for i in range(len(BAD_LINES) + 1)]
    mixed = [g for pair in zip(good, [line for line, _ in BAD_LINES] + [b""]) for g in pair]
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_bytes(b"".join(mixed))
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(b"".join(good))
    summary = _run(tmp_path, input=str(corpus), skip_bad_lines=True, name="skipped")
    assert summary.skipped_lines == {kind: 1 for kind in SKIP_KINDS}
    _run(tmp_path, input=str(clean), name="clean")
    for suffix in (".bin", ".idx"):
        assert _same_bytes(tmp_path / f"skipped_text_document{suffix}", tmp_path / f"clean_text_document{suffix}")


def test_cli_reports_bad_line_and_exit_code(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n{"text": nope}\n')
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(corpus),
         "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "ByteTokenizer", "--workers", "1"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 1
    assert f"{corpus}:2: malformed JSON" in proc.stderr and "--skip-bad-lines" in proc.stderr
    assert not glob.glob(str(tmp_path / "o*"))


def test_byte_tokenizer_ids_and_hf_export(tmp_path):
    texts = ["héllo wörld", "", "東京 🙂\n\ttab"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    _run(tmp_path, input=str(corpus), tokenizer_type="ByteTokenizer", tokenizer_model=None, append_eod=True)
    prefix = str(tmp_path / "out_text_document")
    dataset = _indexed(prefix)
    sequences = [dataset[i].tolist() for i in range(len(dataset))]
    assert sequences == [list(t.encode("utf-8")) + [BYTE_EOD_ID] for t in texts if t]
    record = read_tokenizer_sidecar(prefix)
    assert (record["vocab_size"], record["eod"], record["tokenizer_type"]) == (258, 256, "ByteTokenizer")

    from transformers import AutoTokenizer

    save_hf_tokenizer(record, str(tmp_path / "hf"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in texts:
        assert hf(text, add_special_tokens=False).input_ids == list(text.encode("utf-8"))
        assert hf.decode(list(text.encode("utf-8"))) == text
    assert hf.eos_token_id == BYTE_EOD_ID and len(hf) == 258


def test_split_sentences_groups_sentences_into_documents(tmp_path):
    texts = [
        "First sentence here. Second sentence follows. Third one ends it.",
        "",
        "Only one sentence",
        "Alpha is first. Beta is second.\nGamma is on a new line.",
    ]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = build_tokenizer("ByteTokenizer")
    for keep_newlines in (False, True):
        name = f"kn{int(keep_newlines)}"
        _run(tmp_path, name=name, input=str(corpus), tokenizer_type="ByteTokenizer", tokenizer_model=None,
             append_eod=True, split_sentences=True, keep_newlines=keep_newlines)
        prefix = str(tmp_path / f"{name}_text_sentence")
        dataset = _indexed(prefix)
        counts = np.diff(dataset.document_indices).tolist()
        assert counts == [3, 0, 1, 3]
        doc0 = [tokenizer.detokenize(dataset[i].tolist()) for i in range(3)]
        assert doc0[0].startswith("First sentence here.") and doc0[2].startswith("Third one ends it.")
        assert dataset[2].tolist()[-1] == BYTE_EOD_ID and dataset[0].tolist()[-1] != BYTE_EOD_ID
        last_doc = bytes(b for i in range(4, 7) for b in dataset[i].tolist() if b < 256).decode()
        assert ("\n" in last_doc) == keep_newlines
        assert read_tokenizer_sidecar(prefix)["level"] == "sentence"
