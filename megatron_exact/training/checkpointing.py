"""Trainer checkpoints in Megatron-Core's ``torch_dist`` format (Megatron-LM's layout).

One checkpoint is ``{save}/iter_{iteration:07d}/``, written by every rank
through ``dist_checkpointing.save`` into a temporary directory that rank 0
renames into place once all ranks are done; only then is the tracker
(``latest_checkpointed_iteration.txt``) rewritten. A run killed mid-save
leaves a hidden temporary directory and the tracker still naming the
previous complete checkpoint, which is what a resume loads. ``--most-recent-k``
prunes older complete checkpoints once the tracker names a newer one
(``remove_old_checkpoints``).

Contents: ``model`` (sharded), ``optimizer`` (sharded against the model, so
it reloads under another TP/PP/DP layout, and with ``--use-distributed-optimizer``
switched on or off: see ``_plan_optimizer_change``), ``opt_param_scheduler``,
``rng_state`` (per TP/PP rank; skipped when the layout changed),
``iteration``, ``data_position`` (consumed samples, and a digest of which samples they
were in which order), ``model_arch``,
``padded_vocab_size``, ``checkpoint_version``, ``args`` and ``tokenizer`` (the
run's tokenizer record, from which HF export writes tokenizer files); next to them the
probe logits of the model as trained (``probe_logits.safetensors``, see
``megatron_exact/checkpoint/probe.py``).
"""

from __future__ import annotations

import dataclasses
import os
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
    iteration_of,
    model_checkpoint_state,
    read_tracker,
    reading_checkpoint,
    write_tracker_atomically,
)
from megatron_exact.checkpoint.probe import PROBE_FILENAME, Probe, write_probe
from megatron_exact.errors import UserError
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
    schedule_changes: list = dataclasses.field(default_factory=list)
    """What differed between the checkpoint's schedule and this run's flags (see SCHEDULE_POLICIES)."""
    common: dict = dataclasses.field(default_factory=dict, repr=False)
    """The checkpoint's non-tensor state (data position, recorded arguments, ...)."""
    optimizer_change: Optional[str] = None
    """How the checkpoint's optimizer kind differs from this run's, when its state was carried over."""


# What sets each entry of the scheduler's state (Megatron-Core's state_dict keys, plus the WSD
# settings it does not save itself), in the trainer's flags; steps count samples.
SCHEDULE_SETTINGS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters x --global-batch-size (warm-up samples)",
    "lr_decay_steps": "--lr-decay-iters (default --train-iters) x --global-batch-size (decay samples)",
    "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay",
    "end_wd": "--weight-decay",
    "wd_incr_steps": "--train-iters x --global-batch-size (weight-decay schedule samples)",
    "wd_incr_style": "weight-decay increment style",
    "wsd_decay_steps": "--lr-wsd-decay-iters x --global-batch-size (WSD anneal samples)",
    "lr_wsd_decay_style": "--lr-wsd-decay-style",
}
EXTRA_SCHEDULE_STATE = ("wsd_decay_steps", "lr_wsd_decay_style")

# On resume, when this run's schedule flags differ from the checkpoint's (Megatron-LM's choice):
#   "refuse"     neither flag: stop with a message naming the settings and both flags;
#   "override"   --override-opt_param-scheduler: this run's settings, at the checkpoint's step count;
#   "checkpoint" --use-checkpoint-opt_param-scheduler: the checkpoint's settings.
SCHEDULE_POLICIES = ("refuse", "override", "checkpoint")


class ScheduleMismatchError(UserError, ValueError):
    """The run's learning-rate schedule differs from the checkpoint's and no policy was chosen."""


def scheduler_state(scheduler) -> dict:
    """What a checkpoint keeps of the scheduler: Megatron-Core's state, plus the WSD settings."""
    state = scheduler.state_dict()
    state.update({key: getattr(scheduler, key) for key in EXTRA_SCHEDULE_STATE})
    return state


def schedule_differences(saved: dict, scheduler) -> list[str]:
    """``"setting: checkpoint X, this run Y"`` for every schedule setting that differs."""
    differences = {}
    for key, setting in SCHEDULE_SETTINGS.items():
        if key in saved and saved[key] != getattr(scheduler, key):
            differences.setdefault(setting, f"{setting}: checkpoint {saved[key]}, this run {getattr(scheduler, key)}")
    return list(differences.values())


def check_schedule(directory: Path, saved: dict, scheduler, policy: str) -> list[str]:
    """The differences between the ``saved`` schedule and ``scheduler``'s; under the "refuse"
    policy (SCHEDULE_POLICIES) any difference is an error naming the settings and both flags."""
    if policy not in SCHEDULE_POLICIES:
        raise ValueError(f"schedule policy must be one of {SCHEDULE_POLICIES}, got {policy!r}")
    differences = schedule_differences(saved, scheduler)
    if differences and policy == "refuse":
        raise ScheduleMismatchError(
            f"--load {directory}: this run's learning-rate schedule differs from the checkpoint's ("
            + "; ".join(differences) + "). Give --override-opt_param-scheduler to follow this run's flags from the "
            "checkpoint's step on, or --use-checkpoint-opt_param-scheduler to keep the checkpoint's schedule"
        )
    return differences


def load_scheduler(directory: Path, saved: dict, scheduler, policy: str) -> list[str]:
    """Restore the scheduler from ``saved`` under ``policy`` (SCHEDULE_POLICIES); returns the differences."""
    differences = check_schedule(directory, saved, scheduler, policy)
    # Megatron-Core's own reconciliation (it asserts on a difference when neither flag is set).
    scheduler.override_opt_param_scheduler = policy == "override"
    scheduler.use_checkpoint_opt_param_scheduler = policy == "checkpoint"
    scheduler.load_state_dict(saved)
    if policy == "checkpoint":
        for key in EXTRA_SCHEDULE_STATE:
            if key in saved:
                setattr(scheduler, key, saved[key])
        scheduler.step(increment=0)  # the learning rate of the restored settings
    return differences


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
    train_sample_order_sha1: Optional[str] = None,
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
            opt_param_scheduler=scheduler_state(scheduler),
            rng_state=_rng_state_object(),
            data_position={"consumed_train_samples": consumed_train_samples,
                           "train_sample_order_sha1": train_sample_order_sha1},
            args=args_record,
            tokenizer=tokenizer,
        )
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=OPTIMIZER_METADATA)
        try:
            dist_checkpointing.save(state, str(tmp), content_metadata=OPTIMIZER_METADATA)
            if probe is not None:
                write_probe(tmp / PROBE_FILENAME, probe)
        except BaseException as err:  # torch's CheckpointException derives from BaseException
            full = None if isinstance(err, (KeyboardInterrupt, SystemExit)) else _disk_full_error(err, tmp, state, final)
            if full is None:
                raise
            raise full from err
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


def remove_old_checkpoints(save: str, keep: int) -> list[Path]:
    """Keep the ``keep`` (>= 1) most recent complete checkpoints in ``save`` (``--most-recent-k``);
    returns what was removed. From one process (rank 0), once the tracker names the newest.

    Only complete checkpoints count (``iter_*`` directories are renamed into place once complete;
    what interrupted saves leave has a temporary name and is never counted or touched here), and
    only those up to the tracker's iteration: the one the tracker names (what a resume loads) is
    always the most recent. Checkpoints past it (from a trajectory abandoned by resuming from an
    earlier one) are left alone. Each doomed directory is first renamed to a temporary name (one
    atomic step), then deleted: an interrupted deletion leaves no half-deleted ``iter_*``
    directory, only a temporary the next start removes.
    """
    latest = read_tracker(save)
    if not isinstance(latest, int):
        return []
    complete = []
    for entry in Path(save).iterdir():
        iteration = iteration_of(entry.name)
        if iteration is not None and entry.is_dir() and not entry.is_symlink() and iteration <= latest:
            complete.append((iteration, entry))
    complete.sort(reverse=True)
    if not complete or complete[0][0] != latest:
        return []  # the tracker's checkpoint is not here as a directory: decide nothing
    removed = []
    for _, directory in complete[keep:]:
        doomed = atomic_io.temporary_path(directory, ".old")
        os.replace(directory, doomed)
        atomic_io.remove_temporaries([doomed])
        removed.append(directory)
    return removed


def _local_bytes(state) -> int:
    """Bytes of the tensors this rank writes (about what its part of the checkpoint needs)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    total = 0
    for value in nested_values(state):
        data = value.data if isinstance(value, ShardedTensor) else value
        if isinstance(data, torch.Tensor):
            total += data.numel() * data.element_size()
    return total


def _disk_full_error(error: BaseException, directory: Path, state, final: Path) -> Optional[UserError]:
    """A message naming the checkpoint, the space needed and free, when ``error`` came from a full disk, else None.

    torch's checkpoint writer reports a full disk from its worker as "unexpected pos 704 vs 598"
    (a short write inside the zip container), so besides an ENOSPC in the exception chain the
    free space left where the checkpoint was being written decides.
    """
    import errno
    import os

    cause = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            break
        cause = cause.__cause__ or cause.__context__
    needed = _local_bytes(state)
    try:
        stats = os.statvfs(directory)
        free = stats.f_bavail * stats.f_frsize
    except OSError:
        free = None
    if cause is None and (free is None or free >= max(needed, 64 * 2**20)):
        return None
    detail = f"this rank's part needs about {needed / 2**20:.1f} MiB"
    if free is not None:
        detail += f", {free / 2**20:.1f} MiB free there"
    return UserError(f"no space left on the device (ENOSPC) while saving checkpoint {final} ({detail}); the "
                     "previous checkpoint stays the latest: free space or --save elsewhere, then resume with --load")


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


# The optimizer kinds a checkpoint can hold, by what they keep in its common (non-tensor)
# state, and where each keeps the fp32 main copy of a weight (a prefix of the weight's key;
# the fp32 plain optimizer steps the weights themselves). The moments are
# "optimizer.state.exp_avg.<weight>" (and exp_avg_sq) in all three, which is what lets a
# checkpoint move between them (the distributed optimizer's state is saved fully_reshardable).
DISTRIBUTED, PLAIN_FP32, PLAIN_BF16 = "distributed", "plain fp32", "plain bf16"
MAIN_PARAM_PREFIX = {DISTRIBUTED: "optimizer.state.param.", PLAIN_BF16: "optimizer.state.fp32_param.", PLAIN_FP32: ""}
OPTIMIZER_FLAG = {DISTRIBUTED: "with --use-distributed-optimizer", PLAIN_FP32: "without --use-distributed-optimizer",
                  PLAIN_BF16: "without --use-distributed-optimizer"}


def _saved_optimizer_kind(saved: dict) -> str:
    """The kind from the checkpoint's common optimizer state: the plain bf16 optimizer nests torch's
    state under "optimizer" (its fp32 copies are all tensors, so none of them is common state)."""
    if "param_state_sharding_type" in saved:
        return DISTRIBUTED
    return PLAIN_BF16 if "optimizer" in saved else PLAIN_FP32


def _run_optimizer_kind(optimizer) -> str:
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    inner = _single_inner_optimizer(optimizer)
    if isinstance(inner, DistributedOptimizer):
        return DISTRIBUTED
    return PLAIN_BF16 if isinstance(inner, Float16OptimizerWithFloat16Params) else PLAIN_FP32


def _single_inner_optimizer(optimizer):
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    return inners[0] if len(inners) == 1 else None


def _saved_step(saved: dict, kind: str):
    """Adam's step count as the checkpoint's optimizer kind keeps it (None before the first step)."""
    if kind == DISTRIBUTED:
        steps = [group.get("step") for group in saved["optimizer"]["param_groups"]]
        return next((step for step in steps if step is not None), None)
    state = saved["optimizer"]["state"] if kind == PLAIN_BF16 else saved["state"]
    return state.get("common_step")


@dataclasses.dataclass(frozen=True)
class _ModelWeight:
    """Stands in a request for a main parameter the checkpoint keeps as the weight itself (the
    fp32 plain optimizer's): read once, as the model's, not twice under one key."""

    signature: tuple


def _weight_signature(sharded) -> tuple:
    """What tells one weight's entry from another's: the key is shared by all layers (the layer is
    an offset), and a factory (e.g. the gated MLP's) carries its layer in its build function."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    if isinstance(sharded, ShardedTensor):
        return sharded.key, tuple(sharded.global_offset)
    if isinstance(sharded, ShardedTensorFactory):
        return sharded.key, id(sharded.build_fn)
    assert isinstance(sharded, ShardedObject), type(sharded)
    return sharded.key, tuple(sharded.global_offset)


def _retarget_main_params(request: dict, run_kind: str, saved_kind: str) -> None:
    """Point this run's main-parameter entries of ``request`` at where the saved kind keeps them."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    old, new = MAIN_PARAM_PREFIX[run_kind], MAIN_PARAM_PREFIX[saved_kind]

    def retarget(value):
        if old and isinstance(value, ShardedBase) and value.key.startswith(old):
            weight = dataclasses.replace(value, key=value.key[len(old):])
            return dataclasses.replace(weight, key=new + weight.key) if new else _ModelWeight(_weight_signature(weight))
        return value

    dict_list_map_inplace(retarget, request)


def _loaded_weights(request, loaded, into: dict) -> dict:
    """``{weight signature: tensor read}`` of the sharded entries of ``request``, from the load result ``loaded``."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    if isinstance(request, ShardedBase):
        into[_weight_signature(request)] = loaded
    elif isinstance(request, dict):
        for key, value in request.items():
            _loaded_weights(value, loaded[key], into)
    elif isinstance(request, list):
        for value, item in zip(request, loaded):
            _loaded_weights(value, item, into)
    return into


def _state_in_run_layout(request, loaded, weights: dict):
    """This run's optimizer state dict: the structure and non-tensor values of this run's own
    request (hyper-parameters, parameter ids), the tensors read from the checkpoint (``weights``:
    the model's, by signature, for the main parameters that are the weights themselves)."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    if isinstance(request, ShardedBase):
        return loaded
    if isinstance(request, _ModelWeight):
        return weights[request.signature]
    if isinstance(request, LocalNonpersistentObject):
        return request.unwrap()
    if isinstance(request, dict):
        return {key: _state_in_run_layout(value, loaded.get(key) if isinstance(loaded, dict) else None, weights)
                for key, value in request.items()}
    if isinstance(request, list):
        loaded = loaded if isinstance(loaded, list) else [None] * len(request)
        return [_state_in_run_layout(value, item, weights) for value, item in zip(request, loaded)]
    return request


def _set_step(state: dict, kind: str, step) -> None:
    if step is None:
        return
    if kind == DISTRIBUTED:
        for group in state["optimizer"]["param_groups"]:
            group["step"] = float(step)
    else:
        target = state["optimizer"]["state"] if kind == PLAIN_BF16 else state["state"]
        target["common_step"] = torch.tensor(float(step))


class OptimizerLayoutError(UserError, ValueError):
    """The checkpoint's optimizer state cannot be carried into this run's optimizer."""


def _plan_optimizer_change(directory: Path, common: dict, optimizer, request: dict) -> Optional[tuple[str, str]]:
    """``(saved kind, this run's kind)`` when they differ, with ``request`` (this run's optimizer
    request) retargeted at the checkpoint's main parameters; None when they are the same.
    Refuses, naming the flags, what cannot be carried over."""
    saved = common.get("optimizer")
    if not isinstance(saved, dict) or "optimizer" not in saved and "state" not in saved:
        return None  # none saved, or a chain of several optimizers: each loads its own part as saved
    if _single_inner_optimizer(optimizer) is None:
        return None
    saved_kind, run_kind = _saved_optimizer_kind(saved), _run_optimizer_kind(optimizer)
    if saved_kind == run_kind:
        return None
    # The fp32 main weights move between the kinds only at the same precision: the fp32 plain
    # optimizer keeps none (a bf16 run would step bf16-rounded weights), and an fp32 run from a
    # bf16 checkpoint would drop them for the bf16 weights.
    run_bf16 = bool(_single_inner_optimizer(optimizer).config.bf16)
    saved_bf16 = {PLAIN_BF16: True, PLAIN_FP32: False}.get(saved_kind, bool((common.get("args") or {}).get("bf16")))
    if saved_bf16 != run_bf16:
        written, now = ("with", "without") if saved_bf16 else ("without", "with")
        raise OptimizerLayoutError(
            f"--load {directory}: the optimizer state was written {written} --bf16 and this run is {now} it: "
            f"the fp32 main weights Adam steps are not in the checkpoint in the form this run keeps them. Resume "
            f"{written} --bf16, or give --no-load-optim to start a fresh optimizer from these weights")
    _retarget_main_params(request, run_kind, saved_kind)
    return saved_kind, run_kind


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
    schedule_policy: str = "refuse",
) -> Optional[LoadedState]:
    """Restore the newest complete checkpoint in ``load`` (None when there is none).

    ``finetune`` (and any ``release`` checkpoint, i.e. a converted HF import)
    loads the model weights only and starts at iteration 0. ``schedule_policy``: what to do
    when the scheduler settings differ from the checkpoint's (SCHEDULE_POLICIES).
    """
    found = find_checkpoint(load) if load else None
    if found is None:
        return None
    directory, iteration = found
    with reading_checkpoint(directory):
        common = dist_checkpointing.load_common_state_dict(str(directory))
    weights_only = finetune or iteration == RELEASE
    arch_changes = []
    if common.get("model_arch") is not None:
        arch_changes = check_checkpoint_arch(load, common["model_arch"], arch, weights_only)
    _check_padded_vocab(directory, common, padded_vocab_size)
    # Build the request with the metadata the checkpoint was saved with (Megatron-LM's way);
    # checkpoints from before it was recorded used OPTIMIZER_METADATA.
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or OPTIMIZER_METADATA
    if not weights_only and load_optimizer:  # refuse before any tensor is read
        check_schedule(directory, common["opt_param_scheduler"], scheduler, schedule_policy)
    model_state = model.sharded_state_dict()
    request = {"model": model_state}
    optimizer_change = None
    if not weights_only:
        if load_optimizer:
            _allocate_optimizer_state(optimizer)
            request["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=metadata)
            optimizer_change = _plan_optimizer_change(directory, common, optimizer, request["optimizer"])
        saved_layout = (common.get("args") or {}).get("layout", {})
        this_layout = {"tp": parallel_state.get_tensor_model_parallel_world_size(),
                       "pp": parallel_state.get_pipeline_model_parallel_world_size()}
        load_rng = load_rng and all(saved_layout.get(k) == v for k, v in this_layout.items())
        if load_rng:
            request["rng_state"] = _rng_state_object()
    with reading_checkpoint(directory):
        loaded = dist_checkpointing.load(request, str(directory))
    model.load_state_dict(loaded["model"])
    if weights_only:
        return LoadedState(iteration=0, consumed_train_samples=0, directory=directory, arch_changes=arch_changes,
                           common=common)
    # What was asked for, not what came back: the result also holds the checkpoint's common
    # (non-tensor) state, which has an "optimizer" entry whether or not it was requested.
    schedule_changes = []
    if "optimizer" in request:
        optimizer_state = loaded["optimizer"]
        if optimizer_change is not None:
            saved_kind, run_kind = optimizer_change
            weights = _loaded_weights(model_state, loaded["model"], {})
            optimizer_state = _state_in_run_layout(request["optimizer"], loaded["optimizer"], weights)
            _set_step(optimizer_state, run_kind, _saved_step(common["optimizer"], saved_kind))
        _load_optimizer_state(optimizer, optimizer_state)
        schedule_changes = load_scheduler(directory, common["opt_param_scheduler"], scheduler, schedule_policy)
    if "rng_state" in request:
        _restore_rng_state(loaded["rng_state"])
    return LoadedState(
        optimizer_change=(f"written {OPTIMIZER_FLAG[optimizer_change[0]]} ({optimizer_change[0]} optimizer), "
                          f"resumed {OPTIMIZER_FLAG[optimizer_change[1]]} ({optimizer_change[1]} optimizer)"
                          if optimizer_change else None),
        iteration=int(common["iteration"]),
        consumed_train_samples=int(common["data_position"]["consumed_train_samples"]),
        directory=directory,
        arch_changes=arch_changes,
        schedule_changes=schedule_changes,
        common=common,
    )
