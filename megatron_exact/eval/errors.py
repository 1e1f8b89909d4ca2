"""Errors of the evaluation package: what a user can fix, naming the file or setting."""

from __future__ import annotations

from megatron_exact.errors import UserError


class EvalInputError(UserError, ValueError):
    """A model directory, task specification, needle set, haystack file or length the evaluation cannot use."""
