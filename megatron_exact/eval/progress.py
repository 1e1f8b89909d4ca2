"""Progress of a long evaluation on stderr: done/total, samples/s and ETA (tqdm)."""

from __future__ import annotations

import sys


class Progress:
    """``with Progress(total, "ruler model A") as step: ... step(1)`` after each sample."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=description, unit="sample", file=sys.stderr, mininterval=1.0,
                        disable=not enabled, dynamic_ncols=True,
                        bar_format="{desc}: {n_fmt}/{total_fmt} samples [{elapsed}<{remaining}, {rate_fmt}]")

    def __call__(self, count: int = 1) -> None:
        self.bar.update(count)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
