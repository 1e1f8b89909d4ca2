"""The quickstart's pipeline, reduced (fewer and shorter steps, a smaller corpus), through the real tool
and trainer: identical batches across the arms of a seed, a data arm that differs by design,
evaluation and report, a resumed study that runs only what is missing, changed settings refused."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil

import pytest
import yaml

from megatron_exact.study import Study
from megatron_exact.study.runner import StudyRunError, run_state
from tests.launch import REPO, require_devices, run_env

pytestmark = pytest.mark.slow


def _hashes(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["batch_sha1"] for r in map(json.loads, f) if "batch_sha1" in r]


def reduced_quickstart(tmp_path) -> str:
    """examples/study/quickstart.yaml with seconds-long runs on one rank, plus a data arm."""
    raw = yaml.safe_load((REPO / "examples" / "study" / "quickstart.yaml").read_text())
    raw["data"]["synthetic"].update(documents=300, max_length=512)
    raw["launch"] = {"nproc_per_node": 1}
    raw["on_change"] = "refuse"
    small = {"micro-batch-size": 4, "global-batch-size": 4, "eval-iters": 1, "log-interval": 1, "lr-warmup-iters": 1}
    raw["short_stage"].update(small, **{"seq-length": 64, "train-iters": 2})
    raw["cpt"].update(small, **{"seq-length": 128, "train-iters": 3})
    raw["data_arms"] = {"long-upsampled": {"length_edges": [0, 128], "upsample": [1, 4]}}
    raw["evaluation"]["probe"] = {"lengths": [128], "distances": [4, 64, 120], "samples": 8}
    raw["evaluation"]["ruler"] = {"lengths": [128, 256], "samples": 4}  # trained and extrapolated
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_reduced_quickstart_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    require_devices(1)
    env = run_env()  # the study's torchrun jobs get the test device
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = reduced_quickstart(tmp_path)
    tool = importlib.util.spec_from_file_location("paired_study", REPO / "tools" / "paired_study.py")
    module = importlib.util.module_from_spec(tool)
    tool.loader.exec_module(module)
    assert module.main(["--config", config, "--output", str(tmp_path / "study")]) == 0
    printed = capsys.readouterr().out
    assert "effective context of the CPT data" in printed and "## Distance probe: accuracy" in printed
    messages = []
    study = Study.from_yaml(config, output=str(tmp_path / "study"), log=messages.append)
    summary = json.load(open(tmp_path / "study" / "report" / "report.json"))
    runs = {r.name: r for r in study.runs()}
    assert all(run_state(r) == "done" for r in runs.values())

    uniform, exact, data_arm = (runs[f"seed1/{a}"].directory for a in ("uniform", "exact", "long-upsampled"))
    assert len(_hashes(uniform)) == 3 and _hashes(uniform) == _hashes(exact)
    assert _hashes(data_arm) != _hashes(uniform)
    assert summary["batches"]["loss_arms_identical"] and summary["batches"]["data_arms"] == ["long-upsampled"]
    # The exact arm really trained with other weights: same batches, different objective.
    loss = {arm: [json.loads(line)["loss"] for line in open(os.path.join(d, "metrics.jsonl")) if '"batch_sha1"' in line]
            for arm, d in (("uniform", uniform), ("exact", exact))}
    assert loss["uniform"] != loss["exact"]
    report = tmp_path / "study" / "report"
    assert (report / "probe_accuracy.png").exists() and (report / "valid_loss_buckets.png").exists()
    assert "probe_accuracy@L128/d64" in summary["metrics"]
    cell = json.load(open(os.path.join(exact, "eval.json")))["probe"][0]
    assert cell["n"] == 8 and 0.0 <= cell["accuracy_present"] <= 1.0
    ruler = json.load(open(os.path.join(exact, "eval.json")))["ruler"]
    assert [(c["task"], c["length"], c["n"]) for c in ruler] == [
        (task, length, 4) for task in ("niah_single_1", "niah_multikey_2") for length in (128, 256)]
    assert "ruler_score@niah_multikey_2/L256" in summary["metrics"] and "## RULER-style tasks" in printed

    # Half-finished study: one arm lost. Only that run is redone; the others are untouched.
    untouched = {name: os.path.getmtime(os.path.join(r.save, "latest_checkpointed_iteration.txt"))
                 for name, r in runs.items() if name != "seed1/exact"}
    shutil.rmtree(exact)
    messages.clear()
    study.train()
    assert any("1 to run (seed1/exact (missing))" in m for m in messages), messages[:5]
    assert [m for m in messages if m.startswith("[1/")][0].startswith("[1/1] seed1/exact: training")
    for name, mtime in untouched.items():
        assert os.path.getmtime(os.path.join(runs[name].save, "latest_checkpointed_iteration.txt")) == mtime
    assert _hashes(exact) == _hashes(uniform)

    # Changed settings are refused rather than mixed with the recorded runs.
    changed = dataclasses.replace(study.config, cpt={**study.config.cpt, "lr": 5e-4})
    with pytest.raises(StudyRunError, match=r"seed1/uniform made with other settings \(differs in: --lr\)"):
        Study(changed, log=messages.append).train()
