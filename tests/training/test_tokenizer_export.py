"""The tokenizer travels from the data to the checkpoint to the HF export.

For ByteTokenizer, a HF tokenizer and a SentencePiece model: multilingual texts are preprocessed
(``megatron_exact.data.preprocess``, what tools/preprocess_data.py runs), a tiny model trains one step
on them (one rank, in this process) and is exported without ``--tokenizer-dir``; transformers'
``AutoTokenizer`` on the export gives, for every text, the ids preprocessing wrote, and
``eos_token_id`` is the data's EOD id. A tokenizer that moved and a TikTokenizer are refused, naming
``--tokenizer-dir``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.training.conftest import REPO

pytestmark = pytest.mark.slow  # trainings

HF_TOKENIZER = REPO / "tests" / "data" / "fixtures" / "hf_tokenizer"
TEXTS = [
    "Zürich naïve café, São Paulo and Łódź: déjà-vu — «quotes» …",
    "東京都 北京 서울 Москва عربى हिन्दी",
    "emoji 🙂🚀 and maths ∑∞≠ in one line",
    "  two  spaces\tand a tab\n\nand plain ASCII words, digits 0123456789 3.14159.",
]
DOCUMENTS = TEXTS * 4  # enough tokens for a 32-token sample under every tokenizer


@dataclass(frozen=True)
class Exported:
    written_ids: list  # per document, as preprocessing wrote them (EOD dropped)
    eod: int
    checkpoint: Path
    hf_dir: Path


def _sentencepiece_model(root: Path) -> str:
    import sentencepiece

    corpus = root / "sp_corpus.txt"
    corpus.write_text("\n".join(DOCUMENTS * 10) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "sp"), model_type="bpe", vocab_size=450, hard_vocab_limit=False,
        byte_fallback=True, character_coverage=1.0, remove_extra_whitespaces=False, minloglevel=2,
    )
    return str(root / "sp.model")


def _preprocess_train_export(root: Path, tokenizer_type: str, tokenizer_model, model: str, build) -> Exported:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_exact.convert.exporter import export_hf
    from megatron_exact.data.preprocess import PreprocessConfig, preprocess
    from megatron_exact.data.tokenizers import read_tokenizer_sidecar

    jsonl = root / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCUMENTS))
    preprocess(PreprocessConfig(input=str(jsonl), output_prefix=str(root / "data"), tokenizer_type=tokenizer_type,
                                tokenizer_model=tokenizer_model, append_eod=True, workers=1))
    prefix = str(root / "data_text_document")
    eod = read_tokenizer_sidecar(prefix)["eod"]
    dataset = IndexedDataset(prefix)
    written = [dataset[i].tolist() for i in range(len(dataset))]
    assert all(ids[-1] == eod for ids in written)
    trainer = build(["--model", model, "--vocab-size", "512", "--seq-length", "32", "--micro-batch-size", "1",
                     "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--data-path", prefix,
                     "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "1", "--save", str(root / "ckpt")])
    trainer.train()
    trainer.close()
    hf_dir = export_hf(root / "ckpt", root / "hf")
    return Exported([ids[:-1] for ids in written], eod, root / "ckpt", hf_dir)


@pytest.fixture(scope="module")
def exported(in_process_trainers, tmp_path_factory) -> dict:
    sentencepiece_root = tmp_path_factory.mktemp("sentencepiece_model")
    tokenizers = {  # kind -> (tokenizer model, model family)
        "ByteTokenizer": (None, "tiny-qwen2"),
        # Llamas: transformers loads a Qwen2 export's tokenizer as Qwen2Tokenizer whatever its files say
        # (Qwen2's pre-tokenizer splits digits, for one): see the refusal test below.
        "HuggingFaceTokenizer": (str(HF_TOKENIZER), "tiny-llama3"),
        "SentencePieceTokenizer": (_sentencepiece_model(sentencepiece_root), "tiny-llama3"),
    }
    return {kind: _preprocess_train_export(tmp_path_factory.mktemp(kind), kind, path, model, in_process_trainers)
            for kind, (path, model) in tokenizers.items()}


@pytest.mark.parametrize("kind", ["ByteTokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer"])
def test_autotokenizer_on_the_export_gives_the_ids_preprocessing_wrote(kind, exported):
    from transformers import AutoTokenizer

    run = exported[kind]
    tokenizer = AutoTokenizer.from_pretrained(str(run.hf_dir), local_files_only=True)
    assert len(run.written_ids) == len(DOCUMENTS)
    for text, ids in zip(DOCUMENTS, run.written_ids):
        assert tokenizer(text, add_special_tokens=False).input_ids == ids, text
    assert any(len(ids) < len(text.encode("utf-8")) for text, ids in zip(DOCUMENTS, run.written_ids)) or \
        kind == "ByteTokenizer"  # the subword tokenizers really merge multi-byte characters
    config = json.loads((run.hf_dir / "config.json").read_text())
    generation = json.loads((run.hf_dir / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == run.eod


def _with_tokenizer_record(exported_run: Exported, tmp_path, **changes) -> Path:
    from megatron_exact.checkpoint import find_checkpoint

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(exported_run.checkpoint, checkpoint)
    path = find_checkpoint(checkpoint)[0] / "common.pt"
    common = torch.load(path, weights_only=False)
    common["tokenizer"].update(changes)
    torch.save(common, path)
    return checkpoint


def test_moved_or_untranslatable_tokenizer_is_refused_naming_tokenizer_dir(exported, tmp_path, capsys):
    from tools.convert_checkpoint import main

    moved = _with_tokenizer_record(exported["HuggingFaceTokenizer"], tmp_path / "moved",
                                   tokenizer_model=str(tmp_path / "gone"))
    assert main(["export-hf", "--load", str(moved), "--hf-dir-out", str(tmp_path / "out1")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'gone'}, no longer exists" in err and "--tokenizer-dir" in err
    assert not (tmp_path / "out1").exists()

    tiktoken = _with_tokenizer_record(exported["ByteTokenizer"], tmp_path / "tiktoken", tokenizer_type="TikTokenizer",
                                      tokenizer_model="/data/tiktoken.json")
    assert main(["export-hf", "--load", str(tiktoken), "--hf-dir-out", str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err
    assert "not generated for TikTokenizer" in err and "--tokenizer-dir" in err
    assert not (tmp_path / "out2").exists()
    # --tokenizer-dir gives the files instead.
    assert main(["export-hf", "--load", str(tiktoken), "--hf-dir-out", str(tmp_path / "out3"),
                 "--tokenizer-dir", str(HF_TOKENIZER)]) == 0
    assert (tmp_path / "out3" / "tokenizer.json").is_file()


@pytest.mark.parametrize("kind", ["HuggingFaceTokenizer", "SentencePieceTokenizer"])
def test_tokenizer_transformers_would_load_otherwise_is_refused(kind, exported, tmp_path, capsys):
    """These tokenizers in a Qwen2 export: transformers picks Qwen2Tokenizer for the model type, whose ids
    are others; the export checks what AutoTokenizer really gives and refuses, writing nothing."""
    from megatron_exact.checkpoint import find_checkpoint, read_model_record
    from tools.convert_checkpoint import main

    record = read_model_record(find_checkpoint(exported[kind].checkpoint)[0])["tokenizer"]
    qwen2 = _with_tokenizer_record(exported["ByteTokenizer"], tmp_path / "with_record", **record)
    assert main(["export-hf", "--load", str(qwen2), "--hf-dir-out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "as Qwen2Tokenizer, which gives other ids than the run trained with" in err and "--tokenizer-dir" in err
    assert not (tmp_path / "out").exists()


def test_changed_tokenizer_is_refused(exported, tmp_path, capsys):
    """The recorded directory now holds another tokenizer (same path): its fingerprint gives it away."""
    from tools.convert_checkpoint import main

    changed = _with_tokenizer_record(exported["HuggingFaceTokenizer"], tmp_path / "changed",
                                     fingerprint="sha256:" + "0" * 64)
    assert main(["export-hf", "--load", str(changed), "--hf-dir-out", str(tmp_path / "out")]) == 1
    assert "changed since the run trained with it" in capsys.readouterr().err
