"""Layer-wise distribution alignment: unbiased MMD² with a multi-bandwidth Gaussian kernel.

``mmd2(x, y)`` estimates ``MMD²(P, Q) = E k(x, x') + E k(y, y') - 2 E k(x, y)`` with the
unbiased U-statistic (diagonal terms excluded), so ``mmd2(x, x')`` for two samples of one
distribution is centred on 0 and can be slightly negative.

Kernel: ``k(a, b) = sum_s exp(-||a - b||² / (2 σ_s²))`` with ``σ_s = m · s``,
``s ∈ {0.25, 0.5, 1, 2, 4}`` and ``m`` the median pairwise Euclidean distance of the pooled sample
(``x ∪ y``), computed without gradient (the bandwidth is a heuristic, not a parameter). For large
samples the median is estimated from the pairs among at most ``median_sample`` random pooled
points (130k pairs at the default 512): a bandwidth heuristic needs no more, and the cost stops
growing with the sample.

Cost control (``within_sample_cap``): the within-sample mean ``E k(y, y')`` of a large sample
may be estimated on a random subset of ``within_sample_cap`` of its rows. A U-statistic on a
random subset is still unbiased, so the estimator stays unbiased; the cross term always uses
every row. In the adapter the large sample is the stop-gradient text states, whose
within-sample term carries no gradient at all: the gradient is exactly that of the full-sample
estimator, and an ``(m, m)`` kernel matrix (m up to 2048, per layer) becomes ``(cap, cap)``.
``None`` (the default) computes every term on the full samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

BANDWIDTH_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def pairwise_sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """``(..., n, m)`` squared Euclidean distances between rows of ``a (..., n, D)`` and ``b (..., m, D)``."""
    a_sq = a.pow(2).sum(dim=-1, keepdim=True)  # (..., n, 1)
    b_sq = b.pow(2).sum(dim=-1, keepdim=True)  # (..., m, 1)
    # Matmul form: one (batched) GEMM instead of an (n, m, D) difference tensor; clamp the rounding error.
    return (a_sq + b_sq.transpose(-1, -2) - 2.0 * a @ b.transpose(-1, -2)).clamp_min(0.0)


def _random_rows(points: Tensor, cap: int | None) -> Tensor:
    """At most ``cap`` random rows of ``points (..., n, D)``, the same rows for every leading index."""
    n = points.shape[-2]
    if cap is None or n <= cap:
        return points
    return points[..., torch.randperm(n, device=points.device)[:cap], :]


@torch.no_grad()
def median_pairwise_distance(points: Tensor, median_sample: int | None = 512) -> Tensor:
    """Median (numpy convention: mean of the middle two) of the distances between distinct rows
    of ``points (..., n, D)``, using at most ``median_sample`` random rows. Shape ``(...)``, no grad."""
    points = _random_rows(points, median_sample)
    n = points.shape[-2]
    d2 = pairwise_sq_dists(points, points)
    iu = torch.triu_indices(n, n, offset=1, device=points.device)
    d2 = d2[..., iu[0], iu[1]]  # (..., n (n - 1) / 2)
    count = d2.shape[-1]
    # selection, not a sort: O(pairs)
    lower = d2.kthvalue((count + 1) // 2, dim=-1).values
    upper = d2.kthvalue(count // 2 + 1, dim=-1).values if count % 2 == 0 else lower
    med = (lower.sqrt() + upper.sqrt()) / 2
    return med.clamp_min(1e-6)  # identical points: any positive bandwidth gives MMD 0


def multi_gaussian_kernel(sq_dists: Tensor, sigma: Tensor, scales=BANDWIDTH_SCALES) -> Tensor:
    """``sum_s exp(-d² / (2 (σ s)²))`` elementwise over ``sq_dists (..., n, m)``; ``sigma (...)``."""
    sigma = sigma.reshape(sigma.shape + (1, 1))
    out = torch.zeros_like(sq_dists)
    for scale in scales:
        out = out + torch.exp(sq_dists / (-2.0 * (sigma * scale) ** 2))
    return out


def _mean_off_diagonal(k: Tensor) -> Tensor:
    n = k.shape[-1]
    return (k.sum(dim=(-2, -1)) - k.diagonal(dim1=-2, dim2=-1).sum(dim=-1)) / (n * (n - 1))


def mmd2_layers(
    x: Tensor,
    y: Tensor,
    scales=BANDWIDTH_SCALES,
    median_sample: int | None = 512,
    within_sample_cap: int | None = None,
) -> Tensor:
    """Unbiased MMD² between ``x[l] (n, D)`` and ``y[l] (m, D)`` for each ``l`` of ``x (L, n, D)``,
    ``y (L, m, D)`` -> ``(L,)``, each with its own bandwidth: the adapter's layers in one batched
    computation (a fixed number of kernels, however many layers) rather than one chain per layer.

    Gradients flow into both arguments; detach one to use it as a fixed target. Needs at
    least two rows on each side (returns zeros otherwise: the U-statistic is undefined). Computed
    in float32 whatever the input dtype. ``median_sample`` / ``within_sample_cap``: see the module
    docstring (``None`` = use every row); a random subset is shared by the layers.
    """
    if x.shape[-2] < 2 or y.shape[-2] < 2:
        return (x.sum(dim=(-2, -1)) + y.sum(dim=(-2, -1))).float() * 0.0
    x = x.float()
    y = y.float()
    sigma = median_pairwise_distance(torch.cat([x.detach(), y.detach()], dim=-2), median_sample)  # (L,)
    x_in = _random_rows(x, within_sample_cap)
    y_in = _random_rows(y, within_sample_cap)
    k_xx = multi_gaussian_kernel(pairwise_sq_dists(x_in, x_in), sigma, scales)  # (L, n', n')
    k_yy = multi_gaussian_kernel(pairwise_sq_dists(y_in, y_in), sigma, scales)  # (L, m', m')
    k_xy = multi_gaussian_kernel(pairwise_sq_dists(x, y), sigma, scales)  # (L, n, m)
    return _mean_off_diagonal(k_xx) + _mean_off_diagonal(k_yy) - 2.0 * k_xy.mean(dim=(-2, -1))


def mmd2(x: Tensor, y: Tensor, **options) -> Tensor:
    """Unbiased MMD² between samples ``x (n, D)`` and ``y (m, D)`` (scalar): :func:`mmd2_layers`
    for one layer, with the same keyword options."""
    return mmd2_layers(x.unsqueeze(0), y.unsqueeze(0), **options)[0]
