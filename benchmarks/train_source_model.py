"""Train the foundation-like source model of benchmark scenario (a), hospital shift within CT.

    python benchmarks/train_source_model.py [--norm both] [--arch unet] [--volumes 200] [--iterations 3000]
        [--out Resources/BenchmarkModels]

A MONAI UNet (channels 16-32-64-128, two residual units per level, 5 foreground classes of the rich anatomy)
trained from scratch on ``--volumes`` source CT volumes, each with its own simulated scanner and protocol
(:func:`ASFDALib.bench.scenarios.source_config`), in two variants: ``batch`` (BatchNorm, so DKD reads its
source knowledge from the running statistics) and ``instance`` (InstanceNorm, as most real foundation models:
DKD then needs the source-statistics file written beside it). Training uses the engine's own trainer
(foreground-oversampled 48³ patches, flips and intensity augmentation, Dice + cross-entropy, AdamW),
checkpoints every 250 iterations and resumes from ``WORK/STEM`` when run again. ``--arch dynunet`` trains
nnU-Net's layout instead (DynUNet, a pointwise output head: the network the prototype knowledge is measured
on; files ``ct_source_dynunet_NORM.*``). Each variant writes ``ct_source_NORM.pt`` (state dict, about 5 MB),
its card ``ct_source_NORM.card.json`` and ``ct_source_NORM_stats.npz``; ``--check N`` then scores N fresh
volumes of the source distribution and of each target hospital (H1-H3) and writes
``ct_source_NORM_check.json`` (the issue wants 30-70 Dice on the targets before adaptation) with the measured
seconds per iteration.

Use with the benchmark:
    asfda benchmark --scenario ct-shift --model Resources/BenchmarkModels/ct_source_batch.pt --validation 12 \
        --lr 1e-3 --iterations 400 --out bench-ct
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ASFDALib.adaptation.patches import Case
from ASFDALib.adaptation.recipe import FinetuneConfig
from ASFDALib.adaptation.trainer import Trainer
from ASFDALib.atomic import atomic_write_json
from ASFDALib.bench.anatomy import RICH_CLASS_NAMES
from ASFDALib.bench.phantoms import SITES, PhantomConfig
from ASFDALib.bench.scenarios import TARGET_SITES, make_source_volume, target_config
from ASFDALib.data.preprocess import preprocess, preprocess_label
from ASFDALib.data.volumes import Volume, write_nifti
from ASFDALib.models.card import IntensityConfig, ModelCard, NetworkSpec, save_card
from ASFDALib.models.loading import build_network, load_model

INTENSITY = {
    "ct": IntensityConfig(mode="ct", a_min=-200.0, a_max=300.0),  # an abdominal window, as CT models use
    "percentile": IntensityConfig(mode="percentile", lower=0.5, upper=99.5),  # for the CT -> MRI use
}


NETWORKS = {
    # MONAI's UNet: residual units, a 3x3x3 transposed-convolution head.
    "unet": lambda norm: NetworkSpec(
        "UNet",
        {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": len(RICH_CLASS_NAMES),
            "channels": [16, 32, 64, 128],
            "strides": [2, 2, 2],
            "num_res_units": 2,
            "norm": norm,
        },
    ),
    # nnU-Net's layout (DynUNet): plain conv blocks and a pointwise (1x1x1) output head, the head whose weight
    # rows the prototype knowledge reads (docs/method.md "Source knowledge without BatchNorm").
    "dynunet": lambda norm: NetworkSpec(
        "DynUNet",
        {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": len(RICH_CLASS_NAMES),
            "kernel_size": [3, 3, 3, 3],
            "strides": [1, 2, 2, 2],
            "upsample_kernel_size": [2, 2, 2],
            "filters": [16, 32, 64, 128],
            "norm_name": norm,
        },
    ),
}


def model_name(arch: str, norm: str, intensity: str = "ct") -> str:
    """File stem of a trained variant: ``ct_source_NORM`` for the UNet (the benchmark's default), else
    ``ct_source_ARCH_NORM``; ``_percentile`` appended for the CT -> MRI model (so it never replaces the
    CT-windowed one)."""
    stem = f"ct_source_{norm}" if arch == "unet" else f"ct_source_{arch}_{norm}"
    return stem if intensity == "ct" else f"{stem}_{intensity}"


def check_targets(intensity: str) -> dict[str, PhantomConfig]:
    """The target sites a variant is checked on: the CT hospitals H1-H3 for the CT-windowed model, the
    three MRI sites of the ``mri-rich`` scenario (rich anatomy) for the percentile-normalised one."""
    if intensity == "ct":
        return {site: target_config(site) for site in TARGET_SITES}
    return {site: replace(config, anatomy="rich") for site, config in SITES.items()}


def make_card(norm: str, intensity: str, arch: str = "unet") -> ModelCard:
    stem = model_name(arch, norm, intensity)
    return ModelCard(
        name=stem.replace("_", "-"),
        description=f"Foundation-like CT source model ({arch}, {norm} norm), benchmarks/train_source_model.py, "
        "rich anatomy.",
        class_names=RICH_CLASS_NAMES,
        spacing=(2.0, 2.0, 2.0),
        roi_size=(48, 48, 48),
        intensity=INTENSITY[intensity],
        network=NETWORKS[arch](norm),
        source_stats=f"{stem}_stats.npz",
        sw_batch_size=4,
    )


def to_case(name: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray, card: ModelCard) -> Case:
    """A generated volume at the model's spacing and intensity scale (what load_case does for files)."""
    x = preprocess(Volume(image, affine, Path(name)), card).numpy()
    return Case(name, x, preprocess_label(label, affine, card))


def check(network, card: ModelCard, count: int, seed: int, device: str, targets: dict[str, PhantomConfig]) -> dict:
    """Mean Dice (percent) per foreground class and overall on ``count`` fresh volumes of the source
    distribution and of each target site in ``targets``."""
    from ASFDALib.bench.benchmark import evaluate
    from ASFDALib.bench.phantoms import make_phantom
    from ASFDALib.bench.statistics import case_mean

    holder = SimpleNamespace(card=card)  # evaluate() reads only the model's card
    groups = {"source": [to_case(f"s{i}", *make_source_volume(seed + 500_000 + i), card) for i in range(count)]}
    for site, config in targets.items():
        groups[site] = [
            to_case(f"{site}{i}", *make_phantom(seed + 600_000 + 1000 * len(groups) + i, config), card)
            for i in range(count)
        ]
    report = {}
    for name, cases in groups.items():
        per_class = evaluate(holder, network, cases, device)
        report[name] = {"mean_dice": 100 * case_mean(per_class), "per_class": [100 * v for v in per_class]}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--norm", choices=("batch", "instance", "both"), default="both")
    parser.add_argument("--arch", choices=tuple(NETWORKS), default="unet", help="network layout (default: %(default)s)")
    parser.add_argument("--volumes", type=int, default=200, help="source volumes (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=3000, help="training iterations (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--intensity", choices=tuple(INTENSITY), default="ct")
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--check", type=int, default=4, help="volumes per site for the Dice check (0: none)")
    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--out", type=Path, default=root / "Resources" / "BenchmarkModels")
    parser.add_argument(
        "--work", type=Path, default=root / "runs" / "source-models", help="checkpoints to resume from (not shipped)"
    )
    args = parser.parse_args(argv)
    norms = ("batch", "instance") if args.norm == "both" else (args.norm,)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    raw = [make_source_volume(args.seed * 10_000 + i) for i in range(args.volumes)]
    print(f"{args.volumes} source volumes generated ({time.perf_counter() - start:.0f} s)", flush=True)
    for norm in norms:
        card, stem = make_card(norm, args.intensity, args.arch), model_name(args.arch, norm, args.intensity)
        cases = [to_case(f"source_{i:04d}", *volume, card) for i, volume in enumerate(raw)]
        network = build_network(card.network)
        config = FinetuneConfig(
            batch_size=args.batch_size,
            lr=args.lr,
            encoder_lr_scale=1.0,  # from scratch: every layer learns at the same rate
            checkpoint_every=250,
            seed=args.seed,
            device=args.device,
        )
        trainer = Trainer(network, card, config, args.work / stem)
        resumed = trainer.load()
        first = trainer.iteration
        t0 = time.perf_counter()

        def report(p, norm=norm) -> None:
            if p.iteration % 50 == 0 or p.iteration == p.total:
                print(
                    f"[{norm}] iteration {p.iteration}/{p.total} loss {p.loss:.4f} eta {p.eta_s / 60:.1f} min",
                    flush=True,
                )

        trainer.run(cases, args.iterations, progress=report)
        ran = trainer.iteration - first
        # a resumed run that had nothing left to train measured no iteration
        seconds_per_iteration = (time.perf_counter() - t0) / ran if ran else None
        weights = args.out / f"{stem}.pt"
        import torch

        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, weights)
        save_card(card, args.out / f"{stem}.card.json")
        model = load_model(weights)
        from ASFDALib.query.source_stats import compute_source_stats

        with tempfile.TemporaryDirectory() as tmp:
            for i in range(min(8, args.volumes)):
                image, _, affine = raw[i]
                write_nifti(Path(tmp) / f"source_{i:03d}.nii.gz", np.round(image).astype(np.int16), affine)
            compute_source_stats(model, Path(tmp), args.out / card.source_stats, device=args.device)
        summary = {
            "arch": args.arch,
            "norm": norm,
            "intensity": args.intensity,
            "volumes": args.volumes,
            "iterations": args.iterations,
            "resumed_from": first if resumed else 0,
            "seconds_per_iteration": seconds_per_iteration,
            "weights_mb": weights.stat().st_size / 2**20,
            "command": " ".join(
                ["python", "benchmarks/train_source_model.py", *(argv if argv is not None else sys.argv[1:])]
            ),
        }
        if args.check:
            summary["dice"] = check(
                model.network, card, args.check, args.seed, args.device, check_targets(args.intensity)
            )
        atomic_write_json(args.out / f"{stem}_check.json", summary)
        print(json.dumps(summary, indent=2), flush=True)
    print(f"wrote {args.out} ({(time.perf_counter() - start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
