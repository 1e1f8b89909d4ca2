"""One optimizer step of a tiny model (a preset) under several parallel layouts, for equivalence tests.

Driven by tests/parallel/test_layouts.py; also runnable by hand:

    python tests/parallel/layout_run.py reference --workdir /tmp/lay [--preset tiny-qwen3]
    python -m torch.distributed.run --nproc-per-node=2 tests/parallel/layout_run.py layouts --workdir /tmp/lay
    python -m torch.distributed.run --nproc-per-node=4 tests/parallel/layout_run.py layouts --workdir /tmp/lay4 --layouts cp4

``reference`` (one process, DP=1, 4 micro-batches) builds the model from a
seed, saves its weights as a torch_dist checkpoint and runs the step for every
objective. ``layouts`` (two processes) loads those same weights into each
layout (PP stages build different layers, so seeds would not give the same
model), wraps it in Megatron DDP with ``finalize_model_grads`` and runs the
same global batch through Megatron-Core's schedule with
:class:`megatron_exact.loss.ExactLoss`. Every run writes its loss statistics
as JSON and its finalized gradients as a torch_dist checkpoint (``main_grad``
in place of the weights, so Megatron's own resharding gathers TP/PP/CP shards);
at the end the gradients are all loaded unsharded and compared with the
reference (``comparison.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from megatron_exact.platform.distributed import destroy_model_parallel, initialize_model_parallel  # noqa: E402

PRESET = "tiny-qwen2"  # default: GQA, QKV bias, tied embeddings
SEQ_LENGTH = 256
GLOBAL_BATCH = 4  # samples of SEQ_LENGTH tokens, one per micro-batch at DP=1
TAU = 32  # tail buckets [32, 64), [64, 128), [128, 256)
SEED = 1234
DATA_SEED = 20240607

# name -> (tensor, pipeline, context parallel size, sequence parallelism); the rest of the ranks
# (2, or 4 for cp4: a torchrun of its own) is DP.
LAYOUTS = {
    "dp2": (1, 1, 1, False),
    "tp2": (2, 1, 1, False),
    "tp2sp": (2, 1, 1, True),
    "pp2": (1, 2, 1, False),
    "cp2": (1, 1, 2, False),
    "cp4": (1, 1, 4, False),
}


def objectives():
    from megatron_exact.loss import ExactConfig

    return {
        "exact": ExactConfig(weighting="exact", tau=TAU),
        "exact-weights": ExactConfig(weighting="exact", tau=TAU, normalization="weights"),
        # Weights per micro-batch: equal to the reference wherever micro-batch k holds the same samples (TP, PP, CP).
        "exact-microbatch": ExactConfig(weighting="exact", tau=TAU, scope="microbatch"),
        "uniform": ExactConfig(weighting="uniform", tau=TAU),
    }


def global_batch() -> list[dict]:
    """GLOBAL_BATCH samples, each packed from documents of random odd lengths (so CP/SP padding is exercised)."""
    from megatron_exact.model.packing import batch_from_documents

    generator = torch.Generator().manual_seed(DATA_SEED)
    samples = []
    for index in range(GLOBAL_BATCH):
        # Sample 0 is one long document so that the [128, 256) bucket is well filled; the others
        # are split into an odd number of odd-length documents (lengths sum to the odd SEQ_LENGTH + 1).
        num_docs = 1 if index == 0 else int(torch.randint(1, 3, (1,), generator=generator)) * 2 + 1
        lengths = []
        for _ in range(num_docs - 1):
            remaining = SEQ_LENGTH + 1 - sum(lengths) - 2 * (num_docs - len(lengths) - 1)
            lengths.append(int(torch.randint(0, max(remaining // 4, 1), (1,), generator=generator)) * 2 + 1)
        lengths.append(SEQ_LENGTH + 1 - sum(lengths))
        docs = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]
        samples.append(batch_from_documents(docs, SEQ_LENGTH))
    return samples


def build_model(preset: str, tp: int, pp: int, cp: int, sp: bool):
    from megatron_exact.model.builder import build_gpt_model, transformer_config
    from megatron_exact.model.config import get_preset

    arch = get_preset(preset)
    config = transformer_config(
        arch, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp, sequence_parallel=sp
    )
    return build_gpt_model(arch, config, seq_length=SEQ_LENGTH), config


def load_unsharded(model, directory: Path) -> dict:
    """A checkpoint's tensors, as this layout's full state dict (cloned: loading may reuse buffers)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(directory))["model"]
    return {key: value.detach().clone() for key, value in state.items() if isinstance(value, torch.Tensor) and "_extra_state" not in key}


def save_gradients(ddp_model, directory: Path) -> None:
    """Save ``main_grad`` through the model's sharded state dict, so the layout's sharding is undone on load."""
    from megatron.core import dist_checkpointing

    module = ddp_model.module
    weights = {param: param.data for param in module.parameters()}
    try:
        for param in weights:
            param.data = param.main_grad.view_as(param.data).to(param.dtype)
        dist_checkpointing.save({"model": module.sharded_state_dict()}, str(directory))
    finally:
        for param, data in weights.items():
            param.data = data


def run_step(name: str, layout: tuple, workdir: Path, preset: str, objective_names) -> None:
    """Every objective for one layout: loss statistics -> results/, finalized gradients -> grads/."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_exact.loss import ExactLoss
    from megatron_exact.model.packing import pack_batch

    tp, pp, cp, sp = layout
    initialize_model_parallel(tp, pp, cp, seed=SEED)
    model, config = build_model(preset, tp, pp, cp, sp)
    weights_dir = workdir / "weights"
    if name == "reference":
        if torch.distributed.get_rank() == 0:
            weights_dir.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(weights_dir))
    else:
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(weights_dir))
        model.load_state_dict(state["model"])
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False), model
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync

    # Megatron's sampler order: micro-batch k of DP rank r is global sample k * DP + r.
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    samples = global_batch()[dp_rank::dp_size]
    packed = [
        pack_batch(
            sample,
            context_parallel_size=cp,
            context_parallel_rank=parallel_state.get_context_parallel_rank(),
            tensor_model_parallel_size=tp,
            sequence_parallel=sp,
        )
        for sample in samples
    ]
    row_lengths = {pb.num_tokens for pb in packed}
    if pp > 1 and len(row_lengths) != 1:
        raise ValueError(f"pipeline p2p shapes need one packed row length, got {sorted(row_lengths)}")

    is_writer = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    )
    for objective, exact_config in objectives().items():
        if objective not in objective_names:
            continue
        started = time.perf_counter()
        ddp.zero_grad_buffer()
        loss = ExactLoss(exact_config, SEQ_LENGTH)
        loss.begin_step(packed)

        def forward_step(data_iterator, model):
            pb = next(data_iterator)
            output = model(pb.tokens, pb.position_ids, None, labels=pb.labels, packed_seq_params=pb.packed_seq_params)
            return output, functools.partial(loss.loss_func, pb)

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(packed),
            model=[ddp],
            num_microbatches=len(packed),
            seq_length=max(row_lengths),
            micro_batch_size=1,
            forward_only=False,
        )
        stats = loss.step_statistics()
        if loss.step_statistics() != stats:
            raise AssertionError(f"{name}: step_statistics changed when called again")
        grads_dir = workdir / "grads" / f"{name}-{objective}"
        if torch.distributed.get_rank() == 0:
            grads_dir.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        save_gradients(ddp, grads_dir)
        if is_writer:
            stats["seconds"] = time.perf_counter() - started
            results = workdir / "results"
            results.mkdir(parents=True, exist_ok=True)
            (results / f"{name}-{objective}.json").write_text(json.dumps(stats, indent=1))
            print(f"[{name}] {objective}: objective {stats['objective']:.7f} lm_loss {stats['lm_loss']:.7f}", flush=True)
    parallel_state.destroy_model_parallel()


def compare_gradients(workdir: Path, preset: str) -> None:
    """Load every run's gradients unsharded (TP=PP=CP=1) and write their relative differences to the reference."""
    initialize_model_parallel(1, 1, 1, seed=SEED)
    model, _ = build_model(preset, 1, 1, 1, False)
    grads_root = workdir / "grads"
    runs = sorted(path.name for path in grads_root.iterdir())
    references = {name.split("-", 1)[1]: load_unsharded(model, grads_root / name) for name in runs if name.startswith("reference-")}
    comparison = {}
    for run in runs:
        if run.startswith("reference-"):
            continue
        objective = run.split("-", 1)[1]
        grads, reference = load_unsharded(model, grads_root / run), references[objective]
        if grads.keys() != reference.keys():
            raise ValueError(f"{run}: parameters differ from the reference: {sorted(grads.keys() ^ reference.keys())}")
        worst, worst_key = 0.0, None
        for key, ref in reference.items():
            diff = float((grads[key].double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))
            if diff > worst:
                worst, worst_key = diff, key
        comparison[run] = {
            "max_relative_grad_diff": worst,
            "worst_parameter": worst_key,
            "grad_norm": float(torch.stack([g.double().norm() for g in grads.values()]).norm()),
            "parameters": sorted(reference),
        }
    if torch.distributed.get_rank() == 0:
        (workdir / "comparison.json").write_text(json.dumps(comparison, indent=1))
        for run, values in comparison.items():
            print(f"[compare] {run}: max relative grad diff {values['max_relative_grad_diff']:.2e}", flush=True)
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("reference", "layouts"))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--preset", default=PRESET)
    parser.add_argument("--objectives", nargs="*", default=list(objectives()), choices=list(objectives()))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.mode == "reference":
        run_step("reference", (1, 1, 1, False), args.workdir, args.preset, args.objectives)
    else:
        for name in args.layouts:
            run_step(name, LAYOUTS[name], args.workdir, args.preset, args.objectives)
        compare_gradients(args.workdir, args.preset)
    destroy_model_parallel()


if __name__ == "__main__":  # dist_checkpointing spawns a helper process that re-imports this file
    main()
