"""How the report writes numbers: a fixed number of significant digits, scientific notation for
the very small and the very large, ``n/a`` for a missing value."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def num(value: Any, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits (integers as they are; None as ``n/a``)."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"


def mean_sd(stats: Any, digits: int = 4) -> str:
    """``mean ± std`` of a :class:`~verydeepvae.evaluate.sections.Stats` (or its JSON form)."""
    mean, std = (stats["mean"], stats["std"]) if isinstance(stats, dict) else (stats.mean, stats.std)
    return f"{num(mean, digits)} ± {num(std, 2)}"
