"""Logit comparisons that check a conversion (CPU, fp32).

Two references:

- The checkpoint rebuilt as a Megatron model from its weights and architecture
  record (:func:`verify_checkpoint_against_hf`): it sees the documents packed
  into one THD row with document masking (the way the trainer feeds it), the
  HF model each document in a separate forward. Equal logits check the weights,
  RoPE (including the restart of positions at each document) and the masking.
- The probe logits the training process saved with the checkpoint
  (:func:`verify_against_probe`, ``megatron_exact/checkpoint/probe.py``): what
  the model computed as it trained, independent of the architecture record, so
  a record or ``config.json`` that does not describe the trained model fails.

:func:`verify_export` runs both (the second when the checkpoint has a probe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from megatron_exact.errors import UserError

DEFAULT_DOCUMENT_LENGTHS = (37, 21)
# A probe computed in bf16/fp16 differs from the fp32 HF model by the training dtype's rounding:
# it is compared at this fraction of its largest logit (a changed RoPE or config moves logits by
# about their own size), or --verify-tolerance if that is larger.
HALF_PRECISION_PROBE_TOLERANCE = 2**-5


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


def verify_against_probe(checkpoint_dir: Union[str, Path], hf_dir: Union[str, Path], *, tolerance: float = 1e-3,
                         hf_model=None) -> Optional[float]:
    """Max abs difference between the HF model in ``hf_dir`` (built from its ``config.json`` alone) and
    the probe logits the trainer saved in ``checkpoint_dir``; None when the checkpoint has no probe.

    Raises :class:`VerificationError` above the tolerance (see :data:`HALF_PRECISION_PROBE_TOLERANCE`).
    """
    from megatron_exact.checkpoint.probe import PROBE_FILENAME, read_probe

    probe = read_probe(checkpoint_dir)
    if probe is None:
        return None
    model = hf_model if hf_model is not None else load_hf_model(hf_dir)
    ours = hf_logits(model, probe.documents)[probe.positions]
    if ours.shape != probe.logits.shape:
        raise VerificationError(f"HF model {hf_dir} gives logits of shape {tuple(ours.shape)} on the probe, the "
                                f"checkpoint's probe has {tuple(probe.logits.shape)} ({Path(checkpoint_dir) / PROBE_FILENAME})")
    limit = tolerance
    if probe.computed_in != "float32":
        limit = max(tolerance, HALF_PRECISION_PROBE_TOLERANCE * probe.logits.abs().max().item())
    diff = (ours - probe.logits).abs().max().item()
    lengths = [len(doc) for doc in probe.documents]
    print(
        f"verify: max |logit difference| HF vs the trained model's probe = {diff:.3e} at {len(probe.positions)} "
        f"positions of documents {lengths} (probe computed in {probe.computed_in}; tolerance {limit:.1e})",
        flush=True,
    )
    if not diff <= limit:
        raise VerificationError(
            f"HF model {hf_dir} does not compute what the trained model computed: max abs logit difference "
            f"{diff:.3e} > {limit:.1e} against the probe logits saved in {Path(checkpoint_dir) / PROBE_FILENAME} "
            f"(documents of {lengths} tokens); its config.json (e.g. RoPE: rope_theta, rope_parameters) does not "
            "describe the trained model"
        )
    return diff


def verify_export(checkpoint_dir: Union[str, Path], hf_dir: Union[str, Path], *, tolerance: float = 1e-3) -> None:
    """Both checks of an export: against the rebuilt checkpoint, and against the trained model's probe."""
    verify_checkpoint_against_hf(checkpoint_dir, hf_dir, tolerance=tolerance)
    if verify_against_probe(checkpoint_dir, hf_dir, tolerance=tolerance) is None:
        print(f"verify: {checkpoint_dir} holds no probe logits (an import, or saved before probes were "
              "recorded): checked against its architecture record only", flush=True)
