"""Selective pseudo-labels: a volume gate (reliability) and a voxel gate (confidence), as the method says.

r(u) = (1 - ASD(u)) * exp(-d_min(u, L) / tau): confident and close to what was labelled. The top
``keep_fraction`` of the unlabeled pool is kept; inside a kept volume, voxels whose highest probability
is below ``confidence`` get the ignore index, so they teach nothing rather than teaching background.
"""

from __future__ import annotations

import numpy as np
import torch

from ASFDALib.adaptation.loss import IGNORE_INDEX
from ASFDALib.query import scoring
from ASFDALib.query.features import FeatureSummary


def reliability(asd: np.ndarray, d_min: np.ndarray) -> np.ndarray:
    """r = (1 - ASD) * exp(-d_min / tau), tau = median d_min over the unlabeled pool."""
    tau = scoring.dynamic_temperature(d_min)
    return (1.0 - np.asarray(asd, dtype=np.float64)) * np.exp(-np.asarray(d_min, dtype=np.float64) / tau)


def distance_to_labelled(unlabelled: list[FeatureSummary], labelled: list[FeatureSummary]) -> np.ndarray:
    """d_min(u, L): the smallest SKL from each unlabeled volume to any labelled one."""
    everything = unlabelled + labelled
    layers = scoring.common_layers(everything)
    full = scoring.pairwise_skl(everything, layers)
    return full[: len(unlabelled), len(unlabelled) :].min(axis=1)


def keep_reliable(scores: np.ndarray, keep_fraction: float) -> list[int]:
    """Indices of the top ``keep_fraction`` (at least one), most reliable first."""
    count = max(1, int(round(len(scores) * keep_fraction))) if len(scores) else 0
    return [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:count]]


def pseudo_label(probs: torch.Tensor | np.ndarray, confidence: float = 0.9) -> np.ndarray:
    """Argmax of (C, ...) probabilities; voxels below ``confidence`` become IGNORE_INDEX."""
    probs = torch.as_tensor(probs)
    best, label = probs.max(dim=0)
    out = label.to(torch.uint8)
    out[best < confidence] = IGNORE_INDEX
    return out.numpy()


def selective_pseudo_labels(
    network: torch.nn.Module,
    card,
    labelled_images: list[np.ndarray],
    pool: list[tuple[str, np.ndarray]],
    keep_fraction: float = 0.5,
    confidence: float = 0.9,
    device: str = "auto",
) -> tuple[list[str], dict[str, float], dict[str, np.ndarray]]:
    """Score ``pool`` (name, model-space image) with the current model, keep the reliable part and label it.

    Returns the kept names (most reliable first), every candidate's reliability, and the pseudo-labels
    (uint8, IGNORE_INDEX where the model is not confident) of the kept ones.
    """
    from ASFDALib.inference.predict import predict_probabilities
    from ASFDALib.inference.sweep import SweepConfig, sweep

    if not pool:
        return [], {}, {}
    sweep_config = SweepConfig(device=device)
    results = [sweep(network, torch.as_tensor(image), card, sweep_config) for _, image in pool]
    labelled = [sweep(network, torch.as_tensor(image), card, sweep_config).summary for image in labelled_images]
    scores = reliability(
        np.array([r.asd for r in results]), distance_to_labelled([r.summary for r in results], labelled)
    )
    kept = keep_reliable(scores, keep_fraction)
    labels = {
        pool[i][0]: pseudo_label(predict_probabilities(network, pool[i][1], card, device), confidence) for i in kept
    }
    return [pool[i][0] for i in kept], {name: float(s) for (name, _), s in zip(pool, scores)}, labels
