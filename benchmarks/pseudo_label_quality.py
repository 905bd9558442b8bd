"""How right are an agreement gate's pseudo-labels? Each pool volume scored against its own ground truth.

    python benchmarks/pseudo_label_quality.py STAGE1.pt --labelled a.nii.gz,b.nii.gz \
        --model Resources/BenchmarkModels/ct_source_batch_percentile.pt --pool bench-mri/data/pool --json out.json

STAGE1.pt is a stage-1 checkpoint (a benchmark's or ablation's ``stage1/`` file, or a session's ``last.pt``);
``--labelled`` names the volumes it was trained on, which are left out. For every other pool volume: the
``flips`` agreement (the least class-balanced Dice between the prediction and those of the volume flipped
along each axis), the ``rounds`` agreement (against the source model, ``--model``), the plain prediction's
mean Dice, and how much of the agreed foreground (voxels where every view agrees and either the label or the
ground truth is an organ) is right. The pool's labels are the benchmark's oracle, never validation or test:
a diagnostic of the gate, not a figure to choose on (docs/method.md, "Which volumes the fallback should
keep"; benchmarks/results/ablation_ssft_floor.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ASFDALib.adaptation.loss import IGNORE_INDEX
from ASFDALib.adaptation.pseudo import agreed_label, flipped_views
from ASFDALib.bench.benchmark import load_cases
from ASFDALib.evaluation.metrics import dice_per_class
from ASFDALib.inference.predict import predict_label
from ASFDALib.models.loading import load_model


def quality(label: np.ndarray, prediction: np.ndarray, truth: np.ndarray, classes: int) -> dict[str, float]:
    """The plain prediction's mean Dice over the organs, and the share of the agreed foreground that is right."""
    agreed = (label != IGNORE_INDEX) & ((label > 0) | (truth > 0))
    return {
        "dice": float(np.nanmean(dice_per_class(prediction, truth, classes))),
        "agreed_foreground_right": float((label[agreed] == truth[agreed]).mean()) if agreed.any() else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage1", type=Path)
    parser.add_argument("--labelled", required=True, help="comma-separated names of the labelled pool volumes")
    parser.add_argument("--model", type=Path, required=True, help="the source model the stage-1 state came from")
    parser.add_argument("--pool", type=Path, required=True, help="the benchmark's pool folder (images/, labels/)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    source = load_model(args.model)
    adapted = load_model(args.model)
    adapted.network.load_state_dict(torch.load(args.stage1, map_location="cpu", weights_only=True)["network"])
    card, labelled = adapted.card, set(args.labelled.split(","))
    rows = []
    for case in load_cases(args.pool, card):
        if case.name in labelled:
            continue
        views = flipped_views(adapted.network.eval(), case.image, card, "cpu")
        label, flips = agreed_label(views)
        _, rounds = agreed_label([views[0], predict_label(source.network.eval(), case.image, card, "cpu")])
        rows.append(
            {"name": case.name, "flips": flips, "rounds": rounds}
            | quality(label, views[0], case.label, len(card.class_names))
        )
        print(json.dumps(rows[-1]), flush=True)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
