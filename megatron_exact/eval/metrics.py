"""Scoring generated answers as NVIDIA RULER defines it (and NoLiMa's ``contains``).

A prediction is first cleaned as RULER does: surrounding whitespace stripped, control
characters turned into newlines, stripped again. Matching is case-insensitive substring:

- ``string_match_all``: the fraction of the references found in the prediction;
- ``string_match_part``: 1 if any reference is found, else 0.

Per-sample scores are in [0, 1]; tables report 100 x the mean, as RULER does.
"""

from __future__ import annotations

import re
from typing import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(text: str) -> str:
    return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    prediction = prediction.lower()
    return sum(ref.lower() in prediction for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    prediction = prediction.lower()
    return float(any(ref.lower() in prediction for ref in references))


def contains(prediction: str, references: Sequence[str]) -> float:
    """NoLiMa's ``contains``: the (single) gold answer occurs in the prediction, case-insensitively."""
    return string_match_part(prediction, references)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part, "contains": contains}


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    return METRICS[metric](postprocess_prediction(prediction), references)
