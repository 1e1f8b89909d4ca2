"""bench/train_throughput.py's CPU dry run: the whole measurement (model built as the trainer builds
it, both weightings interleaved, fused and plain output loss) on a tiny preset, in one child process.
Same weights and batches: the fused and the plain runs start from the same loss."""

import json
import sys

import pytest

from tests.launch import REPO, run_checked

BENCH = REPO / "bench" / "train_throughput.py"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "results.jsonl"
    result = run_checked([sys.executable, str(BENCH), "--dry-run", "--out", str(out)], timeout=300)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return result.stdout, lines, out


def test_dry_run_reports_every_configuration(dry_run):
    stdout, lines, _ = dry_run
    assert [(r["preset"], r["seq_length"], r["loss_path"], r["paths"]["loss"]) for r in lines] == [
        ("tiny-qwen2", 128, "fused", "chunked"), ("tiny-qwen2", 128, "plain", "plain")]
    assert stdout.count("model paths: ") == 2
    for r in lines:
        assert (r["micro_batch_size"], r["num_microbatches"], r["tokens_per_step"]) == (2, 2, 512)
        assert r["timed_steps"] == 2 and r["dtype"] == "fp32"
        for weighting in ("uniform", "exact"):
            m = r[weighting]
            assert m["tokens_per_s"] == pytest.approx(512 / m["step_s_median"])
            assert m["step_s_min"] <= m["step_s_median"] <= m["step_s_max"]
            assert m["tflops_per_gpu"] > 0 and m["mfu"] is None  # no GPU, no peak to divide by
        assert r["exact_over_uniform_step_time"] == pytest.approx(
            r["exact"]["step_s_median"] / r["uniform"]["step_s_median"])
    fused, plain = lines
    for weighting in ("uniform", "exact"):
        assert fused[weighting]["first_loss"] == pytest.approx(plain[weighting]["first_loss"], rel=1e-5)
    assert fused["exact"]["first_loss"] != pytest.approx(fused["uniform"]["first_loss"], rel=1e-3)


def test_summary_table_has_a_row_per_weighting(dry_run, capsys):
    _, lines, out = dry_run
    sys.path.insert(0, str(BENCH.parent))
    import train_throughput

    train_throughput.summarize(str(out))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny-qwen2")]
    assert [row.split(" | ")[2:4] for row in rows] == [["fused", "uniform"], ["fused", "exact"],
                                                       ["plain", "uniform"], ["plain", "exact"]]
