"""The ``asfda`` command line: rank a folder of volumes, compute a source-statistics file, make phantoms."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import ASFDAError

RANK_EXAMPLES = """
examples:
  asfda rank
      rank the built-in sample MRI pool with the built-in model (a first look, ~1 minute on a CPU)
  asfda rank --model bundles/spleen_ct_segmentation --images /data/target_mri --budget 8 --out ~/asfda/liver
      rank a folder with a MONAI bundle; results in ~/asfda/liver/ranking.{csv,json,png}
  asfda rank --model unet.pt --network UNet --network-args '{"spatial_dims":3,"in_channels":1,
             "out_channels":4,"channels":[16,32,64,128],"strides":[2,2,2]}' --card card.json --images scans/
      a plain state dict plus the MONAI network it belongs to
  asfda rank --out ~/asfda/liver --alpha 0.8
      re-rank with more weight on DKD: instant, every volume's sweep is cached in the session folder

What is computed: one sliding-window pass per volume gives DKD (knowledge gap to the source model x
diversity against the query and labelled volumes, temperature-scaled) and ASD (class-balanced entropy
inside the adaptive foreground). score = alpha * pct(DKD) + (1 - alpha) * pct(ASD); the query is built
greedily. Unreadable volumes are skipped and listed with the reason; the exit code is 1 only when no
volume could be scored.
"""


def _add_model_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        type=Path,
        required=required,
        help="MONAI bundle folder, TorchScript file, or state dict (.pt/.pth); default: the built-in small model",
    )
    group.add_argument(
        "--card",
        type=Path,
        help="model card (JSON/YAML: class_names, spacing, roi_size, intensity); "
        "default: <model>.card.json or asfda_card.json / model_card.json beside the model",
    )
    group.add_argument("--network", help="MONAI network class for a state dict, e.g. UNet, SegResNet, SwinUNETR")
    group.add_argument("--network-args", default="{}", help="JSON constructor arguments for --network")
    group.add_argument(
        "--trust",
        action="store_true",
        help="allow formats that run code from the file (TorchScript, pickled checkpoints, bundle configs with "
        "custom _target_); only for files from people you trust",
    )
    group.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1")


def _load_model(args: argparse.Namespace):
    from .defaults import default_model_path
    from .modelcard import NetworkSpec
    from .models import load_model

    spec = None
    if args.network:
        try:
            spec = NetworkSpec(args.network, json.loads(args.network_args))
        except json.JSONDecodeError as exc:
            raise ASFDAError(f"--network-args is not valid JSON ({exc})") from None
    return load_model(args.model or default_model_path(), args.card, spec, args.trust)


def _progress(console, label: str):
    """A rich progress bar (volume i/N, elapsed, ETA) and the callback that drives it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("volumes"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[name]}"),
        console=console,
    )
    task = bar.add_task(label, total=None, name="")

    def update(done: int, total: int, name: str) -> None:
        bar.update(task, completed=done, total=total, name=name)

    return bar, update


def cmd_rank(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .defaults import sample_images
    from .ranking import RankConfig, rank_folder
    from .report import ranking_table, write_ranking

    console = Console(stderr=False)
    out = Path(args.out)
    images = args.images
    if images is None:
        images = sample_images(out / "sample_data")
        console.print(f"No --images given: using the built-in sample MRI-like pool in {images}")
    model = _load_model(args)
    console.print(
        f"Model: {model.card.name} ({model.kind}, {model.card.num_classes} classes: "
        f"{', '.join(model.card.class_names[1:])})"
    )
    config = RankConfig(
        budget=args.budget,
        alpha=args.alpha,
        strategy=args.strategy,
        knowledge=args.knowledge,
        device=args.device,
        seed=args.seed,
        recursive=args.recursive,
        mc_passes=args.mc_passes,
    )
    start = time.perf_counter()
    bar, update = _progress(console, "Scoring")
    with bar:
        ranking = rank_folder(Path(images), model, out / "cache", config, update)
    written = write_ranking(ranking, out)
    console.print(ranking_table(ranking, args.show))
    scored = sum(r.status == "scored" for r in ranking.rows)
    cached = sum(r.cached for r in ranking.records)
    console.print(
        f"Source knowledge: {ranking.knowledge.describe()}. {scored} scored ({cached} from cache), "
        f"{len(ranking.skipped)} skipped, {time.perf_counter() - start:.1f} s."
    )
    console.print("Query: " + ", ".join(r.file for r in ranking.selected))
    console.print("Wrote " + ", ".join(str(p) for p in written.values()))
    if scored == 0:
        console.print("[red]No volume could be scored; see the reasons above.[/red]")
        return 1
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .source_stats import compute_source_stats

    console = Console()
    model = _load_model(args)
    bar, update = _progress(console, "Summarising")
    with bar:
        pooled, skipped = compute_source_stats(model, args.images, args.out, args.device, args.recursive, update)
    for reason in skipped:
        console.print(f"[yellow]skipped {reason}[/yellow]")
    console.print(
        f'Wrote {args.out}: {len(pooled.layers)} layers. Add "source_stats": "{args.out.name}" '
        "to the model card and keep the file beside the model."
    )
    return 0


def cmd_phantoms(args: argparse.Namespace) -> int:
    from .phantoms import write_phantoms

    paths = write_phantoms(args.out, args.count, args.domain, args.seed, labels=not args.no_labels)
    print(
        f"Wrote {len(paths)} {args.domain} phantoms to {args.out / 'images'}"
        + ("" if args.no_labels else f" and labels to {args.out / 'labels'}")
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .selection import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="asfda",
        description="Adapt a medical vision foundation model to a new hospital's scans with few labels: "
        "rank unlabeled volumes by DKD + ASD, label the query, fine-tune.",
        epilog="Run 'asfda COMMAND --help' for the options and examples of each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rank = sub.add_parser(
        "rank",
        help="rank a folder of unlabeled target volumes and pick the query",
        description="Rank unlabeled target volumes by the combined DKD/ASD score and pick the ones to label.",
        epilog=RANK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(rank)
    rank.add_argument(
        "--images",
        type=Path,
        help="folder of volumes (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, "
        "DICOM series folders); default: a built-in sample pool",
    )
    rank.add_argument("--recursive", action="store_true", help="also search sub-folders")
    rank.add_argument(
        "--out",
        type=Path,
        default=Path("asfda-session"),
        help="session folder for ranking.csv/json/png and the score cache (default: %(default)s)",
    )
    rank.add_argument("--budget", type=int, default=4, help="how many volumes to query (default: %(default)s)")
    rank.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="weight of DKD against ASD in [0, 1]; 1 = DKD only (default: %(default)s)",
    )
    rank.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="asfda",
        help="asfda (DKD+ASD, default), dkd, asd, or a baseline: random, fg-random (random among "
        "volumes with predicted foreground), entropy (whole volume), epistemic (MC dropout), coreset",
    )
    rank.add_argument(
        "--knowledge",
        choices=("auto", "bn", "stats", "energy"),
        default="auto",
        help="source knowledge for DKD: BatchNorm statistics, the card's source-statistics file, "
        "or free energy; auto picks the first available (default: %(default)s)",
    )
    rank.add_argument("--mc-passes", type=int, default=5, help="MC-dropout passes for --strategy epistemic")
    rank.add_argument("--seed", type=int, default=0, help="seed of the random baselines (default: %(default)s)")
    rank.add_argument("--show", type=int, default=30, help="rows shown in the terminal table (default: %(default)s)")
    rank.set_defaults(func=cmd_rank)

    stats = sub.add_parser(
        "stats",
        help="compute a source-statistics file from source-domain volumes (for model providers)",
        description="Summarise source-domain volumes into per-channel feature statistics (no images or labels "
        "leave your site) so that users of the model get DKD's knowledge-gap term.",
        epilog="example:\n  asfda stats --model unet.pt --images /data/source_ct --out source_stats.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(stats)
    stats.add_argument("--images", type=Path, required=True, help="folder of source-domain volumes")
    stats.add_argument("--out", type=Path, required=True, help="output .npz file")
    stats.add_argument("--recursive", action="store_true", help="also search sub-folders")
    stats.set_defaults(func=cmd_stats)

    phantoms = sub.add_parser(
        "phantoms",
        help="generate labelled abdominal phantoms (CT-like source or MRI-like target)",
        epilog="example:\n  asfda phantoms --domain mri --count 20 --out pool/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    phantoms.add_argument("--out", type=Path, required=True, help="writes OUT/images and OUT/labels")
    phantoms.add_argument("--count", type=int, default=10)
    phantoms.add_argument("--domain", choices=("ct", "mri"), default="mri")
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.add_argument("--no-labels", action="store_true")
    phantoms.set_defaults(func=cmd_phantoms)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ASFDAError as exc:
        print(f"asfda {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished volumes are cached and a re-run resumes from there", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
