"""Build a synthetic corpus end to end: JSONL, word-level HF tokenizer, Megatron indexed data, probe spec.

:func:`build_corpus` writes into one directory::

    corpus.jsonl              the documents (one {"text": ...} per line)
    tokenizer/                HF tokenizer directory (WordLevel over the language's words, built here)
    corpus_text_document.*    Megatron indexed data (tools/preprocess_data.py's code path, --append-eod)
    probe_spec.json           the distance-probe task specification of this language
    manifest.json             what it was built from (language settings, document count, fingerprints)

A second call with the same settings reuses the directory (the manifest says
so); with different settings it rebuilds it and says why. Everything is
written atomically, so an interrupted build leaves the old directory or none.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_exact import atomic_io
from megatron_exact.synthetic.language import (EOD_TOKEN, KEY_MARK, PAD_TOKEN, QUERY_MARK, UNK_TOKEN, LanguageConfig,
                                               SyntheticLanguage)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: the probe spec uses the corpus's Markov filler
DATA_NAME = "corpus"


@dataclass(frozen=True)
class SyntheticCorpus:
    """Where a built corpus lives; ``data_prefix`` is what ``--data-path`` takes."""

    directory: str
    data_prefix: str
    tokenizer_dir: str
    probe_spec: str
    vocab_size: int
    rebuilt: bool
    reason: str


def build_tokenizer_dir(language: SyntheticLanguage, out_dir: str) -> None:
    """A HF tokenizer directory whose ids are the language's vocabulary order (one id per word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(language.vocabulary)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([EOD_TOKEN, PAD_TOKEN, UNK_TOKEN])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOD_TOKEN, pad_token=PAD_TOKEN,
                                      unk_token=UNK_TOKEN)
    wrapped.save_pretrained(out_dir)


def probe_spec(language: SyntheticLanguage) -> dict:
    """The distance-probe task specification of the language, in the evaluation's specification format.

    The specification's filler is the corpus's own Markov chain (``markov`` filler: the same
    successor table, weights and jump probability), so probe prompts read like training text.
    """
    return {
        "format": "megatron_exact.probe_spec",
        "version": 1,
        "name": f"synthetic-kv-{language.config.fingerprint()}",
        "description": "key-value recall in the synthetic word language: a fact 'KEY k v' in filler, asked for "
                       "by 'QUERY k'; the answer is the value word v",
        "preamble": "",
        "fact": f"{KEY_MARK} {{key}} {{answer}}",
        "question": f"{QUERY_MARK} {{key}}",
        "keys": list(language.keys),
        "answers": list(language.values),
        "separator": " ",
        "answer_separator": " ",
        "filler": {"type": "markov", "words": list(language.filler_words), "sentence_length": [8, 16],
                   "sentence_end": "", "successors": [list(row) for row in language.successor_table],
                   "weights": list(language.successor_probabilities),
                   "jump_probability": language.config.jump_probability},
    }


def _manifest(config: LanguageConfig, documents: int) -> dict:
    return {"format_version": MANIFEST_VERSION, "language": config.to_dict(), "documents": documents}


def _existing_manifest(directory: str) -> Optional[dict]:
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _difference(old: dict, new: dict) -> str:
    changed = []
    for key in sorted(set(old) | set(new)):
        if key == "language":
            for name in sorted(set(old.get(key, {})) | set(new[key])):
                if old.get(key, {}).get(name) != new[key].get(name):
                    changed.append(f"{name} {old.get(key, {}).get(name)} -> {new[key].get(name)}")
        elif old.get(key) != new.get(key):
            changed.append(f"{key} {old.get(key)} -> {new.get(key)}")
    return ", ".join(changed)


def build_corpus(directory: str, config: LanguageConfig = LanguageConfig(), documents: int = 4000,
                 log: Callable[[str], None] = print) -> SyntheticCorpus:
    """Generate, tokenize and preprocess ``documents`` documents of the language into ``directory``."""
    from megatron_exact.data.preprocess import PreprocessConfig, preprocess

    if documents < 1:
        raise ValueError(f"synthetic corpus: documents must be >= 1, got {documents}")
    language = SyntheticLanguage(config)
    wanted = _manifest(config, documents)
    existing = _existing_manifest(directory)
    if existing == wanted:
        reason = f"reusing {directory} (same language settings and {documents} documents)"
        log(reason)
        return _located(directory, language, rebuilt=False, reason=reason)
    if existing is None:
        reason = "no corpus built there yet" if not os.path.exists(directory) else "no readable manifest"
    else:
        reason = f"settings changed: {_difference(existing, wanted)}"
    log(f"building the synthetic corpus in {directory} ({reason})")
    with atomic_io.atomic_directory(directory, overwrite=True) as tmp:
        tmp = str(tmp)
        jsonl = os.path.join(tmp, "corpus.jsonl")
        with open(jsonl, "w") as f:
            for text in language.documents(documents):
                f.write(json.dumps({"text": text}) + "\n")
        build_tokenizer_dir(language, os.path.join(tmp, "tokenizer"))
        preprocess(PreprocessConfig(input=jsonl, output_prefix=os.path.join(tmp, DATA_NAME),
                                    tokenizer_type="HuggingFaceTokenizer",
                                    tokenizer_model=os.path.join(tmp, "tokenizer"), append_eod=True, workers=1),
                   log=lambda message: None)
        _point_sidecar_at(os.path.join(tmp, f"{DATA_NAME}_text_document"), os.path.join(directory, "tokenizer"))
        with open(os.path.join(tmp, "probe_spec.json"), "w") as f:
            json.dump(probe_spec(language), f, indent=1)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(wanted, f, indent=2, sort_keys=True)
    return _located(directory, language, rebuilt=True, reason=reason)


def _point_sidecar_at(prefix: str, tokenizer_dir: str) -> None:
    """The data sidecar names the tokenizer by the path it was built at (inside the temporary
    directory): point it at the final location so that training and export find the tokenizer."""
    from megatron_exact.data.tokenizers import read_tokenizer_sidecar, sidecar_path

    record = read_tokenizer_sidecar(prefix)
    record["tokenizer_model"] = os.path.abspath(tokenizer_dir)
    with open(sidecar_path(prefix), "w") as f:
        json.dump(record, f, sort_keys=True, indent=2)


def _located(directory: str, language: SyntheticLanguage, rebuilt: bool, reason: str) -> SyntheticCorpus:
    return SyntheticCorpus(
        directory=directory,
        data_prefix=os.path.join(directory, f"{DATA_NAME}_text_document"),
        tokenizer_dir=os.path.join(directory, "tokenizer"),
        probe_spec=os.path.join(directory, "probe_spec.json"),
        vocab_size=len(language.vocabulary),
        rebuilt=rebuilt,
        reason=reason,
    )
