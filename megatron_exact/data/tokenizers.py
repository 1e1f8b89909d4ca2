"""Tokenizers for preprocessing, training and evaluation, all from Megatron-Core.

``build_tokenizer(tokenizer_type, tokenizer_model)`` returns a
``megatron.core.tokenizers`` object (``.vocab_size``, ``.eod``, ``.tokenize``,
``.detokenize``) built with the same arguments Megatron-LM 0.16.1's
``tools/preprocess_data.py`` passes by default, so ids agree with Megatron-LM.

Types (Megatron-LM's ``--tokenizer-type`` names):
- ``HuggingFaceTokenizer``: a local directory readable by ``AutoTokenizer``.
- ``SentencePieceTokenizer``: a ``.model`` file.
- ``TikTokenizer``: a tiktoken vocabulary JSON (Megatron-Core's format).
- ``ByteTokenizer``: UTF-8 bytes, ids 0..255 are the bytes, 256 is the EOD
  token, 257 padding; needs no files. It is Megatron-Core's ``byte-level``
  library with the special ids moved past the bytes (its default EOS id 0
  would collide with the NUL byte).

The sidecar: ``write_tokenizer_sidecar`` / ``read_tokenizer_sidecar(prefix)``
store the tokenizer that made ``{prefix}.bin/.idx`` in
``{prefix}.tokenizer_info.json`` so that training can check it is the same
tokenizer, HF export can write matching tokenizer files
(``save_hf_tokenizer``) and evaluation tokenizes the same way.

Identity: :func:`tokenizer_fingerprint` hashes what decides the ids (the
vocabulary, the special ids, and the ids of a fixed multilingual probe
text, which also catch a change of merges or normalisation). Two
tokenizers with the same vocabulary size but different vocabularies have
different fingerprints; the sidecar records it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Sequence

import numpy as np

from megatron_exact.errors import UserError

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "TikTokenizer", "ByteTokenizer")

BYTE_VOCAB = 256
BYTE_EOD_ID = 256
BYTE_PAD_ID = 257
_BYTE_EOD_TOKEN = "<eod>"
_BYTE_PAD_TOKEN = "<pad>"

SIDECAR_SUFFIX = ".tokenizer_info.json"
SIDECAR_FORMAT_VERSION = 2  # 2: adds "fingerprint"

# Tokenized by tokenizer_fingerprint: ASCII words, digits, punctuation, runs of whitespace,
# accented Latin, CJK, emoji (4-byte UTF-8), so that merges and normalisation show up in the ids.
FINGERPRINT_PROBE = (
    "The quick brown fox jumps over the lazy dog. 0123456789 3.14159, x=y+1; (a|b) {c} [d] \"e\" 'f' \n"
    "  two  spaces\tand a tab\n\nZürich naïve café São Paulo Łódź déjà-vu — «quotes» … "
    "東京都 北京 서울 Москва عربى हिन्दी 🙂🚀 ∑∞≠"
)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None):
    """A Megatron-Core tokenizer for ``--tokenizer-type`` / ``--tokenizer-model``."""
    from megatron.core.tokenizers import MegatronTokenizer

    if tokenizer_type == "ByteTokenizer":
        # ByteLevelTokenizer numbers its special tokens downwards from the end of the
        # vocabulary, so listing pad before eod puts eod at 256 and pad at 257.
        return MegatronTokenizer.from_pretrained(
            metadata_path={"library": "byte-level"},
            special_tokens=[_BYTE_PAD_TOKEN, _BYTE_EOD_TOKEN],
            vocab_size=BYTE_VOCAB,
            _eos_id=BYTE_EOD_ID,
            _pad_id=BYTE_PAD_ID,
        )
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of {', '.join(TOKENIZER_TYPES)}")
    if not tokenizer_model:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model (a local path)")
    if not os.path.exists(tokenizer_model):
        raise FileNotFoundError(f"--tokenizer-model {tokenizer_model}: no such file or directory")
    if tokenizer_type == "HuggingFaceTokenizer":
        # Megatron-LM's defaults: use_fast False, include_special_tokens False.
        kwargs = dict(
            vocab_file=None,
            merges_file=None,
            additional_special_tokens=[],
            use_fast=False,
            trust_remote_code=False,
            include_special_tokens=False,
        )
        library = "huggingface"
    elif tokenizer_type == "SentencePieceTokenizer":
        kwargs = dict(legacy=False, special_tokens=None)
        library = "sentencepiece"
    else:  # TikTokenizer
        kwargs = dict(num_special_tokens=1000, special_tokens=None)
        library = "tiktoken"
    return MegatronTokenizer.from_pretrained(
        tokenizer_path=tokenizer_model, metadata_path={"library": library}, **kwargs
    )


class BatchEncoder:
    """Tokenizes many texts at once, giving exactly ``tokenizer.tokenize`` ids.

    Megatron-Core's HF path is ``convert_tokens_to_ids(hf.tokenize(text))``, i.e. the
    fast backend's encoding without special tokens; calling the Rust backend on a
    whole batch gives the same ids without the per-call Python overhead. Byte ids
    are the UTF-8 bytes. Any other tokenizer is called once per text.
    """

    def __init__(self, tokenizer, tokenizer_type: str):
        self.tokenizer = tokenizer
        self._backend = None
        self._is_bytes = tokenizer_type == "ByteTokenizer"
        if tokenizer_type == "HuggingFaceTokenizer":
            library = tokenizer._tokenizer
            if not library.include_special_tokens:
                # Only a fast (Rust-backed) HF tokenizer has the batch entry point.
                self._backend = getattr(library.tokenizer, "_tokenizer", None)

    def encode(self, texts: Sequence[str]) -> List[np.ndarray]:
        if self._is_bytes:
            return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]
        if self._backend is not None:
            encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=False)
            return [np.asarray(enc.ids, dtype=np.int64) for enc in encodings]
        return [np.asarray(self.tokenizer.tokenize(text), dtype=np.int64) for text in texts]


def sidecar_path(prefix: str) -> str:
    return prefix + SIDECAR_SUFFIX


def _special_id(tokenizer, name: str) -> Optional[int]:
    try:
        value = getattr(tokenizer, name)
    except (AttributeError, NotImplementedError, ValueError, KeyError):
        return None
    return int(value) if isinstance(value, (int, np.integer)) else None


def tokenizer_fingerprint(tokenizer) -> str:
    """``sha256:<hex>`` identity of a Megatron-Core tokenizer: equal exactly when the vocabulary
    (token -> id), the special ids and the ids of :data:`FINGERPRINT_PROBE` are equal."""
    try:
        vocab = tokenizer.vocab
    except (AttributeError, NotImplementedError):
        vocab = None  # byte-level: the vocabulary is the 256 bytes, fixed
    if isinstance(vocab, (list, tuple)):  # some libraries list the tokens in id order
        vocab = {token: index for index, token in enumerate(vocab)}
    identity = {
        "vocab_size": int(tokenizer.vocab_size),
        "special": {name: _special_id(tokenizer, name) for name in ("eod", "pad", "bos", "eos", "unk")},
        "probe": [int(i) for i in tokenizer.tokenize(FINGERPRINT_PROBE)],
        "vocab": sorted((str(token), int(index)) for token, index in vocab.items()) if vocab else None,
    }
    encoded = json.dumps(identity, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(encoded).hexdigest()


def tokenizer_description(tokenizer_type: str, tokenizer_model: str | None, tokenizer) -> dict:
    return {
        "tokenizer_type": tokenizer_type,
        "tokenizer_model": os.path.abspath(tokenizer_model) if tokenizer_model else None,
        "vocab_size": int(tokenizer.vocab_size),
        "eod": int(tokenizer.eod),
        "fingerprint": tokenizer_fingerprint(tokenizer),
    }


def write_tokenizer_sidecar(prefix: str, description: dict) -> None:
    """Write ``{prefix}.tokenizer_info.json`` atomically."""
    from megatron_exact import atomic_io

    atomic_io.write_json(sidecar_path(prefix), {"format_version": SIDECAR_FORMAT_VERSION, **description},
                         sort_keys=True)


def read_tokenizer_sidecar(prefix: str) -> dict:
    """The tokenizer record of dataset ``prefix``: ``tokenizer_type``, ``tokenizer_model``,
    ``vocab_size``, ``eod`` (plus ``level``, ``append_eod``, ``json_key`` from preprocessing)."""
    path = sidecar_path(prefix)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: no tokenizer sidecar next to {prefix}.bin/.idx (written by tools/preprocess_data.py); "
            "datasets made by Megatron-LM have none: pass the tokenizer explicitly"
        )
    with open(path) as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    missing = {"tokenizer_type", "vocab_size", "eod"} - set(record)
    if missing:
        raise ValueError(f"{path}: missing field(s) {sorted(missing)}")
    return record


def check_tokenizer_matches(prefix: str, tokenizer) -> None:
    """Raise if ``tokenizer`` is not the one that made ``prefix`` (by fingerprint; a sidecar of
    format 1, which has none, by vocabulary size and EOD id)."""
    record = read_tokenizer_sidecar(prefix)
    ours = (int(tokenizer.vocab_size), int(tokenizer.eod))
    theirs = (int(record["vocab_size"]), int(record["eod"]))
    if ours != theirs:
        raise ValueError(
            f"{sidecar_path(prefix)}: data was tokenized with vocab_size={theirs[0]}, eod={theirs[1]} "
            f"({record['tokenizer_type']} {record.get('tokenizer_model')}) but the tokenizer given has "
            f"vocab_size={ours[0]}, eod={ours[1]}"
        )
    recorded = record.get("fingerprint")
    if recorded is not None and recorded != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"{sidecar_path(prefix)}: data was tokenized with a different tokenizer ({record['tokenizer_type']} "
            f"{record.get('tokenizer_model')}, fingerprint {recorded[:19]}) than the one given (same vocabulary "
            f"size {ours[0]}, fingerprint {tokenizer_fingerprint(tokenizer)[:19]}): the token ids mean other "
            "things; re-preprocess the data or use the tokenizer that made it"
        )


def byte_tokenizer_hf_json() -> dict:
    """A HF ``tokenizer.json`` giving ``ByteTokenizer`` ids: byte b -> id b, <eod> 256, <pad> 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps every byte to one printable character; invert that mapping so
    # each character's id is its byte value.
    char_of_byte = _byte_level_char_of_byte()
    assert set(char_of_byte.values()) == set(byte_chars)
    vocab = {char_of_byte[b]: b for b in range(BYTE_VOCAB)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([_BYTE_EOD_TOKEN, _BYTE_PAD_TOKEN])
    assert tok.token_to_id(_BYTE_EOD_TOKEN) == BYTE_EOD_ID and tok.token_to_id(_BYTE_PAD_TOKEN) == BYTE_PAD_ID
    return json.loads(tok.to_str())


def _byte_level_char_of_byte() -> dict:
    """GPT-2's reversible byte -> printable character table (what ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# The files of a HF tokenizer directory (what AutoTokenizer reads).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class TokenizerExportError(UserError, ValueError):
    """HF tokenizer files cannot be written for a recorded tokenizer."""


def _check_same_tokenizer(record: dict) -> None:
    """The tokenizer at ``record``'s path still gives the ids the record's fingerprint says."""
    path = record.get("tokenizer_model")
    if not path or not os.path.exists(path):
        raise TokenizerExportError(f"the {record['tokenizer_type']} the run trained with, {path}, no longer exists")
    recorded = record.get("fingerprint")
    if recorded is not None:
        found = tokenizer_fingerprint(build_tokenizer(record["tokenizer_type"], path))
        if found != recorded:
            raise TokenizerExportError(
                f"{path} changed since the run trained with it (tokenizer fingerprint {found[:19]}, recorded "
                f"{recorded[:19]}): its ids are not the ones the model learned"
            )


def _sentencepiece_tokenizer_config(model_path: str) -> dict:
    """A ``tokenizer_config.json`` for transformers' plain SentencePiece tokenizer class.

    ``BertGenerationTokenizer`` is ``sentencepiece``'s own encoding with nothing around it
    (no added prefix, no BOS/EOS), the ids Megatron-Core's SentencePieceTokenizer gives;
    its special tokens are the model's own (none added).
    """
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=model_path)

    def piece(index: int):
        return processor.id_to_piece(index) if 0 <= index < processor.get_piece_size() else None

    return {
        "tokenizer_class": "BertGenerationTokenizer",
        "unk_token": piece(processor.unk_id()),
        "bos_token": piece(processor.bos_id()),
        "eos_token": piece(processor.eos_id()),
        "pad_token": piece(processor.pad_id()),
        "sep_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
    }


def save_hf_tokenizer(record: dict, out_dir: str) -> str:
    """Write HF tokenizer files giving the ids of ``record``'s tokenizer (a sidecar's or a
    checkpoint's tokenizer record) into ``out_dir``; returns what was written, in words.

    HuggingFaceTokenizer: the files of its directory, copied. ByteTokenizer: a generated
    ``tokenizer.json``. SentencePieceTokenizer: its model as ``tokenizer.model`` with a
    ``tokenizer_config.json`` transformers loads. A tokenizer that moved or changed since
    (by its fingerprint) and TikTokenizer (no HF equivalent is generated) raise
    :class:`TokenizerExportError`.
    """
    import shutil

    from transformers import PreTrainedTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    kind = record["tokenizer_type"]
    if kind == "ByteTokenizer":
        path = os.path.join(out_dir, "tokenizer.json")
        with open(path, "w") as f:
            json.dump(byte_tokenizer_hf_json(), f)
        PreTrainedTokenizerFast(tokenizer_file=path, eos_token=_BYTE_EOD_TOKEN, pad_token=_BYTE_PAD_TOKEN).save_pretrained(out_dir)
        return "a generated ByteTokenizer tokenizer.json"
    if kind == "HuggingFaceTokenizer":
        _check_same_tokenizer(record)
        source = record["tokenizer_model"]
        copied = [name for name in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(source, name))]
        if not copied:
            raise TokenizerExportError(f"{source}: none of {', '.join(HF_TOKENIZER_FILES)} found")
        for name in copied:
            shutil.copy2(os.path.join(source, name), os.path.join(out_dir, name))
        return f"{', '.join(copied)} copied from {source}"
    if kind == "SentencePieceTokenizer":
        _check_same_tokenizer(record)
        shutil.copy2(record["tokenizer_model"], os.path.join(out_dir, "tokenizer.model"))
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(_sentencepiece_tokenizer_config(record["tokenizer_model"]), f, indent=2)
        return f"tokenizer.model (from {record['tokenizer_model']}) with a SentencePiece tokenizer_config.json"
    raise TokenizerExportError(
        f"HF tokenizer files are not generated for {kind} ({record.get('tokenizer_model')}): transformers has "
        "no tokenizer class that reads its vocabulary"
    )


def check_hf_tokenizer_ids(hf_dir: str, record: dict) -> None:
    """Raise :class:`TokenizerExportError` unless ``AutoTokenizer`` on ``hf_dir`` (tokenizer files and
    ``config.json``, as a user loads it) gives the ids of ``record``'s tokenizer on the fingerprint probe.

    transformers may pick its class from ``config.json``'s model type rather than from
    ``tokenizer_config.json`` (Qwen2, for one): what counts is what it loads.
    """
    from transformers import AutoTokenizer

    expected = [int(i) for i in build_tokenizer(record["tokenizer_type"], record.get("tokenizer_model")).tokenize(
        FINGERPRINT_PROBE)]
    loaded = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    found = loaded(FINGERPRINT_PROBE, add_special_tokens=False).input_ids
    if found != expected:
        first = next((i for i, (a, b) in enumerate(zip(found, expected)) if a != b), min(len(found), len(expected)))
        raise TokenizerExportError(
            f"transformers loads the {record['tokenizer_type']} files written for {record.get('tokenizer_model')} "
            f"as {type(loaded).__name__}, which gives other ids than the run trained with (from token {first} of a "
            f"probe text on: {found[first:first + 5]} instead of {expected[first:first + 5]})"
        )
