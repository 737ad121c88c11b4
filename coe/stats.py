"""The one softmax and the one percentile definition every part of coe uses (router, controller, benchmarks),
so that a p99 printed by one tool compares with another's."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(x / temperature) over the last axis."""
    z = np.asarray(x, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """Nearest-rank percentile, q in 0-100: the smallest value with at least q% of the values at or below it.
    NaN for no values; infinite values (failures) count."""
    s = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if len(s) == 0:
        return math.nan
    return float(s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))])
