"""Converted checkpoints at TP=2 and PP=2 (real two-process gloo jobs), then exported again.

Each job loads every imported TP=1 checkpoint at the new layout, computes the
logits of packed random documents (TP: vocab-parallel logits gathered; PP: the
first stage's hidden states sent to the second) and compares them with
transformers' logits, then saves a checkpoint at that layout, as the trainer
would. Exporting that checkpoint in one process must give back the original
HF weights bit for bit. This file is its own worker:
``python -m torch.distributed.run --nproc-per-node=2 tests/convert/test_distributed.py --worker SPEC``.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the worker runs as a script
    sys.path.insert(0, str(REPO))

from tests.launch import run_checked, torchrun_command  # noqa: E402

pytestmark = pytest.mark.slow  # multi-process runs

TOL = 1e-4
DOCUMENT_LENGTHS = [13, 1, 40, 7]


LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}  # (TP, PP); one launch runs both, to pay the start-up once


def test_load_at_tp2_and_pp2_then_export_bit_exact(hf_models, imported, tmp_path):
    from safetensors.torch import load_file

    from megatron_exact.convert.exporter import export_hf
    from megatron_exact.convert.verify import hf_logits, load_hf_model, random_documents

    models = {}
    for name, checkpoint in imported.items():
        hf_model = load_hf_model(hf_models[name])
        documents = random_documents(hf_model.config.vocab_size, DOCUMENT_LENGTHS, seed=3)
        reference = tmp_path / f"{name}_reference.pt"
        torch.save({"documents": documents, "logits": hf_logits(hf_model, documents)}, reference)
        models[name] = {"checkpoint": str(checkpoint / "release"), "reference": str(reference)}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"layouts": LAYOUTS, "models": models, "out": str(tmp_path)}))

    run_checked(torchrun_command(__file__, "--worker", spec), timeout=400)

    for layout in LAYOUTS:
        diffs = json.loads((tmp_path / f"logit_diffs_{layout}.json").read_text())
        assert sorted(diffs) == sorted(models)
        for name in models:
            assert diffs[name] <= TOL, (layout, name, diffs[name])
            out = export_hf(tmp_path / f"{name}_{layout}", tmp_path / f"{name}_{layout}_hf")
            original = {k: v for p in hf_models[name].glob("*.safetensors") for k, v in load_file(str(p)).items()}
            exported = load_file(str(out / "model.safetensors"))
            assert sorted(exported) == sorted(original)
            for key, tensor in original.items():
                assert torch.equal(exported[key], tensor), (layout, name, key)


def _worker(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    for layout, (tp, pp) in spec["layouts"].items():
        _run_layout(layout, tp, pp, spec)


def _run_layout(layout, tp, pp, spec):
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_exact.convert.megatron_checkpoint import (
        build_model_for_checkpoint,
        load_model_weights,
        read_checkpoint_header,
    )
    from megatron_exact.convert.verify import megatron_logits
    from megatron_exact.model.packing import batch_from_documents, pack_batch
    from megatron_exact.platform.distributed import initialize_model_parallel
    from megatron_exact.checkpoint import checkpoint_dir, model_checkpoint_state, write_tracker_atomically

    initialize_model_parallel(tp, pp, 1)
    rank = torch.distributed.get_rank()
    diffs = {}
    for name, entry in spec["models"].items():
        arch, padded_vocab, _ = read_checkpoint_header(entry["checkpoint"])
        reference = torch.load(entry["reference"])
        documents = reference["documents"]
        model = build_model_for_checkpoint(arch, padded_vocab, seq_length=sum(map(len, documents))).eval()
        load_model_weights(model, entry["checkpoint"])
        with torch.no_grad():
            if pp == 1:
                logits = megatron_logits(model, documents, arch.vocab_size)
            else:
                # Two stages by hand: stage 0's hidden states [T, 1, hidden] become stage 1's input.
                packed = pack_batch(batch_from_documents([list(d) for d in documents] + [[0]], sum(map(len, documents))))
                if parallel_state.is_pipeline_first_stage():
                    hidden = model(packed.tokens, packed.position_ids, None, packed_seq_params=packed.packed_seq_params)
                    torch.distributed.send(hidden.contiguous(), dst=1)
                    logits = None
                else:
                    hidden = torch.empty(packed.num_tokens, 1, arch.hidden_size)
                    torch.distributed.recv(hidden, src=0)
                    model.set_input_tensor(hidden)
                    out = model(packed.tokens, packed.position_ids, None, packed_seq_params=packed.packed_seq_params)
                    logits = out[0, :, : arch.vocab_size]
        if logits is not None:
            diffs[name] = (logits - reference["logits"]).abs().max().item()
        # Save at this layout, as the trainer would, for the single-process export.
        save = Path(spec["out"]) / f"{name}_{layout}"
        target = checkpoint_dir(save, 1)
        if rank == 0:
            target.mkdir(parents=True)
        torch.distributed.barrier()
        dist_checkpointing.save(model_checkpoint_state(model, arch, padded_vocab, iteration=1), str(target))
        torch.distributed.barrier()
        if rank == 0:
            write_tracker_atomically(save, 1)
    # Every TP rank holds the gathered logits; with PP only the last stage does.
    if rank == (0 if pp == 1 else 1):
        (Path(spec["out"]) / f"logit_diffs_{layout}.json").write_text(json.dumps(diffs))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: torchrun --nproc-per-node=2 tests/convert/test_distributed.py --worker SPEC (run by pytest)")
