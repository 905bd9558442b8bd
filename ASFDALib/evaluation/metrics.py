"""Segmentation metrics, defined once: Dice and HD95 per foreground class of two label maps."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Dice of every foreground class (NaN where the class is absent from both)."""
    out = []
    for c in range(1, num_classes):
        p, g = pred == c, label == c
        total = p.sum() + g.sum()
        out.append(float(2 * np.logical_and(p, g).sum() / total) if total else float("nan"))
    return out


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray) -> float:
    """95th-percentile symmetric surface distance in mm (MONAI), NaN when either mask is empty."""
    if not pred.any() or not ref.any():
        return float("nan")
    y_pred = torch.from_numpy(pred[None, None].astype(np.float32))
    y = torch.from_numpy(ref[None, None].astype(np.float32))
    with warnings.catch_warnings():
        # MONAI 1.5+ passes its own deprecated get_mask_edges argument inside this call: not ours to fix
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_hausdorff_distance(y_pred, y, percentile=95, spacing=[float(s) for s in spacing])
    return float(value.item())


def score_case(pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray, num_classes: int) -> tuple[list, list]:
    """Dice and HD95 (mm) of every foreground class."""
    dice = dice_per_class(pred, ref, num_classes)
    distance = [hd95(pred == c, ref == c, spacing) for c in range(1, num_classes)]
    return dice, distance
