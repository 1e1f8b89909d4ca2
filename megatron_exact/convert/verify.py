"""Logit comparison between a HF model and a Megatron checkpoint, on the same random tokens (CPU, fp32).

The Megatron model sees the documents packed into one THD row with document
masking (the way the trainer feeds it); the HF model sees each document in a
separate forward. Equal logits therefore check the weights, RoPE (including
llama3 scaling and the restart of positions at each document) and the
document masking at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch

from megatron_exact.errors import UserError

DEFAULT_DOCUMENT_LENGTHS = (37, 21)


class VerificationError(UserError, RuntimeError):
    """Megatron and HF logits differ by more than the tolerance."""


def random_documents(vocab_size: int, lengths: Sequence[int] = DEFAULT_DOCUMENT_LENGTHS, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@torch.no_grad()
def hf_logits(hf_model, documents: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[sum(len), vocab]`` logits of a transformers causal LM, one forward per document."""
    outputs = [hf_model(torch.tensor([doc])).logits[0].float() for doc in documents]
    return torch.cat(outputs)


@torch.no_grad()
def megatron_logits(model, documents: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """``[sum(len), vocab]`` logits of a Megatron GPTModel (PP=1) on the documents packed into one row.

    Vocab-parallel logits are gathered over the TP group and the padded
    vocabulary is dropped.
    """
    from megatron.core import tensor_parallel

    from megatron_exact.model.packing import batch_from_documents, pack_batch

    total = sum(len(doc) for doc in documents)
    # batch_from_documents wants seq_length + 1 tokens (the last is only a label): add a 1-token tail.
    batch = batch_from_documents([list(doc) for doc in documents] + [[0]], seq_length=total)
    packed = pack_batch(batch)
    logits = model(packed.tokens, packed.position_ids, None, packed_seq_params=packed.packed_seq_params)
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits[0, :, :vocab_size].float()


def load_hf_model(hf_dir: Union[str, Path]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True)
    return model.eval()


def verify_checkpoint_against_hf(
    checkpoint_dir: Union[str, Path],
    hf_dir: Union[str, Path],
    *,
    tolerance: float = 1e-3,
    lengths: Sequence[int] = DEFAULT_DOCUMENT_LENGTHS,
    seed: int = 0,
) -> float:
    """Max abs logit difference between the checkpoint (built at TP=1/PP=1, fp32) and the HF model.

    Raises :class:`VerificationError` above ``tolerance``. Needs model-parallel
    state initialised for one process (the converters do that).
    """
    from megatron_exact.convert.megatron_checkpoint import build_model_for_checkpoint, load_model_weights, read_checkpoint_header

    arch, padded_vocab, _ = read_checkpoint_header(checkpoint_dir)
    documents = random_documents(arch.vocab_size, lengths, seed)
    model = build_model_for_checkpoint(arch, padded_vocab, dtype=torch.float32, seq_length=sum(lengths))
    load_model_weights(model, checkpoint_dir)
    ours = megatron_logits(model.eval(), documents, arch.vocab_size)
    del model
    reference = hf_logits(load_hf_model(hf_dir), documents)
    diff = (ours - reference).abs().max().item()
    print(
        f"verify: max |logit difference| Megatron vs HF = {diff:.3e} over {reference.shape[0]} tokens "
        f"in {len(documents)} packed documents (tolerance {tolerance:.1e})",
        flush=True,
    )
    if not diff <= tolerance:
        raise VerificationError(
            f"Megatron checkpoint {checkpoint_dir} and HF model {hf_dir} disagree: max abs logit difference "
            f"{diff:.3e} > tolerance {tolerance:.1e}"
        )
    return diff
