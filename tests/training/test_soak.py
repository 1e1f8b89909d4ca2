"""The soak (``bench/soak.py``) in a shortened form: two agents on loopback, 24 iterations with a
checkpoint every 8 and one SIGKILL of a rank mid-step, against the same job uninterrupted. Every
iteration once, losses and final checkpoint tensors bit-equal, no temporary checkpoint directory left,
and the uninterrupted job's RSS per rank at its last iterations within the soak's tolerance (5%) of
its value at iteration 8. The full soak (300 iterations, 3 kills) is a benchmark: BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.launch import REPO, node_commands, run_env
from tests.training.conftest import PRETRAIN


def _soak_module():
    if "bench_soak" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_soak", REPO / "bench" / "soak.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # before it runs: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["bench_soak"]


def _commands(flags, max_restarts):
    return node_commands(PRETRAIN, *flags, nodes=2, nproc=1, rendezvous=True,
                         torchrun_flags=(f"--max-restarts={max_restarts}", "--rdzv-conf=join_timeout=60"))


@pytest.mark.slow  # multi-process runs
def test_a_short_soak_with_a_kill_matches_the_uninterrupted_job(byte_corpus, tmp_path):
    soak = _soak_module()
    summary = soak.soak(tmp_path, byte_corpus, iters=24, save_interval=8, kills=1, seed=0, rss_from=8,
                        timeout=300, commands=_commands, env=run_env())
    assert summary["ok"], summary["failures"]
    assert summary["kills_survived"] == 1 and summary["iterations_missing"] == 0
    assert summary["final_weights_equal"] is True and summary["leftover_temporaries"] == 0
    assert set(summary["rss_growth_uninterrupted"]) == {0, 1}


def test_the_kill_plan_is_fixed_by_the_seed_and_spread_over_the_run():
    soak = _soak_module()
    plan = soak.kill_plan(300, 20, 3, seed=0)
    assert plan == soak.kill_plan(300, 20, 3, seed=0) != soak.kill_plan(300, 20, 3, seed=1)
    assert [k.during_save for k in plan] == [False, True, False]
    iterations = [k.iteration for k in plan]
    assert iterations == sorted(iterations) and 25 <= iterations[0] and iterations[-1] < 300 - 20
    assert all(b - a > 20 for a, b in zip(iterations, iterations[1:]))  # one generation each


def test_rss_growth_is_measured_over_each_process_own_life():
    soak = _soak_module()
    first = soak.Process(1, 0, [(0, 100), (50, 200), (120, 210), (299, 204), (300, 300), (300, 0)])
    assert soak.rss_growth(first, 50, 300) == pytest.approx(0.02)  # 204 at 299 over 200 at 50
    restarted = soak.Process(2, 1, [(130, 90), (120, 100), (170, 200), (250, 190)])  # 130: the killed run's line
    assert soak.rss_growth(restarted, 50, 300) == pytest.approx(-0.05)
    short = soak.Process(3, 1, [(240, 100), (290, 200), (299, 201)])
    assert soak.rss_growth(short, 50, 300) == pytest.approx(0.005)
    assert soak.rss_growth(soak.Process(4, 0, [(240, 100), (280, 120)]), 50, 300) is None  # not 50 in
