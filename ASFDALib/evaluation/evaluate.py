"""Evaluating a folder of predictions against reference label maps, matched by case name: per-case scores,
a summary table and its CSV."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ASFDALib.atomic import atomic_write_text
from ASFDALib.data.labels import check_grid, match_labels
from ASFDALib.data.volumes import discover_volumes, read_volume
from ASFDALib.errors import VolumeError
from ASFDALib.evaluation.metrics import score_case


@dataclass
class CaseScore:
    case: str
    dice: list[float]
    hd95: list[float]
    reason: str = ""


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
