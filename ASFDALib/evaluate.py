"""Dice and HD95 per class between predicted and reference label maps, matched by case name."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write_text
from .errors import VolumeError
from .labels import check_grid, match_labels
from .volume_io import discover_volumes, read_volume


@dataclass
class CaseScore:
    case: str
    dice: list[float]
    hd95: list[float]
    reason: str = ""


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray) -> float:
    """95th-percentile symmetric surface distance in mm (MONAI), NaN when either mask is empty."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() or not ref.any():
        return float("nan")
    y_pred = torch.from_numpy(pred[None, None].astype(np.float32))
    y = torch.from_numpy(ref[None, None].astype(np.float32))
    value = compute_hausdorff_distance(y_pred, y, percentile=95, spacing=[float(s) for s in spacing])
    return float(value.item())


def score_case(pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray, num_classes: int) -> tuple[list, list]:
    dice, distance = [], []
    for c in range(1, num_classes):
        p, g = pred == c, ref == c
        total = int(p.sum() + g.sum())
        dice.append(2.0 * np.logical_and(p, g).sum() / total if total else float("nan"))
        distance.append(hd95(p, g, spacing))
    return dice, distance


def evaluate_folders(pred_dir: Path, label_dir: Path, class_names: list[str] | None = None) -> list[CaseScore]:
    labels = discover_volumes(label_dir)
    preds = match_labels(discover_volumes(pred_dir), [p.name for p in labels])
    if not preds:
        raise VolumeError(pred_dir, "no prediction matches a reference label by case name", "use the same names")
    scores = []
    reference = {p.name: p for p in labels}
    num_classes = len(class_names) if class_names else None
    for name, pred_path in sorted(preds.items()):
        try:
            ref = read_volume(reference[name], allow_constant=True)
            pred = read_volume(pred_path, allow_constant=True)
            check_grid(pred.array.shape, pred.affine, ref.array.shape, ref.affine, pred_path)
            classes = num_classes or int(max(ref.array.max(), pred.array.max())) + 1
            spacing = np.linalg.norm(ref.affine[:3, :3], axis=0)
            dice, distance = score_case(np.asarray(pred.array), np.asarray(ref.array), spacing, classes)
            scores.append(CaseScore(name, dice, distance))
        except VolumeError as exc:
            scores.append(CaseScore(name, [], [], exc.reason))
    return scores


def summary_rows(scores: list[CaseScore], class_names: list[str]) -> list[dict]:
    rows = []
    for s in scores:
        row = {"case": s.case, "reason": s.reason}
        for i, name in enumerate(class_names[1:]):
            row[f"dice_{name}"] = s.dice[i] if i < len(s.dice) else float("nan")
            row[f"hd95_{name}"] = s.hd95[i] if i < len(s.hd95) else float("nan")
        finite = [d for d in s.dice if not math.isnan(d)]
        row["dice_mean"] = float(np.mean(finite)) if finite else float("nan")
        rows.append(row)
    if rows:
        mean = {"case": "MEAN", "reason": ""}
        for key in rows[0]:
            if key not in ("case", "reason"):
                values = [r[key] for r in rows if not math.isnan(r[key])]
                mean[key] = float(np.mean(values)) if values else float("nan")
        rows.append(mean)
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return atomic_write_text(path, buffer.getvalue())
