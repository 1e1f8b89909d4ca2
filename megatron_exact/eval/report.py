"""Reports of an evaluation run: ``results.json`` (every sample), ``table.md`` and PNG plots.

Tables are long-format: one row per cell (e.g. task x length, or probe sweep x length x distance),
one column per metric; with a second model each metric has A, B and B - A columns (the paired
comparison of :mod:`megatron_exact.eval.paired`). Every output is written atomically.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_exact import atomic_io
from megatron_exact.eval import paired


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    value: Callable[[dict], float]
    scale: float = 1.0  # shown as scale x mean (RULER reports percentages)
    digits: int = 2


@dataclasses.dataclass(frozen=True)
class TableLayout:
    key_names: tuple[str, ...]
    cell_key: Callable[[dict], tuple]
    sample_key: Callable[[dict], tuple]
    metrics: tuple[Metric, ...]
    # an extra row per group: (label key, function(rows of the group) -> value) e.g. RULER's average over tasks
    summary_key: Optional[Callable[[tuple], tuple]] = None


RULER_LAYOUT = TableLayout(
    key_names=("task", "length"),
    cell_key=lambda r: (r["task"], r["length"]),
    sample_key=lambda r: (r["task"], r["length"], r["index"]),
    metrics=(Metric("score", lambda r: r["score"], scale=100.0),),
    summary_key=lambda key: ("average", key[1]),
)
NOLIMA_LAYOUT = TableLayout(
    key_names=("needle_set", "length"),
    cell_key=lambda r: (r["needle_set"], r["length"]),
    sample_key=lambda r: (r["needle_set"], r["length"], r["index"]),
    metrics=(Metric("contains", lambda r: r["score"], scale=100.0),),
)
PROBE_LAYOUT = TableLayout(
    key_names=("sweep", "length", "distance"),
    cell_key=lambda r: (r["sweep"], r["length"], r["distance"]),
    sample_key=lambda r: (r["sweep"], r["length"], r["distance"], r["index"]),
    metrics=(
        Metric("accuracy_present", lambda r: float(r["present"]["correct"]), digits=3),
        Metric("accuracy_ablated", lambda r: float(r["ablated"]["correct"]), digits=3),
        Metric("margin_present", lambda r: r["present"]["margin"], digits=3),
        Metric("margin_ablated", lambda r: r["ablated"]["margin"], digits=3),
    ),
)
LAYOUTS = {"ruler": RULER_LAYOUT, "probe": PROBE_LAYOUT, "nolima": NOLIMA_LAYOUT}


def _scaled(value: Optional[float], scale: float) -> Optional[float]:
    return None if value is None else value * scale


def table_rows(layout: TableLayout, records_a: Sequence[dict], records_b: Optional[Sequence[dict]] = None) -> list[dict]:
    """One dict per cell: the key fields, then per metric ``{name}`` (one model) or
    ``{name}_a``, ``{name}_b``, ``{name}_delta`` (two), scaled as shown in the table."""
    rows: dict = {}
    for metric in layout.metrics:
        if records_b is None:
            cells = [(key, cell.mean, None, None) for key, cell in
                     paired.cell_means(records_a, layout.cell_key, metric.value).items()]
        else:
            cells = [(c.key, c.mean_a, c.mean_b, c.delta) for c in
                     paired.compare(records_a, records_b, cell_key=layout.cell_key, sample_key=layout.sample_key,
                                    value=metric.value)]
        for key, a, b, delta in cells:
            row = rows.setdefault(key, dict(zip(layout.key_names, key)))
            if records_b is None:
                row[metric.name] = _scaled(a, metric.scale)
            else:
                row[f"{metric.name}_a"] = _scaled(a, metric.scale)
                row[f"{metric.name}_b"] = _scaled(b, metric.scale)
                row[f"{metric.name}_delta"] = _scaled(delta, metric.scale)
    ordered = [rows[key] for key in sorted(rows, key=_sort_key)]
    if layout.summary_key is not None:
        ordered += _summary_rows(layout, ordered, records_b is not None)
    return ordered


def _sort_key(key: tuple):
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in key)


def _summary_rows(layout: TableLayout, rows: list[dict], two: bool) -> list[dict]:
    """Mean of the cell means per summary group (RULER's average over tasks at each length)."""
    groups: dict = {}
    for row in rows:
        key = tuple(row[name] for name in layout.key_names)
        groups.setdefault(layout.summary_key(key), []).append(row)
    summary = []
    for key in sorted(groups, key=_sort_key):
        out = dict(zip(layout.key_names, key))
        for metric in layout.metrics:
            columns = [f"{metric.name}_a", f"{metric.name}_b"] if two else [metric.name]
            for column in columns:
                values = [r[column] for r in groups[key] if r[column] is not None]
                out[column] = math.fsum(values) / len(values) if values else None
            if two:
                a, b = out[columns[0]], out[columns[1]]
                out[f"{metric.name}_delta"] = b - a if a is not None and b is not None else None
        summary.append(out)
    return summary


def _format(value, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(layout: TableLayout, rows: list[dict], two: bool, labels: tuple[str, str] = ("A", "B")) -> str:
    headers = list(layout.key_names)
    columns: list[tuple[str, int]] = []
    for metric in layout.metrics:
        if two:
            headers += [f"{metric.name} {labels[0]}", f"{metric.name} {labels[1]}", f"{metric.name} Δ (B−A)"]
            columns += [(f"{metric.name}_a", metric.digits), (f"{metric.name}_b", metric.digits),
                        (f"{metric.name}_delta", metric.digits)]
        else:
            headers.append(metric.name)
            columns.append((metric.name, metric.digits))
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [str(row[name]) for name in layout.key_names] + [_format(row[c], d) for c, d in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- plots ----------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    with atomic_io.atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return path


def plot_scores_vs_length(rows: list[dict], path: Path, *, group: str, metric: str, two: bool, title: str,
                          ylabel: str) -> Path:
    """One line per ``group`` value (task, needle set): score vs length; B dashed beside A."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    groups = sorted({r[group] for r in rows}, key=str)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(groups):
        chosen = sorted((r for r in rows if r[group] == name), key=lambda r: r["length"])
        lengths = [r["length"] for r in chosen]
        color = colors[i % len(colors)]
        for suffix, style, label in ([("_a", "-", " (A)"), ("_b", "--", " (B)")] if two else [("", "-", "")]):
            values = [r[metric + suffix] for r in chosen]
            axis.plot(lengths, values, style, marker="o", color=color, label=f"{name}{label}")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    return _save(figure, path)


def plot_probe(rows: list[dict], path: Path, *, sweep: str, two: bool, title: str) -> Path:
    """Accuracy and margin vs distance (or vs length for the mirror sweep), evidence present vs ablated."""
    plt = _pyplot()
    x_field = "distance" if sweep == "distance" else "length"
    chosen = sorted((r for r in rows if r["sweep"] == sweep), key=lambda r: r[x_field])
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    models = [("_a", "A", "tab:blue"), ("_b", "B", "tab:orange")] if two else [("", "", "tab:blue")]
    xs = [max(r[x_field], 1) for r in chosen]
    for axis, measure in zip(axes, ("accuracy", "margin")):
        for suffix, label, color in models:
            for variant, style in (("present", "-"), ("ablated", ":")):
                axis.plot(xs, [r[f"{measure}_{variant}{suffix}"] for r in chosen], style, marker="o", color=color,
                          label=f"{label} {variant}".strip())
        axis.set_xscale("log", base=2)
        axis.set_xlabel("evidence distance (tokens)" if sweep == "distance" else "total length (tokens)")
        axis.set_ylabel("accuracy" if measure == "accuracy" else "log-prob margin over best distractor")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    return _save(figure, path)
