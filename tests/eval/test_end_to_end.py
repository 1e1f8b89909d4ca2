"""End to end on tiny local HF models, in-process: the ruler and probe suites write results.json, table.md
and plots; the table's cells equal the averages recomputed from the per-sample JSON, and a paired run's
deltas equal B - A cell by cell. Batched KV-cached generation equals one prompt at a time."""

import json
import math
import re

import pytest

from megatron_exact.eval import paired
from megatron_exact.eval.backend import HFModel
from megatron_exact.eval.cli import main


def _markdown_rows(path):
    lines = [l for l in path.read_text().splitlines() if l.startswith("| ") and not l.startswith("|---")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def _mean(values):
    values = list(values)
    return math.fsum(values) / len(values)


@pytest.fixture(scope="module")
def ruler_run(eval_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ruler_out")
    status = main(["ruler", "--model", str(eval_models["a"]), "--model-b", str(eval_models["b"]),
                   "--lengths", "768", "1024", "--tasks", "niah_single_1", "vt", "--num-samples", "2",
                   "--max-new-tokens", "3", "--batch-size", "4", "--output", str(out), "--no-progress"])
    assert status == 0
    return out


def test_ruler_outputs_and_table_equal_recomputed_averages(ruler_run):
    results = json.loads((ruler_run / "results.json").read_text())
    assert (ruler_run / "ruler_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = {label: results["models"][label]["samples"] for label in "AB"}
    assert len(samples["A"]) == len(samples["B"]) == 2 * 2 * 2
    for record in samples["A"]:
        assert {"prediction", "score", "references", "prompt_tokens", "metadata"} <= set(record)
        assert record["prompt_tokens"] + record["max_new_tokens"] <= record["length"]
    rows = _markdown_rows(ruler_run / "table.md")
    seen = set()
    for row in rows:
        task, length = row["task"], int(row["length"])
        if task == "average":
            continue
        seen.add((task, length))
        means = {label: 100 * _mean(r["score"] for r in samples[label] if r["task"] == task and r["length"] == length)
                 for label in "AB"}
        assert float(row["score A"]) == pytest.approx(round(means["A"], 2), abs=0.006)
        assert float(row["score B"]) == pytest.approx(round(means["B"], 2), abs=0.006)
        assert float(row["score Δ (B−A)"]) == pytest.approx(round(means["B"] - means["A"], 2), abs=0.006)
    assert seen == {(t, n) for t in ("niah_single_1", "vt") for n in (768, 1024)}
    # The average row is the mean over tasks at each length (RULER's average).
    for row in (r for r in rows if r["task"] == "average"):
        length = int(row["length"])
        per_task = [100 * _mean(r["score"] for r in samples["A"] if r["task"] == t and r["length"] == length)
                    for t in ("niah_single_1", "vt")]
        assert float(row["score A"]) == pytest.approx(_mean(per_task), abs=0.006)


def test_paired_cells_hand_computed():
    a = [{"task": "t", "i": 0, "v": 1.0}, {"task": "t", "i": 1, "v": 0.0}, {"task": "u", "i": 0, "v": 0.5}]
    b = [{"task": "t", "i": 0, "v": 1.0}, {"task": "t", "i": 1, "v": 1.0}, {"task": "v", "i": 0, "v": 0.25}]
    cells = paired.compare(a, b, cell_key=lambda r: (r["task"],), sample_key=lambda r: (r["task"], r["i"]),
                           value=lambda r: r["v"])
    by_key = {c.key: c for c in cells}
    assert (by_key[("t",)].mean_a, by_key[("t",)].mean_b, by_key[("t",)].delta) == (0.5, 1.0, 0.5)
    assert by_key[("t",)].pairs == [(1.0, 1.0), (0.0, 1.0)]
    assert by_key[("u",)].delta is None and by_key[("u",)].n_b == 0
    assert by_key[("v",)].mean_b == 0.25 and by_key[("v",)].mean_a is None


def test_probe_outputs_and_table(eval_models, tmp_path):
    out = tmp_path / "probe"
    assert main(["probe", "--model", str(eval_models["a"]), "--model-b", str(eval_models["b"]), "--lengths", "256",
                 "384", "--length", "384", "--distances", "0", "100", "--num-samples", "2", "--output", str(out),
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("probe_distance.png", "probe_length.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    rows = _markdown_rows(out / "table.md")
    assert {(r["sweep"], r["length"], r["distance"]) for r in rows} == {
        ("distance", "384", "0"), ("distance", "384", "100"), ("length", "256", "0"), ("length", "384", "0")}
    samples = {label: results["models"][label]["samples"] for label in "AB"}
    for row in rows:
        def cell(label):
            return [r for r in samples[label] if (r["sweep"], str(r["length"]), str(r["distance"])) ==
                    (row["sweep"], row["length"], row["distance"])]
        for variant in ("present", "ablated"):
            acc = {label: _mean(float(r[variant]["correct"]) for r in cell(label)) for label in "AB"}
            margin = {label: _mean(r[variant]["margin"] for r in cell(label)) for label in "AB"}
            assert float(row[f"accuracy_{variant} A"]) == pytest.approx(acc["A"], abs=6e-4)
            assert float(row[f"margin_{variant} B"]) == pytest.approx(margin["B"], abs=6e-4)
            assert float(row[f"margin_{variant} Δ (B−A)"]) == pytest.approx(margin["B"] - margin["A"], abs=1.1e-3)


def test_batched_generation_equals_one_prompt_at_a_time(eval_models):
    model = HFModel(eval_models["a"])
    prompts = [model.bos + model.encode(text) for text in (
        "The river bends slowly past the low hills.", "Fog rolls in from the sea each morning, and then " * 6,
        "Stars appear one by one over the dark sea. " * 3)]
    batched = model.generate(prompts, 6)
    alone = [model.generate([p], 6)[0] for p in prompts]
    assert batched == alone and all(len(ids) == 6 for ids in alone)
    # A row that reaches EOS leaves the batch; the others go on as they would alone.
    model.eos_ids = {alone[1][2]}
    cut = [ids[: ids.index(alone[1][2])] if alone[1][2] in ids else ids for ids in alone]
    assert model.generate(prompts, 6) == cut == [model.generate([p], 6)[0] for p in prompts]
    assert len(cut[1]) == 2 and any(len(ids) == 6 for ids in cut)


def test_generation_reuses_a_shared_prefix_with_the_same_tokens(eval_models):
    """Prompts generated together that share a prefix prefill it once; the tokens equal each
    prompt generated alone."""
    from megatron_exact.eval.backend import REUSE_MIN_FRACTION, common_prefix_length
    from tests.eval.test_probe import _prefill_lengths

    model = HFModel(eval_models["a"])
    base = model.bos + model.encode("Fog rolls in from the sea each morning, and then " * 5)
    prompts = [base + model.encode(" the boats return."), base + model.encode(" stars appear over the hills.")]
    alone = [model.generate([p], 5)[0] for p in prompts]
    lengths, handle = _prefill_lengths(model.model)
    try:
        batched = model.generate(prompts, 5)
    finally:
        handle.remove()
    assert batched == alone
    shared = next(i for i, (a, b) in enumerate(zip(*prompts)) if a != b)
    assert shared >= len(base)
    first, second = sorted(prompts)
    assert lengths == [len(first), len(second) - shared]
    # A prefix shorter than REUSE_MIN_FRACTION of the prompt is not worth its masked attention: run from the start.
    short = [base[:3] + model.encode(" the boats return." * 6), base[:3] + model.encode(" stars appear." * 9)]
    assert min(map(len, short)) * REUSE_MIN_FRACTION > common_prefix_length(*short)
    lengths, handle = _prefill_lengths(model.model)
    try:
        together = model.generate(short, 3)
    finally:
        handle.remove()
    assert together == [model.generate([p], 3)[0] for p in short]
    assert sorted(lengths) == sorted(map(len, short))


def test_progress_reports_rate_and_eta(capsys):
    from megatron_exact.eval.progress import Progress

    with Progress(3, "ruler A") as step:
        for _ in range(3):
            step(1)
    err = capsys.readouterr().err
    assert re.search(r"ruler A: 3/3 samples \[.*sample/s\]", err)


def test_generation_equals_transformers_greedy_generate(eval_models):
    """The own decode loop (per-prompt prefill, batched decode steps) gives transformers' greedy tokens."""
    import torch

    model = HFModel(eval_models["a"])
    prompt = model.bos + model.encode("Fog rolls in from the sea each morning, and then " * 4)
    ids = torch.tensor([prompt])
    reference = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                     do_sample=False, num_beams=1, pad_token_id=model.pad_id, eos_token_id=None)
    assert model.generate([prompt], 8) == [reference[0, len(prompt):].tolist()]
