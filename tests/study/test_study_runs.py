"""A whole (tiny) study through the real trainer: identical batches across the arms of a seed, a data
arm that differs by design, evaluation and report, and a resumed study that runs only what is missing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest

from megatron_exact.study import Study
from megatron_exact.study.runner import StudyRunError, run_state
from tests.launch import REPO, require_devices, run_env

pytestmark = pytest.mark.slow


def _hashes(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["batch_sha1"] for r in map(json.loads, f) if "batch_sha1" in r]


def test_tiny_study_end_to_end_and_resume(tmp_path, monkeypatch):
    require_devices(1)
    env = run_env()  # the study's torchrun jobs get the test device
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    messages = []
    study = Study.from_yaml(str(REPO / "examples" / "study" / "tiny_test.yaml"), output=str(tmp_path / "study"),
                            log=messages.append)
    summary = study.run()
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
