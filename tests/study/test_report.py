"""The report from a fixture of recorded metrics: intervals per arm and on paired differences, the
batch check, the verdicts in words, the plots."""

from __future__ import annotations

import json
import math

import pytest

from megatron_exact.study.report import read_run_result, write_report

T_975_2 = 4.302652730  # t(0.975, 2), three seeds
EDGES = [0, 8, 16, 32, 64, 128, 256]

# Per seed: (validation loss, probe accuracy at d=16, at d=448).
RECORDED = {
    "uniform": {1: (2.10, 0.99, 0.50), 2: (2.20, 0.98, 0.60), 3: (2.00, 1.00, 0.70)},
    "exact": {1: (2.11, 0.99, 0.53), 2: (2.21, 0.99, 0.62), 3: (2.01, 0.99, 0.74)},
}


def _write_run(directory, seed, loss, near, far, hashes):
    directory.mkdir(parents=True)
    with open(directory / "metrics.jsonl", "w") as f:
        for iteration, digest in enumerate(hashes, 1):
            f.write(json.dumps({"iteration": iteration, "loss": 3.0, "lm_loss": 3.0, "batch_sha1": digest}) + "\n")
        f.write(json.dumps({"iteration": len(hashes), "split": "valid", "lm_loss": loss, "tokens": 1000,
                            "bucket_lower_edges": EDGES,
                            "bucket_ce_mean": [loss + 0.5, loss + 0.2, loss, loss, loss - 0.1, loss - 0.2, None]}) + "\n")
    cells = [{"sweep": "distance", "length": 512, "distance": d, "n": 100, "accuracy_present": acc,
              "margin_present": 2.0 * acc, "accuracy_ablated": 0.06, "margin_ablated": -1.0}
             for d, acc in ((16, near), (448, far))]
    ruler = [{"task": "niah_multikey_2", "length": 1024, "n": 50, "score": far - 0.1}]
    (directory / "eval.json").write_text(json.dumps({"validation": None, "probe": cells, "ruler": ruler}))


@pytest.fixture
def recorded(tmp_path):
    results = []
    for arm, seeds in RECORDED.items():
        for seed, (loss, near, far) in seeds.items():
            hashes = [f"seed{seed}-it{i}" for i in range(5)]
            _write_run(tmp_path / f"seed{seed}" / arm, seed, loss, near, far, hashes)
            results.append(read_run_result(str(tmp_path / f"seed{seed}" / arm), arm, seed))
    # A data arm: its batches differ by design.
    _write_run(tmp_path / "seed1" / "long", 1, 2.3, 0.9, 0.4, ["other"] * 5)
    results.append(read_run_result(str(tmp_path / "seed1" / "long"), "long", 1, data_arm=True))
    return results


def _by_hand(values):
    n = len(values)
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_975_2 * s / math.sqrt(n)


def test_report_numbers_from_recorded_metrics(recorded, tmp_path):
    summary = write_report(recorded, str(tmp_path / "report"), "fixture study")
    metrics = summary["metrics"]
    far = metrics["probe_accuracy@L512/d448"]
    mean, half = _by_hand([0.50, 0.60, 0.70])
    assert far["arms"]["uniform"]["mean"] == pytest.approx(mean) and far["arms"]["uniform"]["half_width"] == pytest.approx(half)
    # Paired: per-seed differences 0.03, 0.02, 0.04 -> mean 0.03, s 0.01.
    delta = far["deltas"]["exact"]
    assert delta["mean"] == pytest.approx(0.03) and delta["half_width"] == pytest.approx(T_975_2 * 0.01 / math.sqrt(3))
    assert delta["per_seed"] == {"1": pytest.approx(0.03), "2": pytest.approx(0.02), "3": pytest.approx(0.04)}
    # Validation loss: differences 0.01 in every seed: zero spread, an interval of width 0 that excludes zero.
    loss_delta = metrics["valid_loss"]["deltas"]["exact"]
    assert loss_delta["mean"] == pytest.approx(0.01) and loss_delta["half_width"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["valid_loss@64"]["arms"]["exact"]["mean"] == pytest.approx((2.01 + 2.11 + 2.21) / 3 - 0.1)
    assert "valid_loss@256" not in metrics  # an empty bucket (None) is not a number
    # Data arm: one seed, so a mean and no interval.
    assert metrics["valid_loss"]["arms"]["long"]["half_width"] is None
    assert summary["batches"]["loss_arms_identical"] and summary["batches"]["data_arms"] == ["long"]

    text = (tmp_path / "report" / "report.md").read_text()
    near_delta = metrics["probe_accuracy@L512/d16"]["deltas"]["exact"]  # 0, +0.01, -0.01: straddles zero
    assert near_delta["low"] < 0 < near_delta["high"]
    clear = next(line for line in text.splitlines() if line.startswith("- `exact` − `uniform`, distinguishable"))
    unclear = next(line for line in text.splitlines() if line.startswith("- `exact` − `uniform`, not distinguishable"))
    assert "probe accuracy at distance 448" in clear and "probe accuracy at distance 16 " in unclear
    assert "identical tokens and labels" in text and "differ from the loss arms' by design" in text
    assert f"| 512 | 448 | {mean:.3f} ± {half:.3f} |" in text
    # RULER-style task cells: the same per-arm and paired intervals, their own table.
    ruler = metrics["ruler_score@niah_multikey_2/L1024"]
    assert ruler["arms"]["uniform"]["mean"] == pytest.approx(mean - 0.1)
    assert ruler["deltas"]["exact"]["mean"] == pytest.approx(0.03)
    assert ruler["deltas"]["exact"]["half_width"] == pytest.approx(T_975_2 * 0.01 / math.sqrt(3))
    assert "RULER-style niah_multikey_2 score (length 1024)" in clear
    assert f"| niah_multikey_2 | 1024 | {mean - 0.1:.3f} ± {half:.3f} |" in text
    for name in ("probe_accuracy.png", "valid_loss_buckets.png", "report.json"):
        assert (tmp_path / "report" / name).stat().st_size > 1000


def test_report_flags_batches_that_differ(recorded, tmp_path):
    broken = [r for r in recorded if not r.data_arm]
    broken[-1].batch_sha1 = broken[-1].batch_sha1[:-1] + ["tampered"]
    summary = write_report(broken, str(tmp_path / "report"), "fixture study")
    assert not summary["batches"]["loss_arms_identical"]
    assert "**Batches differ between loss arms**" in (tmp_path / "report" / "report.md").read_text()
