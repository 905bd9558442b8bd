"""Real-data check: a source model trained on a real spine CT, adapted to a real spine MRI (tptbox,
vendored in Testing/Data/tptbox; ONE subject per domain, so the figures are a realism check, not a
statistic).

    python benchmarks/realdata_tptbox.py [--json benchmarks/results/realdata_tptbox.json]

Classes shared by both label maps: background, vertebral body (49, 50) and posterior elements (41-48);
MRI-only labels (cord 60, canal 61, endplate 62, disc 100) are ignored in training and in the Dice.
1. Source: a small MONAI UNet trained from scratch on the CT alone.
2. The MRI is split at the middle of its superior-inferior axis: the cranial half plays the clinician-
   labelled volume, the caudal half is held out (never labelled) and is where Dice is measured.
3. Rows: the source model; stage 1 (fine-tuned on the labelled half); stage 1 + half as many iterations
   again with selective pseudo-labels on the held-out half (confident voxels only, gamma 0.9), as
   ``asfda finetune`` runs its second stage; and a control that spends those iterations on the labels.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _common import emit

from ASFDALib.adaptation.loss import IGNORE_INDEX
from ASFDALib.adaptation.patches import Case
from ASFDALib.adaptation.pseudo import pseudo_label
from ASFDALib.adaptation.recipe import FinetuneConfig
from ASFDALib.adaptation.trainer import Trainer
from ASFDALib.data.preprocess import preprocess, preprocess_label
from ASFDALib.data.volumes import read_volume
from ASFDALib.evaluation.metrics import dice_per_class
from ASFDALib.inference.predict import predict_label, predict_probabilities
from ASFDALib.models.card import IntensityConfig, ModelCard, NetworkSpec
from ASFDALib.models.loading import build_network

DATA = Path(__file__).resolve().parents[1] / "Testing" / "Data" / "tptbox"
CARD = ModelCard(
    ["background", "vertebral body", "posterior elements"],
    spacing=(1.5, 1.5, 1.5),
    roi_size=(48, 48, 48),
    intensity=IntensityConfig("percentile"),
    name="tptbox-ct-unet",
    network=NetworkSpec(
        "UNet",
        {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 3,
            "channels": [16, 32, 64, 128],
            "strides": [2, 2, 2],
            "num_res_units": 1,
            "norm": "batch",
        },
    ),
    sw_batch_size=4,
)


def shared_classes(mask: np.ndarray) -> np.ndarray:
    out = np.zeros(mask.shape, np.uint8)
    out[np.isin(mask, (49, 50))] = 1
    out[(mask >= 41) & (mask <= 48)] = 2
    out[np.isin(mask, (60, 61, 62, 100))] = IGNORE_INDEX
    return out


def load(image: str, mask: str) -> Case:
    volume = read_volume(DATA / image)
    labels = read_volume(DATA / mask, allow_constant=True)
    return Case(
        image, preprocess(volume, CARD).numpy(), preprocess_label(shared_classes(labels.array), labels.affine, CARD)
    )


def dice(network, case: Case) -> list[float]:
    pred = predict_label(network, case.image, CARD, "cpu")
    ignore = case.label == IGNORE_INDEX
    return dice_per_class(np.where(ignore, 0, pred), np.where(ignore, 0, case.label), CARD.num_classes)


def train(
    network, cases: list[Case], iterations: int, workdir: Path, pseudo: list[Case] | None = None, stage="", **config
):
    # the pseudo-labels here are made without a fallback gate: the fixed teacher, unmixed (the recorded runs' own)
    recorded = {"teacher": "fixed", "pseudo_mix": "none"}
    recipe = FinetuneConfig(device="cpu", checkpoint_every=10**9, **(recorded | config))
    trainer = Trainer(network, CARD, recipe, workdir)
    if stage:  # a later stage draws batches of its own, not stage 1's again
        trainer.begin_stage(stage)
    trainer.run(cases, iterations, pseudo)
    return network.eval()


def continued(state: dict) -> torch.nn.Module:
    """A fresh copy of the network with these weights."""
    network = build_network(CARD.network)
    network.load_state_dict(state)
    return network


def adapt_once(ct: Case, held_out: Case, labelled: Case, seed: int, source_iterations: int, iterations: int) -> dict:
    """Every row for one seed (the source network's initial weights and every stage's batches)."""
    import tempfile

    torch.manual_seed(seed)  # the source network starts from random weights: make them repeatable
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        network = build_network(CARD.network)
        source = train(network, [ct], source_iterations, Path(tmp) / "s", lr=3e-3, encoder_lr_scale=1.0, seed=seed)
        state = {k: v.clone() for k, v in source.state_dict().items()}
        rows["source model on its own CT (training data)"] = dice(source, ct)
        rows["source model on the MRI, held-out half"] = dice(source, held_out)
        stage1 = train(continued(state), [labelled], iterations, Path(tmp) / "a", seed=seed)
        rows["stage 1: fine-tuned on the labelled half"] = dice(stage1, held_out)
        # Stage 2 as `asfda finetune` runs it: stage 1 in full, then half as many iterations again with
        # pseudo-labels; the control spends those iterations on the labelled half alone.
        after_stage1 = {k: v.clone() for k, v in stage1.state_dict().items()}
        extra = iterations // 2
        pseudo = Case(
            "pseudo", held_out.image, pseudo_label(predict_probabilities(stage1, held_out.image, CARD, "cpu"), 0.9)
        )
        ssft = train(continued(after_stage1), [labelled], extra, Path(tmp) / "b", [pseudo], stage="stage2", seed=seed)
        rows["stage 1 + selective pseudo-labels on the held-out half"] = dice(ssft, held_out)
        control = train(continued(after_stage1), [labelled], extra, Path(tmp) / "c", stage="stage2", seed=seed)
        rows["control: stage 1 + as many more iterations on the labelled half alone"] = dice(control, held_out)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-iterations", type=int, default=600)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    ct = load("sub-ct_label-22_ct.nii.gz", "sub-ct_seg-subreg_label-22_msk.nii.gz")
    mri = load("sub-mri_label-6_T2w.nii.gz", "sub-mri_seg-subreg_label-6_msk.nii.gz")
    mid = mri.image.shape[3] // 2  # RAS: the last axis runs inferior -> superior
    held_out = Case("caudal half", mri.image[..., :mid].copy(), mri.label[..., :mid].copy())
    labelled = Case("cranial half", mri.image[..., mid:].copy(), mri.label[..., mid:].copy())
    runs = {s: adapt_once(ct, held_out, labelled, s, args.source_iterations, args.iterations) for s in args.seeds}
    rows = list(runs[args.seeds[0]])
    per_seed_mean = {row: [float(np.mean(runs[s][row])) for s in args.seeds] for row in rows}
    report = {
        "data": "tptbox 1.1.0 sample_ct (lumbar CT) -> sample_mri (cervical T2w MRI); one subject per domain",
        "classes": CARD.class_names[1:],
        "seeds": args.seeds,
        "iterations": {"source": args.source_iterations, "stage1": args.iterations, "stage2": args.iterations // 2},
        "dice": {row: [float(np.mean([runs[s][row][c] for s in args.seeds])) for c in range(2)] for row in rows},
        "mean_dice_per_seed": per_seed_mean,
        "runs": {str(s): r for s, r in runs.items()},
        "seconds": time.perf_counter() - start,
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
