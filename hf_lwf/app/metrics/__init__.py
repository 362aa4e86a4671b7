"""Local `evaluate` metrics: loaded from the scripts shipped in this folder, so they work offline."""

from __future__ import annotations

import os

import evaluate


NUMERIC_EXACT_MATCH_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "numeric_exact_match.py")


def load_numeric_exact_match(**kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` the numeric exact-match metric from its local script (no Hub access, unlike "exact_match").

    ``kwargs`` go to `evaluate.load` (e.g. ``keep_in_memory=True``, ``experiment_id``).
    """
    return evaluate.load(NUMERIC_EXACT_MATCH_PATH, **kwargs)


__all__ = ["NUMERIC_EXACT_MATCH_PATH", "load_numeric_exact_match"]
