"""The paper's configuration end to end: the flags ``examples/cpt/pair_args.sh`` gives the
LLaMA-3.2-3B 16K EXACT run, on a tiny model and two ranks.

What is changed, on top of the script's own flags: the model (a tiny imported HF model instead of
``--model llama3.2-3b``), the sizes (128-token sequences, 8 per step, context parallelism 1 so that
TP=2 fills the two ranks) and the split (``--split 100,0,0``: all of the weighted blend of two corpora
trains, so the blend also runs without a validation part). Everything else is the paper's: TP=2 with
``--sequence-parallel``, ``--use-distributed-optimizer``, ``--bf16``, ``--recompute-granularity
selective``, ``--data-cache-path``, ``--tensorboard-dir``, ``--finetune`` from the converted checkpoint,
the EXACT loss, and ``--exit-signal-handler``: the run is stopped by SIGUSR1 (SLURM's warning signal)
to one rank, and must save at the iteration reached and exit cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from megatron_exact.checkpoint import checkpoint_dir, read_tracker
from tests.training.conftest import (REPO, last_iteration, read_metrics, run_env, torchrun_command, torchrun_workers,
                                     wait_for)

pytestmark = pytest.mark.slow  # multi-process runs

PAIR, WEIGHTING = "llama3.2-3b-16k", "exact"


def pair_args(env: dict) -> list[str]:
    script = f'source examples/cpt/pair_args.sh && pair_args {PAIR} {WEIGHTING} && printf "%s\\n" "${{TRAIN_ARGS[@]}}"'
    result = subprocess.run(["bash", "-c", script], cwd=REPO, env=dict(os.environ, **env), capture_output=True,
                            text=True, timeout=30, check=True)
    return result.stdout.splitlines()


def _without(flags: list[str], flag: str) -> list[str]:
    index = flags.index(flag)
    return flags[:index] + flags[index + 2:]


@pytest.fixture(scope="module")
def paper_run(blend, tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    env = {"DATA": " ".join(blend.data_path), "HF_CKPT": str(tiny_hf.checkpoint), "RUNS": str(root / "runs")}
    flags = _without(pair_args(env), "--model") + [
        "--hf-config", str(tiny_hf.directory), "--context-parallel-size", "1", "--seq-length", "128",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--split", "100,0,0", "--log-interval", "1",
    ]
    out = root / "runs" / PAIR / WEIGHTING
    log = root / "job.log"
    with open(log, "w") as stream:
        agent = subprocess.Popen(torchrun_command(flags, 2), cwd=REPO, env=run_env(), stdout=stream,
                                 stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: last_iteration(out / "metrics.jsonl") >= 2, agent, what="two iterations", timeout=400)
            torchrun_workers(agent)[1].send_signal(signal.SIGUSR1)  # one rank is enough: the ranks agree
            agent.wait(timeout=180)
        finally:
            if agent.poll() is None:
                agent.kill()
    return {"flags": flags, "env": env, "out": out, "root": root, "returncode": agent.returncode,
            "output": log.read_text(), "records": read_metrics(out / "metrics.jsonl")}


def test_the_paper_flags_are_in_force(paper_run):
    flags = paper_run["flags"]
    for flag in ("--sequence-parallel", "--use-distributed-optimizer", "--bf16", "--finetune", "--exit-signal-handler"):
        assert flag in flags
    assert flags[flags.index("--tensor-model-parallel-size") + 1] == "2"
    assert flags[flags.index("--recompute-granularity") + 1] == "selective"
    assert paper_run["returncode"] == 0, paper_run["output"][-5000:]
    output = paper_run["output"]
    assert "DP=1 TP=2 PP=1 CP=1, loss weighting exact" in output
    assert "weights only" in output  # --finetune from the converted checkpoint
    assert "--split 100,0,0 has no validation part: validation is off" in output


def test_sigusr1_saves_at_the_iteration_reached_and_exits_cleanly(paper_run):
    assert paper_run["returncode"] == 0, paper_run["output"][-5000:]
    lines = [r for r in paper_run["records"] if r.get("split") is None]
    reached = lines[-1]["iteration"]
    assert [r["iteration"] for r in lines] == list(range(1, reached + 1)) and 2 <= reached < 200
    assert f"exit signal received: saving at iteration {reached} and exiting" in paper_run["output"]
    checkpoints = paper_run["out"] / "checkpoints"
    assert read_tracker(checkpoints) == reached
    assert (checkpoint_dir(checkpoints, reached) / "metadata.json").is_file()
    # The script resumes from the run's own checkpoint next time, no longer from the HF import.
    again = pair_args(paper_run["env"])
    assert again[again.index("--load") + 1] == str(checkpoints) and "--finetune" not in again


def test_bf16_weights_with_fp32_optimizer_state(paper_run):
    """--bf16: the model's weights are bf16 (in the checkpoint too); the distributed optimizer keeps
    fp32 main weights and moments. The EXACT objective differs from the cross-entropy."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    checkpoints = paper_run["out"] / "checkpoints"
    metadata = FileSystemReader(str(checkpoint_dir(checkpoints, read_tracker(checkpoints)))).read_metadata()
    dtypes = {key: value.properties.dtype for key, value in metadata.state_dict_metadata.items()
              if hasattr(value, "properties")}
    weights = {k: d for k, d in dtypes.items() if k.startswith("decoder.") and k.endswith(".weight")}
    assert weights and set(weights.values()) == {torch.bfloat16}, weights
    optimizer = {k: d for k, d in dtypes.items() if k.startswith("optimizer.")}
    assert any("exp_avg" in k for k in optimizer) and set(optimizer.values()) == {torch.float32}, optimizer
    assert any("param" in k and "exp_avg" not in k for k in optimizer)  # the fp32 main weights
    first = [r for r in paper_run["records"] if r.get("split") is None][0]
    assert first["loss"] > first["lm_loss"] * 1.001


def test_tensorboard_event_file_holds_the_logged_values(paper_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(paper_run["out"] / "tensorboard"))
    events.Reload()
    lines = [r for r in paper_run["records"] if r.get("split") is None]
    for tag, key in (("train/loss", "loss"), ("train/lm_loss", "lm_loss"), ("train/lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [r["iteration"] for r in lines], tag
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in lines], rel=1e-6, abs=1e-12), tag
    assert any(tag.startswith("exact/token_share/bucket_") for tag in events.Tags()["scalars"])


def test_data_cache_path_holds_the_blend_indices(paper_run):
    cache = paper_run["root"] / "runs" / "index_cache"
    names = [path.name for path in cache.iterdir()]
    assert sum(name.endswith("ExactGPTDataset-train-shuffle_index.npy") for name in names) == 2, names
    assert any(name.endswith("BlendedDataset-train-dataset_index.npy") for name in names), names
