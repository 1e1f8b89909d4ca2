"""One report for a study: per arm mean and 95% interval across seeds, paired deltas against uniform.

Input: one :class:`RunResult` per CPT run (arm, seed, the per-iteration batch
hashes of its metrics file, its validation record, probe and RULER-style cells). Output
in one directory: ``report.json`` (every number, per-seed values included),
``report.md`` (tables and a summary saying plainly which differences are and
are not distinguishable from zero at this number of seeds), and plots
(``probe_accuracy.png``: probe accuracy vs distance; ``valid_loss_buckets.png``:
validation loss vs effective-context bucket; both with their intervals, and
the paired deltas underneath).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megatron_exact import atomic_io
from megatron_exact.study.stats import Interval, mean_interval, paired_interval

BASELINE = "uniform"


@dataclass
class RunResult:
    arm: str
    seed: int
    batch_sha1: List[str]
    validation: Optional[dict]
    probe: List[dict] = field(default_factory=list)
    data_arm: bool = False
    ruler: List[dict] = field(default_factory=list)  # per (task, length): n, score


def read_run_result(run_dir: str, arm: str, seed: int, data_arm: bool = False) -> RunResult:
    """A finished run's results from its directory (``metrics.jsonl`` and ``eval.json``)."""
    hashes, validation = [], None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("split") == "valid":
                validation = record
            elif "batch_sha1" in record:
                hashes.append(record["batch_sha1"])
    probe, ruler = [], []
    eval_path = os.path.join(run_dir, "eval.json")
    if os.path.exists(eval_path):
        with open(eval_path) as f:
            evaluated = json.load(f)
        probe = evaluated.get("probe") or []
        ruler = evaluated.get("ruler") or []
        validation = evaluated.get("validation") or validation
    return RunResult(arm, seed, hashes, validation, probe, data_arm, ruler)


def _metrics(result: RunResult) -> Dict[str, float]:
    """Flat metric name -> value of one run."""
    values = {}
    if result.validation:
        values["valid_loss"] = result.validation["lm_loss"]
        for edge, ce in zip(result.validation["bucket_lower_edges"], result.validation["bucket_ce_mean"]):
            if ce is not None:
                values[f"valid_loss@{edge}"] = ce
    for cell in result.probe:
        where = f"L{cell['length']}/d{cell['distance']}"
        values[f"probe_accuracy@{where}"] = cell["accuracy_present"]
        values[f"probe_margin@{where}"] = cell["margin_present"]
        values[f"probe_accuracy_ablated@{where}"] = cell["accuracy_ablated"]
    for cell in result.ruler:
        values[f"ruler_score@{cell['task']}/L{cell['length']}"] = cell["score"]
    return values


def check_batches(results: Sequence[RunResult]) -> dict:
    """Per seed: do all loss arms (not data arms) have identical per-iteration batch hashes?"""
    by_seed: Dict[int, Dict[str, List[str]]] = {}
    for r in results:
        if not r.data_arm:
            by_seed.setdefault(r.seed, {})[r.arm] = r.batch_sha1
    per_seed, identical = {}, True
    for seed, arms in sorted(by_seed.items()):
        reference = arms.get(BASELINE) or next(iter(arms.values()))
        same = {arm: hashes == reference and len(hashes) > 0 for arm, hashes in arms.items()}
        per_seed[seed] = {"iterations": len(reference), "identical": same}
        identical &= all(same.values())
    return {"loss_arms_identical": identical, "per_seed": per_seed,
            "data_arms": sorted({r.arm for r in results if r.data_arm})}


def _interval_record(interval: Interval, values: Dict[int, float]) -> dict:
    return {**interval.to_dict(), "per_seed": {str(s): v for s, v in sorted(values.items())}}


def summarize(results: Sequence[RunResult], confidence: float = 0.95) -> dict:
    """Per metric: each arm's mean and interval over seeds, and each arm's paired delta against uniform."""
    arms = list(dict.fromkeys(r.arm for r in results))
    per_arm: Dict[str, Dict[int, Dict[str, float]]] = {}
    for r in results:
        per_arm.setdefault(r.arm, {})[r.seed] = _metrics(r)
    names = list(dict.fromkeys(name for arm in per_arm.values() for m in arm.values() for name in m))
    metrics = {}
    for name in names:
        entry = {"arms": {}, "deltas": {}}
        for arm in arms:
            values = {s: m[name] for s, m in per_arm[arm].items() if name in m}
            if values:
                entry["arms"][arm] = _interval_record(mean_interval(list(values.values()), confidence), values)
        baseline = {s: m[name] for s, m in per_arm.get(BASELINE, {}).items() if name in m}
        for arm in arms:
            if arm == BASELINE or not baseline:
                continue
            values = {s: m[name] for s, m in per_arm[arm].items() if name in m}
            common = sorted(set(values) & set(baseline))
            if common:
                entry["deltas"][arm] = _interval_record(paired_interval(baseline, values, confidence),
                                                        {s: values[s] - baseline[s] for s in common})
        metrics[name] = entry
    seeds = sorted({r.seed for r in results})
    return {"arms": arms, "seeds": seeds, "confidence": confidence, "batches": check_batches(results),
            "metrics": metrics}


# -- markdown -----------------------------------------------------------------------------------

def _fmt(record: Optional[dict], digits: int = 3, signed: bool = False) -> str:
    if record is None:
        return "-"
    sign = "+" if signed else ""
    text = f"{record['mean']:{sign}.{digits}f}"
    if record["half_width"] is not None:
        text += f" ± {record['half_width']:.{digits}f}"
    return text


def _verdict(delta: dict) -> str:
    if delta["half_width"] is None:
        return "no interval (one seed)"
    if delta["low"] > 0 or delta["high"] < 0:
        return "**distinguishable from zero**"
    return "not distinguishable from zero"


def _probe_cells(summary: dict) -> List[tuple]:
    cells = []
    for name in summary["metrics"]:
        if name.startswith("probe_accuracy@"):
            length, distance = name.split("@")[1].split("/")
            cells.append((int(length[1:]), int(distance[1:])))
    return sorted(set(cells))


def _ruler_cells(summary: dict) -> List[str]:
    return sorted((n for n in summary["metrics"] if n.startswith("ruler_score@")),
                  key=lambda n: (n.split("@")[1].split("/L")[0], int(n.split("/L")[1])))


def _buckets(summary: dict) -> List[int]:
    return sorted(int(n.split("@")[1]) for n in summary["metrics"] if n.startswith("valid_loss@"))


def markdown(summary: dict, title: str, notes: Sequence[str] = ()) -> str:
    arms, metrics = summary["arms"], summary["metrics"]
    others = [a for a in arms if a != BASELINE]
    n = len(summary["seeds"])
    pct = round(100 * summary["confidence"])
    lines = [f"# {title}", "",
             f"{n} seed(s) ({', '.join(map(str, summary['seeds']))}); arms: {', '.join(arms)}. "
             f"Values are means over seeds ± the half-width of the {pct}% Student-t interval "
             f"(t(0.975, n-1) s / sqrt(n)); deltas are computed per seed against `{BASELINE}` and their interval "
             "is taken over those per-seed differences.", ""]
    lines += [f"- {note}" for note in notes]
    batches = summary["batches"]
    lines.append("")
    if batches["loss_arms_identical"]:
        iterations = sorted({v["iterations"] for v in batches["per_seed"].values()})
        lines.append(f"Batches: for every seed, all loss arms trained on identical tokens and labels at every "
                     f"iteration ({'/'.join(map(str, iterations))} iterations, per-iteration `batch_sha1`).")
    else:
        bad = {s: [a for a, ok in v["identical"].items() if not ok] for s, v in batches["per_seed"].items()}
        lines.append(f"**Batches differ between loss arms** (per seed, arms whose batch hashes differ from "
                     f"`{BASELINE}`: {bad}): the comparison is not paired on data.")
    if batches["data_arms"]:
        lines.append(f"Data arms ({', '.join(batches['data_arms'])}) train on a different mixture: their batches "
                     "differ from the loss arms' by design.")
    lines.append("")

    # Summary in words.
    lines += ["## Summary", ""]
    key_metrics = (["valid_loss"] + [f"probe_accuracy@L{L}/d{d}" for L, d in _probe_cells(summary)]
                   + _ruler_cells(summary))
    for arm in others:
        clear, unclear = [], []
        for name in key_metrics + [f"valid_loss@{b}" for b in _buckets(summary)]:
            delta = metrics.get(name, {}).get("deltas", {}).get(arm)
            if delta is None:
                continue
            text = f"{_label(name)}: {_fmt(delta, signed=True)}"
            (clear if delta["half_width"] is not None and (delta["low"] > 0 or delta["high"] < 0) else unclear).append(text)
        if n < 2:
            lines.append(f"- `{arm}` − `{BASELINE}`: one seed, so no interval: the deltas below are single runs "
                         "and cannot be told apart from seed-to-seed noise.")
            continue
        lines.append(f"- `{arm}` − `{BASELINE}`, distinguishable from zero ({pct}% interval excludes 0): "
                     + ("; ".join(clear) if clear else "none"))
        lines.append(f"- `{arm}` − `{BASELINE}`, not distinguishable from zero: "
                     + ("; ".join(unclear) if unclear else "none"))
    lines.append("")

    cells = _probe_cells(summary)
    if cells:
        lines += ["## Distance probe: accuracy (fact present)", "",
                  "| length | distance | " + " | ".join(arms) + " | " + " | ".join(f"{a} − {BASELINE}" for a in others)
                  + " | ablated (" + BASELINE + ") |",
                  "|---|---|" + "---|" * (len(arms) + len(others) + 1)]
        for length, distance in cells:
            name = f"probe_accuracy@L{length}/d{distance}"
            entry = metrics[name]
            ablated = metrics.get(f"probe_accuracy_ablated@L{length}/d{distance}", {}).get("arms", {}).get(BASELINE)
            row = [str(length), str(distance)] + [_fmt(entry["arms"].get(a)) for a in arms]
            row += [_fmt(entry["deltas"].get(a), signed=True) for a in others] + [_fmt(ablated)]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "## Distance probe: margin (log-probability of the answer minus the best other value)", "",
                  "| length | distance | " + " | ".join(arms) + " | " + " | ".join(f"{a} − {BASELINE}" for a in others)
                  + " |", "|---|---|" + "---|" * (len(arms) + len(others))]
        for length, distance in cells:
            entry = metrics[f"probe_margin@L{length}/d{distance}"]
            row = [str(length), str(distance)] + [_fmt(entry["arms"].get(a), 2) for a in arms]
            row += [_fmt(entry["deltas"].get(a), 2, signed=True) for a in others]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    ruler = _ruler_cells(summary)
    if ruler:
        lines += ["## RULER-style tasks in the corpus's language (string-match score, greedy generation)", "",
                  "| task | length | " + " | ".join(arms) + " | " + " | ".join(f"{a} − {BASELINE}" for a in others)
                  + " |", "|---|---|" + "---|" * (len(arms) + len(others))]
        for name in ruler:
            task, length = name.split("@")[1].split("/L")
            entry = metrics[name]
            row = [task, length] + [_fmt(entry["arms"].get(a)) for a in arms]
            row += [_fmt(entry["deltas"].get(a), signed=True) for a in others]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    buckets = _buckets(summary)
    if buckets:
        lines += ["## Validation loss (unweighted cross-entropy) per effective-context bucket", "",
                  "| bucket (lower edge) | " + " | ".join(arms) + " | " + " | ".join(f"{a} − {BASELINE}" for a in others)
                  + " |", "|---|" + "---|" * (len(arms) + len(others))]
        for name in ["valid_loss"] + [f"valid_loss@{b}" for b in buckets]:
            entry = metrics[name]
            row = [_label(name)] + [_fmt(entry["arms"].get(a), 4) for a in arms]
            row += [_fmt(entry["deltas"].get(a), 4, signed=True) for a in others]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["Plots: `probe_accuracy.png` (accuracy vs distance), `valid_loss_buckets.png` (loss vs bucket); "
              "error bars are the intervals above. Every number, with per-seed values: `report.json`.", ""]
    return "\n".join(lines)


def _label(name: str) -> str:
    if name == "valid_loss":
        return "validation loss (all)"
    if name.startswith("valid_loss@"):
        edge = int(name.split("@")[1])
        return f"validation loss, context [{edge}, {2 * edge if edge else 8})"
    if name.startswith("probe_accuracy@"):
        length, distance = name.split("@")[1].split("/")
        return f"probe accuracy at distance {distance[1:]} (length {length[1:]})"
    if name.startswith("ruler_score@"):
        task, length = name.split("@")[1].split("/L")
        return f"RULER-style {task} score (length {length})"
    return name


# -- plots ----------------------------------------------------------------------------------------

def _errorbar(ax, xs, records, label, offset=0.0):
    points = [(x, r) for x, r in zip(xs, records) if r is not None]
    if not points:
        return
    x = [p[0] * (1 + offset) for p in points]
    y = [p[1]["mean"] for p in points]
    err = [p[1]["half_width"] or 0.0 for p in points]
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)


def _save_figure(plt, fig, path: str) -> str:
    """Lay out, write atomically and close ``fig``; returns ``path``."""
    fig.tight_layout()
    with atomic_io.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def plot(summary: dict, out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, metrics = summary["arms"], summary["metrics"]
    others = [a for a in arms if a != BASELINE]
    written = []
    cells = _probe_cells(summary)
    lengths = sorted({L for L, _ in cells})
    if lengths:
        fig, axes = plt.subplots(2, len(lengths), figsize=(5.5 * len(lengths), 7), squeeze=False, sharex="col")
        for column, length in enumerate(lengths):
            distances = [d for L, d in cells if L == length]
            top, bottom = axes[0][column], axes[1][column]
            for i, arm in enumerate(arms):
                _errorbar(top, distances, [metrics[f"probe_accuracy@L{length}/d{d}"]["arms"].get(arm)
                                           for d in distances], arm, offset=0.02 * i)
            ablated = [metrics.get(f"probe_accuracy_ablated@L{length}/d{d}", {}).get("arms", {}).get(BASELINE)
                       for d in distances]
            if any(ablated):
                top.plot(distances, [a["mean"] if a else None for a in ablated], ":", color="grey",
                         label=f"{BASELINE}, fact removed")
            top.set_title(f"distance probe, prompt length {length}")
            top.set_ylabel("accuracy (fact present)")
            top.set_ylim(0, 1.02)
            top.legend(fontsize=8)
            for i, arm in enumerate(others):
                _errorbar(bottom, distances, [metrics[f"probe_accuracy@L{length}/d{d}"]["deltas"].get(arm)
                                              for d in distances], f"{arm} − {BASELINE}", offset=0.02 * i)
            bottom.axhline(0.0, color="black", linewidth=0.8)
            bottom.set_xscale("log", base=2)
            bottom.set_xlabel("distance between fact and question (tokens)")
            bottom.set_ylabel("accuracy delta (paired)")
            bottom.legend(fontsize=8)
        written.append(_save_figure(plt, fig, os.path.join(out_dir, "probe_accuracy.png")))
    buckets = _buckets(summary)
    if buckets:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
        xs = [max(b, 1) for b in buckets]
        for i, arm in enumerate(arms):
            _errorbar(top, xs, [metrics[f"valid_loss@{b}"]["arms"].get(arm) for b in buckets], arm, offset=0.03 * i)
        top.set_xscale("log", base=2)
        top.set_ylabel("validation cross-entropy")
        top.set_title("validation loss per effective-context bucket")
        top.legend(fontsize=8)
        for i, arm in enumerate(others):
            _errorbar(bottom, xs, [metrics[f"valid_loss@{b}"]["deltas"].get(arm) for b in buckets],
                      f"{arm} − {BASELINE}", offset=0.03 * i)
        bottom.axhline(0.0, color="black", linewidth=0.8)
        bottom.set_xlabel("effective context (bucket lower edge, tokens; 0 drawn at 1)")
        bottom.set_ylabel("loss delta (paired)")
        bottom.legend(fontsize=8)
        written.append(_save_figure(plt, fig, os.path.join(out_dir, "valid_loss_buckets.png")))
    return written


def write_report(results: Sequence[RunResult], out_dir: str, title: str, notes: Sequence[str] = ()) -> dict:
    """Write report.json, report.md and the plots into ``out_dir``; returns the summary."""
    if not results:
        raise ValueError("no finished runs to report on")
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(results)
    summary["title"] = title
    atomic_io.write_json(os.path.join(out_dir, "report.json"), summary)
    atomic_io.write_text(os.path.join(out_dir, "report.md"), markdown(summary, title, notes))
    summary["plots"] = plot(summary, out_dir)
    return summary
