"""Statistics over results: mean ± std over seeds, mean ± standard error over users, and a paired per-user
bootstrap interval."""
from __future__ import annotations

import numpy as np

# Resamples drawn per block: bounds memory to BLOCK × users indices (the draws do not depend on it).
BLOCK = 500


def mean_std(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1) of a list of numbers; std is None for one value."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_std of no values")
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def mean_se(values) -> tuple[float, float | None]:
    """Mean and its standard error, sample std (ddof 1) / sqrt(n), of per-user values (n,); the
    error is None for one value."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    mean, std = mean_std(v)
    return mean, (std / float(np.sqrt(v.size)) if std is not None else None)


def paired_bootstrap(a, b, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean(a - b), lo, hi)``: the 95% percentile interval of the mean per-user difference.

    ``a`` and ``b`` are per-user metric values (n,) of two models on the same users, aligned by user.
    Each resample draws n users with replacement (``np.random.default_rng(seed)``, one row of n
    indices per resample, in order) and takes the mean difference over them; the interval is the
    2.5th and 97.5th percentile (numpy's linear interpolation) of those means. Users, not items,
    are resampled together, so the interval accounts for both models being scored on the same users.
    """
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.size != b.size:
        raise ValueError(f"paired_bootstrap needs aligned arrays: {a.size} vs {b.size} users")
    d = a - b
    if d.size == 0 or resamples < 1:
        raise ValueError("paired_bootstrap needs at least one user and one resample")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, BLOCK):
        rows = min(BLOCK, resamples - start)
        means[start:start + rows] = d[rng.integers(0, d.size, size=(rows, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)
