"""ClaSP PE's per-volume scores: class-agnostic and class-specific predictive entropy of one prediction.

Column 0 is the mean over the volume of the normalised predictive entropy H(x) = −Σ_c p_c log p_c / log C;
column c ≥ 1 the mean of H(x)·p_c(x), nnActive's class-specific predictive entropy
(``nnactive/strategies/uncertainties.py``, ``class_pred_entropy``), aggregated over the whole volume.
One prediction pass through the one window engine (:func:`ASFDALib.inference.predict.predict_probabilities`);
the result is cached beside the sweep results so a re-rank does not repeat it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ASFDALib.atomic import atomic_write_json


def class_entropy_from_probabilities(probs: torch.Tensor) -> np.ndarray:
    """(C,) scores of a softmax map (C, X, Y, Z): [mean H, mean H·p_1, …, mean H·p_{C−1}]."""
    p = torch.as_tensor(probs, dtype=torch.float32)
    classes = p.shape[0]
    h = -(p * p.clamp_min(1e-12).log()).sum(dim=0) / math.log(max(classes, 2))
    per_class = (h[None] * p[1:]).flatten(1).mean(dim=1)
    return np.concatenate([[float(h.mean())], per_class.double().numpy()])


def class_entropy_scores(network: torch.nn.Module, image, card, device: str = "auto") -> np.ndarray:
    """The ClaSP PE scores of one preprocessed volume (1, X, Y, Z) under ``network``."""
    from ASFDALib.inference.predict import predict_probabilities

    return class_entropy_from_probabilities(predict_probabilities(network, image, card, device))


def cached(folder: Path, key: str) -> np.ndarray | None:
    """The scores stored under ``key`` in the score-cache folder, or None."""
    try:
        return np.asarray(json.loads((Path(folder) / f"{key}.json").read_text())["class_entropy"], dtype=np.float64)
    except (OSError, ValueError, KeyError):
        return None


def store(folder: Path, key: str, scores: np.ndarray) -> None:
    atomic_write_json(Path(folder) / f"{key}.json", {"class_entropy": [float(v) for v in scores]})
