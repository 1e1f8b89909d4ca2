"""``torch_dist`` checkpoint (any TP/PP it was saved at) -> HF directory transformers and vLLM load.

The checkpoint is loaded into one TP=1/PP=1 model in its stored dtype
(``dist_checkpointing`` reshards), then written as safetensors one tensor at a
time (peak memory: the model plus one tensor), sharded with an index above
``max_shard_size``. The padded vocabulary rows are dropped. ``config.json``
starts from the HF config recorded at import (token ids and the like) with
every architectural field taken from the checkpoint's ``model_arch``: RoPE as
trained (theta, llama3 scaling or linear interpolation, in ``rope_parameters``
and ``rope_scaling``; a combination HF cannot express is refused) and
``max_position_embeddings`` at least the trained ``--seq-length``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm import tqdm

from megatron_exact.convert.hf_mapping import hf_config_dict, megatron_to_hf, param_mappings
from megatron_exact.convert.megatron_checkpoint import (
    build_model_for_checkpoint,
    load_model_weights,
    read_checkpoint_header,
    stored_dtype,
)
from megatron_exact.convert.safetensors_stream import SafetensorsWriter
from megatron_exact.atomic_io import atomic_directory
from megatron_exact.checkpoint import resolve_checkpoint
from megatron_exact.data.tokenizers import (
    HF_TOKENIZER_FILES,
    TokenizerExportError,
    check_hf_tokenizer_ids,
    save_hf_tokenizer,
)
from megatron_exact.errors import UserError, read_json

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30
def parse_size(text: Union[str, int]) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes (HF's ``max_shard_size`` spelling)."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit):
            try:
                return int(float(upper[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(upper)
    except ValueError:
        raise ValueError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or a byte count") from None


def _copy_tokenizer(tokenizer_dir: Path, out: Path) -> list[str]:
    copied = [name for name in HF_TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not copied:
        raise FileNotFoundError(f"--tokenizer-dir {tokenizer_dir}: none of {', '.join(HF_TOKENIZER_FILES)} found")
    for name in copied:
        shutil.copy2(tokenizer_dir / name, out / name)
    return copied


def _tokenizer_step(step, *args):
    try:
        return step(*args)
    except TokenizerExportError as err:
        raise UserError(f"export-hf: {err}; pass --tokenizer-dir with the HF tokenizer files of the tokenizer "
                        "the run trained with") from None


def _write_recorded_tokenizer(record: dict, out: Optional[Path]) -> str:
    """HF tokenizer files for the checkpoint's tokenizer record into ``out`` (None: only check that
    they can be written, in a scratch directory)."""
    import tempfile

    if out is not None:
        return _tokenizer_step(save_hf_tokenizer, record, str(out))
    with tempfile.TemporaryDirectory(prefix="export-hf-tokenizer-") as scratch:
        return _tokenizer_step(save_hf_tokenizer, record, scratch)


def _generation_config(recorded: Optional[dict], config: dict) -> dict:
    if recorded:
        generation = dict(recorded)
        generation.pop("transformers_version", None)
        if "eos_token_id" in config:
            generation["eos_token_id"] = config["eos_token_id"]
        return generation
    generation = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            generation[key] = config[key]
    return generation


def _set_eos_to_eod(config: dict, eod: int) -> None:
    """``eos_token_id`` is the EOD id the training data used (a list of ids keeps its others)."""
    eos = config.get("eos_token_id")
    if eos == eod or (isinstance(eos, list) and eod in eos):
        return
    if eos is not None:
        print(f"export-hf: eos_token_id {eos} -> {eod}, the end-of-document id of the training data", flush=True)
    config["eos_token_id"] = eod


def _recorded_hf_source(common: dict) -> tuple[Optional[dict], Optional[Path]]:
    """The HF config and directory a checkpoint came from, as far as it records them.

    An imported checkpoint stores the config itself and its source directory; a
    trainer checkpoint records the ``--hf-config`` path among its args.
    """
    source = (common.get("conversion") or {}).get("source") or (common.get("args") or {}).get("hf_config")
    directory = None
    if source:
        path = Path(source)
        directory = path.parent if path.name == "config.json" else path
    config = common.get("hf_config")
    if config is None and directory is not None and (directory / "config.json").is_file():
        config = read_json(directory / "config.json")
    return config, directory


def export_hf(
    load: Union[str, Path],
    hf_dir_out: Union[str, Path],
    *,
    tokenizer_dir: Union[str, Path, None] = None,
    dtype: Optional[str] = None,
    max_shard_size: Union[str, int] = DEFAULT_MAX_SHARD_SIZE,
    verify: bool = False,
    verify_tolerance: float = 1e-3,
) -> Path:
    """Write the checkpoint the tracker in ``load`` names (or ``load`` itself) to ``hf_dir_out``.

    ``dtype``: ``bf16``/``fp32``/``fp16``; default the checkpoint's stored dtype.
    ``tokenizer_dir``: where to copy tokenizer files from; default the tokenizer
    the run trained with (recorded in a trainer checkpoint: its HF files copied,
    or generated for ByteTokenizer and SentencePiece), else the HF directory the
    checkpoint was imported from, if it holds tokenizer files. With a recorded
    tokenizer, ``eos_token_id`` is the EOD id of the training data.
    """
    from megatron_exact.platform.distributed import initialize_model_parallel

    out = Path(hf_dir_out)
    if out.exists():
        raise FileExistsError(f"--hf-dir-out {out} already exists; choose a new directory")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    shard_limit = parse_size(max_shard_size)
    ckpt_dir, iteration = resolve_checkpoint(load)
    arch, padded_vocab, common = read_checkpoint_header(ckpt_dir)
    trained_length = int((common.get("args") or {}).get("seq_length") or 0)
    if trained_length > arch.max_position_embeddings:  # records from before the arch said so itself
        arch = arch.replace(max_position_embeddings=trained_length)
    hf_config_dict(arch, torch.float32)  # refuses what a HF config cannot express before any work
    base_config, source_dir = _recorded_hf_source(common)
    # The tokenizer the run trained with (a trainer checkpoint records it); else, for an import,
    # the tokenizer files next to the HF model it came from.
    tokenizer_record = common.get("tokenizer")
    if tokenizer_dir is None and tokenizer_record is None and source_dir is not None:
        if any((source_dir / name).is_file() for name in HF_TOKENIZER_FILES):
            tokenizer_dir = source_dir
    if tokenizer_dir is None and tokenizer_record is not None:
        _write_recorded_tokenizer(tokenizer_record, None)  # fails now, before any work, if it cannot
    checkpoint_dtype = stored_dtype(ckpt_dir)
    out_dtype = DTYPES[dtype] if dtype else checkpoint_dtype

    initialize_model_parallel(1, 1, 1)
    print(f"export-hf: loading {ckpt_dir} (iteration {iteration}, {checkpoint_dtype})", flush=True)
    model = build_model_for_checkpoint(arch, padded_vocab, dtype=checkpoint_dtype)
    load_model_weights(model, ckpt_dir)
    params = {name: p.detach() for name, p in model.named_parameters()}

    # Plan: HF shapes from a dry run on meta tensors, then shards of whole mappings up to the size limit.
    mappings = param_mappings(arch)
    element = torch.empty((), dtype=out_dtype).element_size()
    shards: list[list] = [[]]
    shard_bytes = 0
    for mapping in mappings:
        meta = torch.empty(params[mapping.megatron].shape, device="meta")
        layout = [(name, tuple(t.shape), out_dtype) for name, t in zip(mapping.hf, megatron_to_hf(mapping, meta, arch))]
        nbytes = sum(torch.Size(shape).numel() * element for _, shape, _ in layout)
        if shards[-1] and shard_bytes + nbytes > shard_limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((mapping, layout))
        shard_bytes += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )

    with atomic_directory(out) as tmp, torch.no_grad():
        weight_map, total_size = {}, 0
        progress = tqdm(total=len(mappings), desc=f"export {out.name}", unit="param", mininterval=2.0)
        for filename, shard in zip(names, shards):
            writer = SafetensorsWriter(tmp / filename, [entry for _, layout in shard for entry in layout])
            for mapping, _ in shard:
                for name, tensor in zip(mapping.hf, megatron_to_hf(mapping, params[mapping.megatron], arch)):
                    writer.write(name, tensor.to(out_dtype))
                    weight_map[name] = filename
                progress.update()
            writer.close()
            total_size += writer.total_bytes
        progress.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = hf_config_dict(arch, out_dtype, base=base_config)
        if tokenizer_record is not None:
            _set_eos_to_eod(config, int(tokenizer_record["eod"]))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = _generation_config(common.get("hf_generation_config"), config)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            copied = _copy_tokenizer(Path(tokenizer_dir), tmp)
            print(f"export-hf: copied tokenizer files {', '.join(copied)} from {tokenizer_dir}", flush=True)
        elif tokenizer_record is not None:
            written = _write_recorded_tokenizer(tokenizer_record, tmp)
            _tokenizer_step(check_hf_tokenizer_ids, str(tmp), tokenizer_record)
            print(f"export-hf: tokenizer the run trained with: {written} (AutoTokenizer gives its ids)", flush=True)
        else:
            print("export-hf: no tokenizer copied (pass --tokenizer-dir); vLLM and generate need one", flush=True)
    del model, params
    print(f"export-hf: wrote {out} ({len(shards)} safetensors file(s), {total_size / 2**20:.1f} MiB, {out_dtype})", flush=True)

    if verify:
        from megatron_exact.convert.verify import verify_export

        verify_export(ckpt_dir, out, tolerance=verify_tolerance)
    return out
