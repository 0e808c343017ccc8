"""The pure evaluation metrics, in one place: pass@k, bootstrap intervals of a mean, and the
collapse (diversity) measures over texts and answers. Plain Python and numpy, no model.

The local `evaluate` modules beside this file (`load_metric`) and `imm_trl.eval` compute with
these; `imm_trl.stats` holds the paired comparison of two models.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from math import comb
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of `values`: resample them with
    replacement `resamples` times and take the (1-confidence)/2 and (1+confidence)/2 quantiles
    of the resampled means. NaNs for no values."""
    import numpy as np

    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams in `texts` (pooled); 0.0 if there are none."""
    grams = [
        tuple(words[i : i + n])
        for words in (text.split() for text in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def answer_entropy(answers: Sequence[Any]) -> float:
    """Shannon entropy in bits of the empirical distribution of `answers` (0.0 when all agree
    or there are none). A missing answer counts as one more distinct value."""
    counts = Counter(answers)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def duplicate_share(texts: Sequence[str]) -> float:
    """Share of `texts` equal (after stripping whitespace) to an earlier one; 0.0 for none."""
    if not texts:
        return 0.0
    return 1.0 - len({text.strip() for text in texts}) / len(texts)
