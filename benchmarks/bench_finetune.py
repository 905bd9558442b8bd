"""Fine-tuning cost, side by side in one run.

    python benchmarks/bench_finetune.py [--iterations 20] [--repeats 3] [--json results.json]

1. Iterations per second of ASFDA's trainer against a plain MONAI supervised loop (RandCropByPosNegLabeld,
   flips, intensity augmentation, DiceCELoss, AdamW, DataLoader) with the same network, patch and batch,
   interleaved and repeated (median). Goal: ASFDA >= 0.9x the plain loop.
2. A whole session with the default recipe on the built-in sample pool (budget 3, ground-truth labels
   standing in for the clinician): wall time of stage 1, of the pseudo-label stage and of stage 2, and the
   Dice of the source and adapted models on the nine volumes that were not labelled.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import emit


def _cases(card, count: int):
    from ASFDALib.adaptation.patches import Case
    from ASFDALib.bench.phantoms import domain_config, make_phantom
    from ASFDALib.data.preprocess import preprocess
    from ASFDALib.data.volumes import Volume

    cases = []
    for i in range(count):
        image, label, affine = make_phantom(i, domain_config("mri"))
        cases.append(Case(f"c{i}", preprocess(Volume(image, affine, Path(f"c{i}")), card).numpy(), label))
    return cases


def iteration_speed(iterations: int, repeats: int) -> dict:
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

    from ASFDALib.adaptation.recipe import FinetuneConfig
    from ASFDALib.adaptation.trainer import Trainer
    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.loading import load_model

    path = default_model_path()
    card = load_model(path).card
    cases = _cases(card, 4)
    config = FinetuneConfig(batch_size=2, checkpoint_every=10**9, device="cpu")

    def asfda() -> float:
        trainer = Trainer(load_model(path).network, card, config, Path(tempfile.mkdtemp()))
        start = time.perf_counter()
        trainer.run(cases, iterations)
        return time.perf_counter() - start

    transforms = Compose(
        [
            RandCropByPosNegLabeld(["image", "label"], "label", card.roi_size, pos=2, neg=1, num_samples=1),
            RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(["image", "label"], prob=0.5, spatial_axis=1),
            RandFlipd(["image", "label"], prob=0.5, spatial_axis=2),
            RandScaleIntensityd("image", factors=0.1, prob=1.0),
            RandShiftIntensityd("image", offsets=0.1, prob=1.0),
        ]
    )
    data = [{"image": c.image, "label": c.label[None].astype(np.float32)} for c in cases]

    def plain() -> float:
        network = load_model(path).network.train()
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-5)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        loader = DataLoader(Dataset(data * 1000, transforms), batch_size=2, shuffle=True, num_workers=0)
        start = time.perf_counter()
        for step, batch in enumerate(loader):
            if step == iterations:
                break
            loss = loss_fn(network(batch["image"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    asfda(), plain()  # warm-up
    times = {"asfda": [], "plain_monai": []}
    for _ in range(repeats):
        times["asfda"].append(asfda())
        times["plain_monai"].append(plain())
    speed = {k: iterations / statistics.median(v) for k, v in times.items()}
    return {
        "iterations": iterations,
        "repeats": repeats,
        "batch": 2,
        "patch": list(card.roi_size),
        "iterations_per_second": speed,
        "asfda_over_plain": speed["asfda"] / speed["plain_monai"],
    }


def whole_session() -> dict:
    from ASFDALib.app.cli import main

    root = Path(tempfile.mkdtemp())
    session = root / "session"
    main(["rank", "--out", str(session), "--budget", "3"])
    query = json.loads((session / "ranking.json").read_text())["selected"]
    labels = session / "sample_data" / "labels"
    (root / "gt").mkdir()
    for name in query:
        shutil.copy(labels / name, root / "gt" / name)
    main(["labels", "import", str(session), "--from", str(root / "gt")])
    start = time.perf_counter()
    main(["finetune", str(session)])
    total = time.perf_counter() - start
    seconds = json.loads((session / "session.json").read_text())["rounds"][0]["metrics"]["seconds"]
    held_out = root / "held_out"
    (held_out / "images").mkdir(parents=True)
    (held_out / "labels").mkdir()
    for image in sorted((session / "sample_data" / "images").iterdir()):
        if image.name not in query:
            shutil.copy(image, held_out / "images")
            shutil.copy(labels / image.name, held_out / "labels")
    dice = {}
    for name, flag in (("source", ["--source-model"]), ("adapted", [])):
        main(["predict", str(session), "--images", str(held_out / "images"), "--out", str(root / name), *flag])
        main(
            [
                "evaluate",
                "--pred",
                str(root / name),
                "--labels",
                str(held_out / "labels"),
                "--session",
                str(session),
            ]
        )
        import csv

        rows = list(csv.DictReader(open(root / name / "evaluation.csv")))
        mean = next(r for r in rows if r["case"] == "MEAN")
        dice[name] = {k: float(v) for k, v in mean.items() if k.startswith("dice_")}
    return {
        "query": query,
        "finetune_wall_s": total,
        "seconds": seconds,
        "pseudo_over_stage1": seconds.get("pseudo_labels", 0) / seconds["stage1"],
        "dice_held_out": dice,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "speed": iteration_speed(args.iterations, args.repeats),
        "session": whole_session(),
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
