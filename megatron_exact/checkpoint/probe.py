"""Probe logits: what the trained model computed on a fixed batch, saved next to its weights.

At every save the trainer runs the model it is training (its parallel layout, dtype and
RoPE, whatever the architecture record says) on a fixed probe batch and writes the
logits at a few positions into the checkpoint directory (``probe_logits.safetensors``).
``export-hf --verify`` compares the exported HF model, built from its ``config.json``
alone, against them: a reference that does not come from the checkpoint's architecture
record, so a record (and hence a ``config.json``) that disagrees with what was trained
fails verification instead of passing on both sides.

The probe: two documents of random tokens packed into one row of ``--seq-length``
tokens (at most :data:`PROBE_MAX_TOKENS`), the long one reaching the trained context,
the short one checking that positions restart at a document; logits (fp32, full
vocabulary) at :data:`PROBE_POSITIONS` positions spread over the row, the last included.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import torch

PROBE_FILENAME = "probe_logits.safetensors"
PROBE_FORMAT_VERSION = "1"
PROBE_MAX_TOKENS = 4096  # enough to reach a long context, cheap enough to verify on a CPU
PROBE_POSITIONS = 32  # logits rows kept: 32 x vocabulary x 4 bytes (20 MB at 150K tokens)
_SHORT_DOCUMENT = 16
_SEED = 20240611


@dataclasses.dataclass
class Probe:
    documents: list  # token ids of each document, packed in this order
    positions: torch.Tensor  # [K] int64: positions in the packed row whose logits are kept
    logits: torch.Tensor  # [K, vocab] fp32
    computed_in: str  # the dtype the training model computed in: "float32", "bfloat16", "float16"


def probe_documents(vocab_size: int, seq_length: int) -> list[list[int]]:
    """The probe's documents (fixed random tokens) for a model of ``vocab_size`` trained at ``seq_length``."""
    total = min(seq_length, PROBE_MAX_TOKENS)
    short = min(_SHORT_DOCUMENT, total // 4)
    lengths = [total - short, short] if short else [total]
    generator = torch.Generator().manual_seed(_SEED)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def probe_positions(total_tokens: int) -> torch.Tensor:
    """:data:`PROBE_POSITIONS` positions spread evenly over a row of ``total_tokens`` (first and last included)."""
    count = min(PROBE_POSITIONS, total_tokens)
    return torch.linspace(0, total_tokens - 1, count).round().long().unique()


def write_probe(path: Union[str, Path], probe: Probe) -> None:
    from safetensors.torch import save_file

    lengths = torch.tensor([len(doc) for doc in probe.documents], dtype=torch.int64)
    tokens = torch.tensor([t for doc in probe.documents for t in doc], dtype=torch.int64)
    tensors = {"tokens": tokens, "document_lengths": lengths, "positions": probe.positions.to(torch.int64),
               "logits": probe.logits.float().contiguous()}
    save_file(tensors, str(path), metadata={"format_version": PROBE_FORMAT_VERSION, "computed_in": probe.computed_in})


def read_probe(checkpoint_dir: Union[str, Path]) -> Probe | None:
    """The probe saved in ``checkpoint_dir``, or None when it has none (an import, an older checkpoint)."""
    from safetensors import safe_open

    path = Path(checkpoint_dir) / PROBE_FILENAME
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format_version") != PROBE_FORMAT_VERSION:
            raise ValueError(f"{path}: probe format {metadata.get('format_version')!r}, expected {PROBE_FORMAT_VERSION}")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    documents, start = [], 0
    tokens = tensors["tokens"].tolist()
    for length in tensors["document_lengths"].tolist():
        documents.append(tokens[start : start + length])
        start += length
    return Probe(documents, tensors["positions"], tensors["logits"], metadata.get("computed_in", "float32"))
