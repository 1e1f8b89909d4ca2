"""The checkpoint contract shared by the trainer and the converter (neither owns it).

Layout: Megatron-LM's checkpoint directories.

``{save}/iter_{iteration:07d}/`` holds a trainer checkpoint, ``{save}/release/``
a converted HF import; ``{save}/latest_checkpointed_iteration.txt`` (the
tracker) names the newest complete one: an iteration number or ``release``.
The tracker is rewritten only after a checkpoint is complete, via a temporary
file and a rename, so a reader never sees a half-written checkpoint as the
latest. Directories are written under a temporary name in the same parent and
renamed into place for the same reason.

What a checkpoint holds besides the sharded tensors is one contract too:
:func:`model_checkpoint_state` builds the model part (weights, architecture,
padded vocabulary size, iteration, version); the trainer adds its optimizer,
scheduler, RNG and data-position entries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path
from typing import Optional, Union

from megatron_exact import atomic_io
from megatron_exact.errors import UserError
from megatron_exact.model.config import ModelArch, RopeScaling

CHECKPOINT_VERSION = 3.0
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
RELEASE = "release"

Iteration = Union[int, str]  # an iteration number or RELEASE


def checkpoint_dir(save: Union[str, Path], iteration: Iteration) -> Path:
    """The directory of one checkpoint: ``iter_0000100`` or ``release`` under ``save``."""
    if iteration == RELEASE:
        return Path(save) / RELEASE
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"checkpoint iteration must be a non-negative int or {RELEASE!r}, got {iteration!r}")
    return Path(save) / f"iter_{iteration:07d}"


def iteration_of(name: str) -> Optional[int]:
    """The iteration a checkpoint directory name stands for (the inverse of :func:`checkpoint_dir`
    for ``iter_*``), or None for any other name."""
    match = re.fullmatch(r"iter_(\d{7,})", name)
    return int(match[1]) if match else None


def tracker_path(save: Union[str, Path]) -> Path:
    return Path(save) / TRACKER_FILENAME


def read_tracker(load: Union[str, Path]) -> Iteration | None:
    """The iteration the tracker in ``load`` names (an int or ``release``); None without a tracker."""
    path = tracker_path(load)
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if text == RELEASE:
        return RELEASE
    try:
        iteration = int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number or {RELEASE!r}, found {text[:80]!r}; write the "
                         "iteration of a complete checkpoint (an iter_* directory) into it") from None
    if iteration < 0:
        raise ValueError(f"{path}: negative iteration {iteration}; write the iteration of a complete checkpoint "
                         "(an iter_* directory) into it")
    return iteration


def write_tracker_atomically(save: Union[str, Path], iteration: Iteration) -> None:
    """Point the tracker at ``iteration`` (call only once that checkpoint is complete)."""
    checkpoint_dir(save, iteration)  # validates the value
    save = Path(save)
    save.mkdir(parents=True, exist_ok=True)
    atomic_io.write_text(tracker_path(save), f"{iteration}\n")


def find_checkpoint(load: Union[str, Path]) -> Optional[tuple[Path, Iteration]]:
    """The complete checkpoint ``load`` holds (the tracker's choice, or ``load`` itself if it is
    a checkpoint directory), or None when there is none yet. The one answer to "is there a
    checkpoint here"."""
    load = Path(load)
    if read_tracker(load) is None and not (load / "metadata.json").is_file():
        return None
    return resolve_checkpoint(load)


def resolve_checkpoint(load: Union[str, Path], iteration: Iteration | None = None) -> tuple[Path, Iteration]:
    """The directory to load from ``load`` (the tracker's choice unless ``iteration`` is given).

    Also accepts ``load`` pointing straight at an ``iter_*``/``release`` directory.
    """
    load = Path(load)
    if iteration is None:
        iteration = read_tracker(load)
    if iteration is None:
        if (load / "metadata.json").is_file():  # a checkpoint directory itself
            name = load.name
            found: Iteration = RELEASE if name == RELEASE else iteration_of(name) or 0
            return load, found
        raise FileNotFoundError(f"{load}: no {TRACKER_FILENAME} and not a checkpoint directory")
    path = checkpoint_dir(load, iteration)
    if not path.is_dir():
        raise FileNotFoundError(f"{tracker_path(load)} names {iteration!r} but {path} does not exist; point the "
                                "tracker at a checkpoint that exists (or give its iter_* directory)")
    return path, iteration


@contextlib.contextmanager
def reading_checkpoint(directory: Union[str, Path]):
    """Around reads of checkpoint ``directory``: a file in it that cannot be read (a truncated or
    missing ``.distcp``, a damaged ``common.pt``) becomes a :class:`UserError` naming the directory,
    instead of the reader's EOFError, unpickling or zip error, or torch's CheckpointException
    (which derives from BaseException)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, UserError):
        raise
    except BaseException as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        cause = f"{type(err).__name__}: {lines[-1][:300]}" if lines else type(err).__name__
        raise UserError(f"{directory}: cannot read this checkpoint ({cause}); is a file in it damaged or "
                        "incomplete (e.g. a truncated .distcp): load another checkpoint (give its iter_* directory) "
                        "or re-create this one?") from err


def arch_to_dict(arch: ModelArch) -> dict:
    return dataclasses.asdict(arch)


def arch_from_dict(fields: dict) -> ModelArch:
    """The architecture a checkpoint records (records older than a field get its default; an unknown
    family is refused by name: ``ModelArch`` checks it)."""
    fields = dict(fields)
    # Checkpoints written before model families were described recorded the family's QKV bias.
    recorded_qkv_bias = fields.pop("add_qkv_bias", None)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    arch = ModelArch(**fields)
    if recorded_qkv_bias is not None and recorded_qkv_bias != arch.add_qkv_bias:
        raise ValueError(f"checkpoint records add_qkv_bias={recorded_qkv_bias} for family {arch.family!r}, "
                         f"whose QKV bias is {arch.add_qkv_bias}")
    return arch


# Fields a continued-pretraining run may change from the weights it starts from (context
# extension); any other difference means different weights' shapes or meaning.
CONTEXT_EXTENSION_FIELDS = ("rotary_base", "rope_scaling", "rotary_seq_len_interpolation_factor",
                            "max_position_embeddings")


def arch_differences(saved: dict, arch: ModelArch) -> dict:
    """``field -> (recorded value, arch's value)`` for every field where a checkpoint's
    ``model_arch`` record and ``arch`` differ (values as in the record: plain data)."""
    recorded, ours = arch_to_dict(arch_from_dict(saved)), arch_to_dict(arch)
    return {field: (recorded[field], ours[field]) for field in ours if recorded[field] != ours[field]}


def read_model_record(directory: Union[str, Path]) -> dict:
    """The common (non-tensor) state of a checkpoint directory: ``model_arch``, ``args``, ..."""
    from megatron.core import dist_checkpointing

    with reading_checkpoint(directory):
        return dist_checkpointing.load_common_state_dict(str(directory))


def model_checkpoint_state(model, arch: ModelArch, padded_vocab_size: int, iteration: int = 0, **extra) -> dict:
    """The model part of a checkpoint, ready for ``dist_checkpointing.save``.

    Every rank of a TP/PP layout passes its own stage; ``extra`` adds entries
    (the trainer's optimizer, scheduler, RNG state, ...).
    """
    return {
        "model": model.sharded_state_dict(),
        "model_arch": arch_to_dict(arch),
        "padded_vocab_size": padded_vocab_size,
        "iteration": iteration,
        "checkpoint_version": CHECKPOINT_VERSION,
        **extra,
    }
