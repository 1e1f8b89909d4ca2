"""Megatron-LM's checkpoint directory layout, shared by the trainer and the converter.

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
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

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
        raise ValueError(f"{path}: expected an iteration number or {RELEASE!r}, found {text!r}") from None
    if iteration < 0:
        raise ValueError(f"{path}: negative iteration {iteration}")
    return iteration


def write_tracker_atomically(save: Union[str, Path], iteration: Iteration) -> None:
    """Point the tracker at ``iteration`` (call only once that checkpoint is complete)."""
    checkpoint_dir(save, iteration)  # validates the value
    save = Path(save)
    save.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=save, prefix=f".{TRACKER_FILENAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{iteration}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, tracker_path(save))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
            found: Iteration = RELEASE if name == RELEASE else int(name[5:]) if name.startswith("iter_") else 0
            return load, found
        raise FileNotFoundError(f"--load {load}: no {TRACKER_FILENAME} and not a checkpoint directory")
    path = checkpoint_dir(load, iteration)
    if not path.is_dir():
        raise FileNotFoundError(f"--load {load}: tracker names {iteration!r} but {path} does not exist")
    return path, iteration


@contextlib.contextmanager
def atomic_directory(final: Union[str, Path], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``final``; rename it to ``final`` on success.

    On an exception the temporary directory is removed and ``final`` is left as
    it was. With ``overwrite`` an existing ``final`` is replaced (it is moved
    aside first, then deleted once the new one is in place).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; remove it or choose another path")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    # mkdtemp makes the directory private (0700); give it the permissions a plain mkdir would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old.{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def arch_to_dict(arch: ModelArch) -> dict:
    return dataclasses.asdict(arch)


def arch_from_dict(fields: dict) -> ModelArch:
    fields = dict(fields)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return ModelArch(**fields)


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
