"""The method's formulas as pure functions on arrays: entropy, Otsu, ASD, symmetric KL, dynamic
temperature, free energy and percentile ranks (see docs/method.md).
"""

from __future__ import annotations

import numpy as np

from ASFDALib.query.features import FeatureSummary

VAR_EPS = 1e-5


def normalized_entropy(probs: np.ndarray, axis: int = 0) -> np.ndarray:
    """H_v = -sum_c p_c log p_c / log C, in [0, 1]; ``probs`` has the classes on ``axis``."""
    num_classes = probs.shape[axis]
    p = np.clip(probs, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=axis) / np.log(num_classes)


def otsu_threshold(hist: np.ndarray, centers: np.ndarray) -> float:
    """The bin centre that maximises the between-class variance of a histogram (Otsu, 1979)."""
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total <= 0:
        return float(centers[len(centers) // 2])
    weight0 = np.cumsum(hist)
    weight1 = total - weight0
    cum_mean = np.cumsum(hist * centers)
    mean0 = np.divide(cum_mean, weight0, out=np.zeros_like(cum_mean), where=weight0 > 0)
    mean1 = np.divide(cum_mean[-1] - cum_mean, weight1, out=np.zeros_like(cum_mean), where=weight1 > 0)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    # Between well-separated modes the criterion is flat across the gap: take the middle of the plateau.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float((centers[best[0]] + centers[best[-1]]) / 2)


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary dilation by a (2r+1)^3 cube, separable along each axis, on a bool array (no copies of floats)."""
    out = mask.astype(bool, copy=True)
    for axis in range(out.ndim):
        for _ in range(radius):
            grown = out.copy()
            lo = [slice(None)] * out.ndim
            hi = [slice(None)] * out.ndim
            lo[axis], hi[axis] = slice(0, -1), slice(1, None)
            grown[tuple(lo)] |= out[tuple(hi)]
            grown[tuple(hi)] |= out[tuple(lo)]
            out = grown
    return out


def adaptive_foreground(
    fg_prob: np.ndarray,
    clamp: tuple[float, float] = (0.05, 0.5),
    margin: int = 1,
    scale: float = 1.0,
    hist: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Omega: voxels above the Otsu cut of the foreground-probability histogram (clamped), dilated.

    ``fg_prob`` may be quantised (e.g. uint8 with ``scale=255``); the threshold is returned as a
    probability. ``hist`` (counts of each quantised level, gathered while the map was written) saves a
    pass over the map. Falls back to the top 1% of voxels by foreground probability when the cut leaves
    nothing.
    """
    if hist is not None:
        centers = np.arange(len(hist)) / scale
    elif np.issubdtype(fg_prob.dtype, np.integer):
        # np.histogram works in blocks; bincount would first widen the whole map to int64.
        levels = int(scale) + 1
        hist, _ = np.histogram(fg_prob, bins=levels, range=(-0.5, levels - 0.5))
        centers = np.arange(levels) / scale
    else:
        hist, edges = np.histogram(fg_prob, bins=256, range=(0.0, scale))
        centers = (edges[:-1] + edges[1:]) / 2 / scale
    threshold = float(np.clip(otsu_threshold(hist, centers), *clamp))
    region = fg_prob > threshold * scale
    if not region.any():
        region = fg_prob >= np.quantile(fg_prob, 0.99)
    return (dilate(region, margin) if margin > 0 else region), threshold


def class_balanced_entropy(
    entropy: np.ndarray, region: np.ndarray, fg_class: np.ndarray, min_voxels: int = 5, scale: float = 1.0
) -> float:
    """Mean over present foreground classes of the mean entropy inside that class's part of ``region``.

    A class counts as present when at least ``min_voxels`` voxels of the region predict it, so a single
    stray voxel cannot weigh as much as an organ. ``entropy`` may be quantised with ``scale``.
    """
    classes = fg_class[region]
    values = entropy[region].astype(np.float64) / scale
    if values.size == 0:
        return 0.0
    counts = np.bincount(classes, minlength=1)
    sums = np.bincount(classes, weights=values, minlength=len(counts))
    present = counts >= min_voxels
    if not present.any():
        return float(values.mean())
    return float((sums[present] / counts[present]).mean())


def asd(fg_prob: np.ndarray, entropy: np.ndarray, fg_class: np.ndarray, margin: int = 1) -> tuple[float, float]:
    """Anatomical Segmentation Difficulty of one volume and the Otsu threshold that defined Omega."""
    region, threshold = adaptive_foreground(fg_prob, margin=margin)
    return class_balanced_entropy(entropy, region, fg_class), threshold


def free_energy(logits: np.ndarray, temperature: float = 1.0, axis: int = 0) -> np.ndarray:
    """Per-voxel free energy E = -T logsumexp(logits / T); higher means less familiar to the model."""
    scaled = logits / temperature
    peak = scaled.max(axis=axis, keepdims=True)
    lse = np.log(np.exp(scaled - peak).sum(axis=axis)) + np.squeeze(peak, axis=axis)
    return -temperature * lse


def gaussian_skl(m1: np.ndarray, v1: np.ndarray, m2: np.ndarray, v2: np.ndarray, eps: float = VAR_EPS) -> np.ndarray:
    """Symmetric KL between 1D Gaussians, elementwise: [KL(1||2) + KL(2||1)] / 2 (broadcasts)."""
    v1 = np.maximum(v1, eps)
    v2 = np.maximum(v2, eps)
    d2 = (m1 - m2) ** 2
    return 0.25 * ((v1 + d2) / v2 + (v2 + d2) / v1 - 2.0)


def common_layers(summaries: list[FeatureSummary], reference: FeatureSummary | None = None) -> list[str]:
    names = set.intersection(*(set(s.layers) for s in summaries)) if summaries else set()
    if reference is not None:
        names &= set(reference.layers)
    return sorted(n for n in names if all(s.layers[n][0].shape == summaries[0].layers[n][0].shape for s in summaries))


def skl_to_reference(summaries: list[FeatureSummary], reference: FeatureSummary, layers: list[str]) -> np.ndarray:
    """d_src: SKL(G(x), K_s) for every volume, averaged over channels then layers."""
    out = np.zeros(len(summaries))
    for name in layers:
        rm, rv = reference.layers[name]
        means = np.stack([s.layers[name][0] for s in summaries])
        variances = np.stack([s.layers[name][1] for s in summaries])
        out += gaussian_skl(means, variances, rm[None], rv[None]).mean(axis=1)
    return out / max(len(layers), 1)


def pairwise_skl(summaries: list[FeatureSummary], layers: list[str], chunk: int = 256) -> np.ndarray:
    """N x N matrix of SKL between volumes (symmetric, zero diagonal), computed in row chunks."""
    n = len(summaries)
    out = np.zeros((n, n))
    for name in layers:
        means = np.stack([s.layers[name][0] for s in summaries])
        variances = np.stack([s.layers[name][1] for s in summaries])
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            d = gaussian_skl(means[rows, None], variances[rows, None], means[None], variances[None])
            out[rows] += d.mean(axis=2)
    out /= max(len(layers), 1)
    np.fill_diagonal(out, 0.0)
    return out


def dynamic_temperature(d: np.ndarray) -> float:
    """tau = median divergence over the remaining candidates (mean, then 1, when that is zero)."""
    d = np.asarray(d, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return 1.0
    tau = float(np.median(d))
    if tau <= 0:
        tau = float(d.mean())
    return tau if tau > 0 else 1.0


def temperature_score(d: np.ndarray, tau: float) -> np.ndarray:
    """1 - exp(-d / tau), in [0, 1): scale-free because tau scales with d."""
    return 1.0 - np.exp(-np.maximum(np.asarray(d, dtype=np.float64), 0.0) / tau)


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Rank of each value within ``values`` scaled to [0, 1]; ties share their average rank."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n <= 1:
        return np.ones(n)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n, dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < n:
        stop = start + 1
        while stop < n and sorted_values[stop] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop - 1) / 2.0
        start = stop
    return ranks / (n - 1)
