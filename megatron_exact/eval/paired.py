"""Paired comparison of two models evaluated on the same samples: per-cell means, B - A deltas.

One module for every paired report (this package's ``--model-b`` and the paired-study tool):
records of model A and model B are grouped into cells (e.g. task x length, or probe distance);
samples are matched across the two models by a sample key (e.g. task, length, index), so the
per-sample differences are kept with each cell (``pairs``), ready for a paired interval
(bootstrap or t) to be added beside the mean delta without changing the callers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Hashable, Iterable, Optional


def _mean(values) -> Optional[float]:
    values = list(values)
    return math.fsum(values) / len(values) if values else None


@dataclasses.dataclass
class Cell:
    key: tuple
    n: int
    mean: Optional[float]


@dataclasses.dataclass
class PairedCell:
    key: tuple
    n_a: int
    n_b: int
    mean_a: Optional[float]
    mean_b: Optional[float]
    delta: Optional[float]  # mean_b - mean_a
    pairs: list  # (value_a, value_b) of the samples present for both models

    def as_json(self) -> dict:
        return {"key": list(self.key), "n_a": self.n_a, "n_b": self.n_b, "mean_a": self.mean_a,
                "mean_b": self.mean_b, "delta": self.delta, "paired_samples": len(self.pairs)}


def cell_means(records: Iterable[dict], cell_key: Callable[[dict], tuple], value: Callable[[dict], float]) -> dict:
    """{cell key: Cell(n, mean)} over ``records``."""
    groups: dict = {}
    for record in records:
        groups.setdefault(cell_key(record), []).append(value(record))
    return {key: Cell(key, len(values), _mean(values)) for key, values in sorted(groups.items())}


def compare(records_a: Iterable[dict], records_b: Iterable[dict], *, cell_key: Callable[[dict], tuple],
            sample_key: Callable[[dict], Hashable], value: Callable[[dict], float]) -> list[PairedCell]:
    """Per cell: A's and B's means over their own samples and the delta B - A."""
    records_a, records_b = list(records_a), list(records_b)
    means_a = cell_means(records_a, cell_key, value)
    means_b = cell_means(records_b, cell_key, value)
    by_sample_b = {sample_key(r): r for r in records_b}
    cells = []
    for key in sorted(set(means_a) | set(means_b)):
        a, b = means_a.get(key), means_b.get(key)
        pairs = [(value(r), value(by_sample_b[sample_key(r)])) for r in records_a
                 if cell_key(r) == key and sample_key(r) in by_sample_b]
        mean_a = a.mean if a else None
        mean_b = b.mean if b else None
        delta = mean_b - mean_a if mean_a is not None and mean_b is not None else None
        cells.append(PairedCell(key, a.n if a else 0, b.n if b else 0, mean_a, mean_b, delta, pairs))
    return cells
