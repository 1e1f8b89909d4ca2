"""HF directory (any family in ``model/families.py``) -> ``torch_dist`` checkpoint the trainer loads with ``--finetune``.

Runs in one process without a launcher: the model is built at TP=1/PP=1,
filled one HF tensor at a time (peak memory: the model plus one tensor) and
saved with ``dist_checkpointing``. Tensor global shapes do not depend on the
layout, so the checkpoint loads at any TP/PP; the requested layout is
validated against the model here (so a bad one fails now, not at launch) and
decides the vocabulary padding (``--make-vocab-size-divisible-by`` x TP, as the
trainer pads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from tqdm import tqdm

from megatron_exact.convert.hf_mapping import expected_hf_shapes, hf_to_megatron, param_mappings
from megatron_exact.convert.megatron_checkpoint import build_model_for_checkpoint
from megatron_exact.convert.safetensors_stream import SafetensorsReader
from megatron_exact.model.config import UnsupportedModelError, arch_from_hf_config
from megatron_exact.model.parallel_layout import check_parallel_layout
from megatron_exact.atomic_io import atomic_directory
from megatron_exact.errors import read_json
from megatron_exact.checkpoint import (
    RELEASE,
    checkpoint_dir,
    model_checkpoint_state,
    write_tracker_atomically,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# Non-parameter tensors some HF checkpoints carry; they are recomputed, never converted.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class HFWeights:
    """The tensors of a local HF directory (sharded or single-file safetensors), read one at a time."""

    def __init__(self, hf_dir: Path):
        self.hf_dir = hf_dir
        index = hf_dir / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{index}: not a safetensors index ({err})") from None
            missing = sorted({f for f in weight_map.values() if not (hf_dir / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{index} names shard(s) missing from {hf_dir}: {', '.join(missing)}")
            self.file_of = dict(weight_map)
        elif (hf_dir / SAFETENSORS_SINGLE).is_file():
            reader = SafetensorsReader(hf_dir / SAFETENSORS_SINGLE)
            self.file_of = {name: SAFETENSORS_SINGLE for name in reader.keys()}
            reader.close()
        else:
            legacy = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt"))
            hint = f" (found {', '.join(legacy)}: PyTorch pickles are not supported, re-save with safe_serialization)" if legacy else ""
            raise FileNotFoundError(f"{hf_dir}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}{hint}")
        self._readers: dict[str, SafetensorsReader] = {}

    def reader(self, name: str) -> SafetensorsReader:
        filename = self.file_of[name]
        if filename not in self._readers:
            self._readers[filename] = SafetensorsReader(self.hf_dir / filename)
        return self._readers[filename]

    def read(self, name: str) -> torch.Tensor:
        return self.reader(name).read(name)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


def _check_tensors(weights: HFWeights, arch) -> None:
    """Every tensor the model needs is present with the right shape, and nothing unknown is dropped."""
    expected = expected_hf_shapes(arch)
    present = set(weights.file_of)
    missing = sorted(set(expected) - present)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{weights.hf_dir}: tensors missing from the checkpoint: {', '.join(missing[:5])}{more}")
    unexpected = sorted(
        name
        for name in present - set(expected)
        if not name.endswith(_IGNORED_SUFFIXES) and not (arch.tie_word_embeddings and name == "lm_head.weight")
    )
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise UnsupportedModelError(
            f"{weights.hf_dir}: tensors this converter does not know how to map: {', '.join(unexpected[:5])}{more}"
        )
    for name, shape in expected.items():
        found = weights.reader(name).shape(name)
        if found != shape:
            raise ValueError(f"{weights.hf_dir}: tensor {name} has shape {found}, config.json implies {shape}")


def import_hf(
    hf_dir: Union[str, Path],
    save: Union[str, Path],
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    make_vocab_size_divisible_by: int = 128,
    verify: bool = False,
    verify_tolerance: float = 1e-3,
) -> Path:
    """Convert ``hf_dir`` into ``{save}/release`` (+ tracker); returns the checkpoint directory.

    ``save`` must not exist yet: it is written under a temporary name and
    renamed when complete.
    """
    from megatron.core import dist_checkpointing

    from megatron_exact.model.builder import padded_vocab_size
    from megatron_exact.platform.distributed import initialize_model_parallel

    hf_dir, save = Path(hf_dir), Path(save)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"--hf-dir {hf_dir} is not a directory")
    arch = arch_from_hf_config(hf_dir)
    check_parallel_layout(arch, tensor_model_parallel_size, pipeline_model_parallel_size)
    if arch.sliding_window is not None:
        print(
            f"import-hf: note: {hf_dir / 'config.json'} puts a {arch.sliding_window}-token sliding window in effect "
            f"({arch.model_family.sliding_window_fields}); recorded in the checkpoint: the trainer trains it with "
            f"full attention only at --seq-length <= {arch.sliding_window} and refuses longer sequences",
            flush=True,
        )
    if save.exists():
        raise FileExistsError(f"--save {save} already exists; choose a new directory")
    padded_vocab = padded_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, tensor_model_parallel_size)
    weights = HFWeights(hf_dir)
    try:
        _check_tensors(weights, arch)
        dtype = weights.reader("model.embed_tokens.weight").dtype("model.embed_tokens.weight")
        if not dtype.is_floating_point:
            raise ValueError(f"{hf_dir}: model.embed_tokens.weight has non-float dtype {dtype}")

        initialize_model_parallel(1, 1, 1)
        model = build_model_for_checkpoint(arch, padded_vocab, dtype=dtype)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for mapping in tqdm(param_mappings(arch), desc=f"import {hf_dir.name}", unit="param", mininterval=2.0):
                megatron_tensor = hf_to_megatron(mapping, [weights.read(name) for name in mapping.hf], arch, padded_vocab)
                param = params.pop(mapping.megatron)
                if param.shape != megatron_tensor.shape:
                    raise AssertionError(f"{mapping.megatron}: built {tuple(param.shape)}, converted {tuple(megatron_tensor.shape)}")
                param.copy_(megatron_tensor)
                del megatron_tensor
        if params:
            raise AssertionError(f"Megatron parameters without an HF source: {sorted(params)}")
    finally:
        weights.close()

    generation_path = hf_dir / "generation_config.json"
    state = model_checkpoint_state(
        model,
        arch,
        padded_vocab,
        iteration=0,
        # Kept so that export-hf writes back the same token ids and extra fields.
        hf_config=read_json(hf_dir / "config.json"),
        hf_generation_config=read_json(generation_path) if generation_path.is_file() else None,
        conversion={
            "source": str(hf_dir.resolve()),
            "tensor_model_parallel_size": tensor_model_parallel_size,
            "pipeline_model_parallel_size": pipeline_model_parallel_size,
            "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        },
    )
    print(f"import-hf: saving torch_dist checkpoint ({dtype}, padded vocabulary {padded_vocab}) to {save}", flush=True)
    with atomic_directory(save) as tmp:
        release = checkpoint_dir(tmp, RELEASE)
        release.mkdir()
        dist_checkpointing.save(state, str(release))
        write_tracker_atomically(tmp, RELEASE)
    del state, model, params

    result = checkpoint_dir(save, RELEASE)
    if verify:
        from megatron_exact.convert.verify import verify_checkpoint_against_hf

        verify_checkpoint_against_hf(result, hf_dir, tolerance=verify_tolerance)
    return result
