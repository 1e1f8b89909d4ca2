"""Building and filling models from the model part of a ``torch_dist`` checkpoint.

A checkpoint holds ``{"model": model.sharded_state_dict(), "model_arch": ...,
"padded_vocab_size": ..., "iteration": ..., "checkpoint_version": 3.0}``
(:func:`megatron_exact.checkpoint.model_checkpoint_state`; the
trainer adds its optimizer/scheduler/RNG state). Tensor global shapes do not
depend on the parallel layout, so a checkpoint written at one TP/PP loads at
any other; only the padded vocabulary must match, which is why models are built
from the checkpoint's ``padded_vocab_size`` rather than recomputed from flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from megatron_exact.checkpoint import arch_from_dict, read_model_record, reading_checkpoint
from megatron_exact.model.config import ModelArch
from megatron_exact.model.parallel_layout import check_parallel_layout


def read_checkpoint_header(checkpoint_dir: Union[str, Path]) -> tuple[ModelArch, int, dict]:
    """``(arch, padded_vocab_size, common_state)`` of a checkpoint directory (``iter_*``/``release``)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a torch_dist checkpoint (no metadata.json)")
    common = read_model_record(checkpoint_dir)
    missing = [key for key in ("model_arch", "padded_vocab_size") if key not in common]
    if missing:
        raise ValueError(f"{checkpoint_dir}: checkpoint lacks {', '.join(missing)} (not written by megatron_exact?)")
    return arch_from_dict(common["model_arch"]), int(common["padded_vocab_size"]), common


def stored_dtype(checkpoint_dir: Union[str, Path]) -> torch.dtype:
    """The dtype the checkpoint stores the model weights in (that of its word embeddings)."""
    from megatron.core import dist_checkpointing

    with reading_checkpoint(checkpoint_dir):
        metadata = dist_checkpointing.load_tensors_metadata(str(checkpoint_dir))
    for key in ("embedding.word_embeddings.weight", "model.embedding.word_embeddings.weight"):
        if key in metadata:
            return metadata[key].dtype
    return next(iter(metadata.values())).dtype


def build_model_for_checkpoint(
    arch: ModelArch,
    padded_vocab_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    seq_length: int = 4096,
    initialize: bool = False,
    **config_overrides,
):
    """This rank's GPTModel stage for ``arch``, with exactly ``padded_vocab_size`` rows of vocabulary.

    Uses the TP/PP layout of ``parallel_state`` (call
    :func:`megatron_exact.platform.distributed.initialize_model_parallel` first).
    Weights are left uninitialised unless ``initialize`` (they are about to be
    overwritten, and random init of a 1B model costs tens of seconds on CPU).
    """
    from megatron.core import parallel_state

    from megatron_exact.model.builder import build_gpt_model, padded_vocab_size as pad_vocab, transformer_config

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    check_parallel_layout(arch, tp, pp)
    if padded_vocab_size % tp or padded_vocab_size < arch.vocab_size:
        raise ValueError(
            f"the checkpoint's padded vocabulary ({padded_vocab_size}) cannot be split over "
            f"--tensor-model-parallel-size {tp}; re-import with a TP that is a multiple of {tp}"
        )
    # builder pads to a multiple of (divisible_by * TP); this divisor reproduces the stored size exactly.
    divisible_by = padded_vocab_size // tp
    assert pad_vocab(arch.vocab_size, divisible_by, tp) == padded_vocab_size
    config = transformer_config(
        arch,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        perform_initialization=initialize,
        **config_overrides,
    )
    return build_gpt_model(
        arch, config, seq_length=seq_length, make_vocab_size_divisible_by=divisible_by, use_transformer_engine=False
    )


def load_model_weights(model, checkpoint_dir: Union[str, Path]) -> None:
    """Fill ``model`` (any TP/PP stage) from the checkpoint's ``model`` entry; other entries are not read."""
    from megatron.core import dist_checkpointing

    with reading_checkpoint(checkpoint_dir):
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint_dir))
    model.load_state_dict(loaded["model"], strict=True)
