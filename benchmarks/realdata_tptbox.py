"""Real-data check: a source model trained on a real spine CT, adapted to a real spine MRI (tptbox,
vendored in Testing/Data/tptbox; ONE subject per domain, so the figures are a realism check, not a
statistic).

    python benchmarks/realdata_tptbox.py [--json benchmarks/results/realdata_tptbox.json]

Classes shared by both label maps: background, vertebral body (49, 50) and posterior elements (41-48);
MRI-only labels (cord 60, canal 61, endplate 62, disc 100) are ignored in training and in the Dice.
1. Source: a small MONAI UNet trained from scratch on the CT alone.
2. The MRI is split at the middle of its superior-inferior axis: the cranial half plays the clinician-
   labelled volume, the caudal half is held out (never labelled) and is where Dice is measured.
3. Rows: the source model; stage 1 (fine-tuned on the labelled half); stage 1 + selective pseudo-labels
   on the held-out half (confident voxels only, gamma 0.9) as ASFDA's second stage does it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import emit

from ASFDALib.finetune import IGNORE_INDEX, Case, FinetuneConfig, Trainer, dice_per_class, predict_array
from ASFDALib.modelcard import IntensityConfig, ModelCard, NetworkSpec
from ASFDALib.models import build_network
from ASFDALib.preprocess import preprocess, preprocess_label
from ASFDALib.pseudo import pseudo_label
from ASFDALib.volume_io import read_volume

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
    pred = predict_array(network, case.image, CARD, "cpu").argmax(0).numpy()
    ignore = case.label == IGNORE_INDEX
    return dice_per_class(np.where(ignore, 0, pred), np.where(ignore, 0, case.label), CARD.num_classes)


def train(network, cases: list[Case], iterations: int, workdir: Path, pseudo: list[Case] | None = None, **config):
    trainer = Trainer(network, CARD, FinetuneConfig(device="cpu", checkpoint_every=10**9, **config), workdir)
    trainer.run(cases, iterations, pseudo)
    return network.eval()


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-iterations", type=int, default=600)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    ct = load("sub-ct_label-22_ct.nii.gz", "sub-ct_seg-subreg_label-22_msk.nii.gz")
    mri = load("sub-mri_label-6_T2w.nii.gz", "sub-mri_seg-subreg_label-6_msk.nii.gz")
    mid = mri.image.shape[3] // 2  # RAS: the last axis runs inferior -> superior
    held_out = Case("caudal half", mri.image[..., :mid].copy(), mri.label[..., :mid].copy())
    labelled = Case("cranial half", mri.image[..., mid:].copy(), mri.label[..., mid:].copy())
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        source = train(
            build_network(CARD.network), [ct], args.source_iterations, Path(tmp) / "s", lr=3e-3, encoder_lr_scale=1.0
        )
        state = {k: v.clone() for k, v in source.state_dict().items()}
        rows["source model on its own CT (training data)"] = dice(source, ct)
        rows["source model on the MRI, held-out half"] = dice(source, held_out)
        stage1 = build_network(CARD.network)
        stage1.load_state_dict(state)
        train(stage1, [labelled], args.iterations, Path(tmp) / "a")
        rows["stage 1: fine-tuned on the labelled half"] = dice(stage1, held_out)
        ssft = build_network(CARD.network)
        ssft.load_state_dict(state)
        train(ssft, [labelled], args.iterations // 2, Path(tmp) / "b")
        pseudo = Case("pseudo", held_out.image, pseudo_label(predict_array(ssft, held_out.image, CARD, "cpu"), 0.9))
        train(ssft, [labelled], args.iterations - args.iterations // 2, Path(tmp) / "c", [pseudo])
        rows["stage 1 + selective pseudo-labels on the held-out half"] = dice(ssft, held_out)
    report = {
        "data": "tptbox 1.1.0 sample_ct (lumbar CT) -> sample_mri (cervical T2w MRI); one subject per domain",
        "classes": CARD.class_names[1:],
        "iterations": {"source": args.source_iterations, "adaptation": args.iterations},
        "dice": rows,
        "seconds": time.perf_counter() - start,
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
