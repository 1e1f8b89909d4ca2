"""Trainer checkpoints in Megatron-Core's ``torch_dist`` format (Megatron-LM's layout).

One checkpoint is ``{save}/iter_{iteration:07d}/``, written by every rank
through ``dist_checkpointing.save`` into a temporary directory that rank 0
renames into place once all ranks are done; only then is the tracker
(``latest_checkpointed_iteration.txt``) rewritten. A run killed mid-save
leaves a hidden temporary directory and the tracker still naming the
previous complete checkpoint, which is what a resume loads.

Contents: ``model`` (sharded), ``optimizer`` (sharded against the model, so
it reloads under another TP/PP layout), ``opt_param_scheduler``,
``rng_state`` (per TP/PP rank; skipped when the layout changed),
``iteration``, ``data_position`` (consumed samples), ``model_arch``,
``padded_vocab_size``, ``checkpoint_version``, ``args`` and ``tokenizer`` (the
run's tokenizer record, from which HF export writes tokenizer files); next to them the
probe logits of the model as trained (``probe_logits.safetensors``, see
``megatron_exact/checkpoint/probe.py``).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_exact import atomic_io
from megatron_exact.atomic_io import atomic_directory
from megatron_exact.checkpoint import (
    RELEASE,
    checkpoint_dir,
    find_checkpoint,
    model_checkpoint_state,
    write_tracker_atomically,
)
from megatron_exact.checkpoint.probe import PROBE_FILENAME, Probe, write_probe
from megatron_exact.model.config import ModelArch
from megatron_exact.training.arguments import check_checkpoint_arch

# Megatron-LM's sharded-state-dict "content metadata", stored in the checkpoint and read
# back on load. The distributed optimizer's state is saved in a layout-independent form
# (gathered per parameter), so a checkpoint reloads under other TP/PP/DP sizes;
# Megatron-Core's former default ("fully_sharded_model_space") can no longer be written.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


@dataclasses.dataclass
class LoadedState:
    iteration: int
    consumed_train_samples: int
    directory: Path
    arch_changes: list  # context-extension settings changed from the checkpoint's (weights-only loads)


def _rng_state_object() -> ShardedObject:
    """This rank's RNG states, one object per (PP, TP) rank; DP x CP replicas share them."""
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state",
        state,
        (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _restore_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rank0() -> bool:
    return torch.distributed.get_rank() == 0


def save_checkpoint(
    save: str,
    iteration: int,
    model,
    optimizer,
    scheduler,
    *,
    arch: ModelArch,
    padded_vocab_size: int,
    consumed_train_samples: int,
    args_record: dict,
    probe: Optional[Probe] = None,
    tokenizer: Optional[dict] = None,
) -> Path:
    """Write ``{save}/iter_{iteration:07d}`` from every rank (collective), then point the tracker at it.

    ``probe``: the probe logits, from the one rank that has them (``checkpoint/probe.py``);
    ``tokenizer``: the tokenizer record of the run (``data/tokenizers.tokenizer_description``).
    """
    final = checkpoint_dir(save, iteration)
    holder = [None]
    if _rank0():
        context = atomic_directory(final, overwrite=True)
        holder[0] = str(context.__enter__())
    torch.distributed.broadcast_object_list(holder, src=0)
    tmp = Path(holder[0])
    try:
        state = model_checkpoint_state(
            model, arch, padded_vocab_size, iteration,
            opt_param_scheduler=scheduler.state_dict(),
            rng_state=_rng_state_object(),
            data_position={"consumed_train_samples": consumed_train_samples},
            args=args_record,
            tokenizer=tokenizer,
        )
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=OPTIMIZER_METADATA)
        dist_checkpointing.save(state, str(tmp), content_metadata=OPTIMIZER_METADATA)
        if probe is not None:
            write_probe(tmp / PROBE_FILENAME, probe)
        torch.distributed.barrier()
    except BaseException as err:
        if _rank0():
            context.__exit__(type(err), err, err.__traceback__)
        raise
    if _rank0():
        context.__exit__(None, None, None)  # renames the temporary directory to iter_XXXXXXX
        write_tracker_atomically(save, iteration)
    torch.distributed.barrier()
    return final


def remove_stale_temporaries(save: str) -> list[Path]:
    """Delete what interrupted saves left behind (temporary ``iter_*`` directories); rank 0 only.

    At start-up every such temporary is stale, whoever wrote it: a job owns its
    ``--save`` directory, and its previous incarnation is gone.
    """
    if not _rank0():
        return []
    return atomic_io.remove_temporaries(atomic_io.temporaries(save, "iter_*"))


def _check_padded_vocab(directory: Path, common: dict, padded_vocab_size: int) -> None:
    saved_padded = common.get("padded_vocab_size")
    if saved_padded is not None and saved_padded != padded_vocab_size:
        raise ValueError(
            f"--load {directory}: checkpoint embedding has {saved_padded} rows (padded vocabulary) but this run "
            f"pads to {padded_vocab_size}; choose --make-vocab-size-divisible-by so that the padded size is "
            "the same under both tensor-parallel sizes"
        )


# Megatron-Core 0.16.1 writes DistributedOptimizer's checkpoint code for Transformer Engine's or
# Apex's FusedAdam, which keep Adam's step count in the param groups. Without either (on CPU) the
# inner optimizer is torch.optim.Adam, which keeps a 0-dim "step" tensor per parameter, created at
# its first step. The two helpers below fill the three gaps on that path; with FusedAdam they
# step aside and Megatron-Core's code runs unchanged.


def _torch_adam_distributed_optimizers(optimizer) -> list:
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [inner for inner in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(inner, DistributedOptimizer)]


def _allocate_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer the state a checkpoint is loaded into.

    ``DistributedOptimizer.state_dict()`` (called by ``sharded_state_dict(is_loading=True)``)
    reads torch Adam's per-parameter ``step``, which does not exist before the first step.
    Megatron-Core's own remedy (used for its ``fsdp_dtensor`` format) is one step on zero
    gradients; everything it touches (weights, moments, step) is overwritten by the load.
    """
    for inner in _torch_adam_distributed_optimizers(optimizer):
        if not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, for a distributed optimizer over torch Adam too.

    There ``DistributedOptimizer.load_state_dict`` first puts one shared step tensor into
    every parameter's state (torch then increments it once per parameter per step, which
    corrupts Adam's bias correction), then copies the parameter state with every key of
    the optimizer state as the destination, "step" included, which the checkpoint's
    per-parameter state does not carry (KeyError 'step'). So the parameter state is loaded
    with the steps set aside, and every parameter gets its own copy of the step back.
    """
    inners = _torch_adam_distributed_optimizers(optimizer)
    if not inners:
        optimizer.load_state_dict(state)
        return
    if len(inners) != len(getattr(optimizer, "chained_optimizers", [optimizer])):
        raise NotImplementedError("a chain mixing distributed and other optimizers is not supported here")
    states = [state] if len(inners) == 1 else [state[key] for key in sorted(state)]
    for inner, inner_state in zip(inners, states):
        param_state = inner_state.pop("param_state")
        sharding_type = inner_state.pop("param_state_sharding_type")
        if sharding_type != "fully_reshardable":
            raise ValueError(f"distributed optimizer state saved as {sharding_type!r}: this trainer loads only "
                             f"'fully_reshardable' (what it saves)")
        inner.load_state_dict(inner_state)  # param groups (hyper-parameters, step), grad scaler
        steps = {param: param_state_dict.pop("step") for param, param_state_dict in inner.optimizer.state.items()}
        inner.load_parameter_state_from_fully_reshardable(param_state)  # main weights, moments
        for param, step in steps.items():
            inner.optimizer.state[param]["step"] = step.clone()


def load_checkpoint(
    load: str,
    model,
    optimizer,
    scheduler,
    *,
    arch: ModelArch,
    padded_vocab_size: int,
    finetune: bool = False,
    load_optimizer: bool = True,
    load_rng: bool = True,
) -> Optional[LoadedState]:
    """Restore the newest complete checkpoint in ``load`` (None when there is none).

    ``finetune`` (and any ``release`` checkpoint, i.e. a converted HF import)
    loads the model weights only and starts at iteration 0.
    """
    found = find_checkpoint(load) if load else None
    if found is None:
        return None
    directory, iteration = found
    common = dist_checkpointing.load_common_state_dict(str(directory))
    weights_only = finetune or iteration == RELEASE
    arch_changes = []
    if common.get("model_arch") is not None:
        arch_changes = check_checkpoint_arch(load, common["model_arch"], arch, weights_only)
    _check_padded_vocab(directory, common, padded_vocab_size)
    # Build the request with the metadata the checkpoint was saved with (Megatron-LM's way);
    # checkpoints from before it was recorded used OPTIMIZER_METADATA.
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or OPTIMIZER_METADATA
    model_state = model.sharded_state_dict()
    request = {"model": model_state}
    if not weights_only:
        if load_optimizer:
            _allocate_optimizer_state(optimizer)
            request["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=metadata)
        saved_layout = (common.get("args") or {}).get("layout", {})
        this_layout = {"tp": parallel_state.get_tensor_model_parallel_world_size(),
                       "pp": parallel_state.get_pipeline_model_parallel_world_size()}
        load_rng = load_rng and all(saved_layout.get(k) == v for k, v in this_layout.items())
        if load_rng:
            request["rng_state"] = _rng_state_object()
    loaded = dist_checkpointing.load(request, str(directory))
    model.load_state_dict(loaded["model"])
    if weights_only:
        return LoadedState(iteration=0, consumed_train_samples=0, directory=directory, arch_changes=arch_changes)
    # What was asked for, not what came back: the result also holds the checkpoint's common
    # (non-tensor) state, which has an "optimizer" entry whether or not it was requested.
    if "optimizer" in request:
        _load_optimizer_state(optimizer, loaded["optimizer"])
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if "rng_state" in request:
        _restore_rng_state(loaded["rng_state"])
    return LoadedState(
        iteration=int(common["iteration"]),
        consumed_train_samples=int(common["data_position"]["consumed_train_samples"]),
        directory=directory,
        arch_changes=arch_changes,
    )
