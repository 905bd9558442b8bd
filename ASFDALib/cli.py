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


MAP_HELP = (
    "file label values -> model classes: VALUE=CLASS terms separated by , or ; where VALUE is a number, "
    "a range (41-48) or * (every value not listed) and CLASS a class number or name from the card; "
    "values before an = share it, e.g. '41-48=2,49,50=vertebral body,*=0'"
)


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
    from contextlib import nullcontext

    from rich.console import Console

    from . import distributed
    from .defaults import sample_images
    from .ranking import RankConfig, rank_folder
    from .report import ranking_table, write_ranking
    from .rounds import ranking_model, record_round
    from .session import Session

    distributed.init_from_env(args.device)
    main_rank = distributed.is_main()
    console = Console(quiet=not main_rank)
    out = Path(args.out)
    session = Session.open(out, create=True)
    with session if main_rank else nullcontext(session):  # only rank 0 writes the session
        images = args.images
        if images is None and session.data.get("images"):
            images = session.image_root
        if images is None:
            if main_rank:
                sample_images(out / "sample_data")
            distributed.barrier()
            images = out / "sample_data" / "images"
            console.print(f"No --images given: using the built-in sample MRI-like pool in {images}")
        model, knowledge = ranking_model(session, lambda: _load_model(args), args.model is not None, args.knowledge)
        adapted = "+" in model.digest
        console.print(
            f"Model: {model.card.name} ({model.kind}{', adapted in this session' if adapted else ''}, "
            f"{model.card.num_classes} classes: {', '.join(model.card.class_names[1:])})"
            + (f"; {distributed.world()} processes" if distributed.world() > 1 else "")
        )
        config = RankConfig(
            budget=args.budget,
            alpha=args.alpha,
            strategy=args.strategy,
            knowledge=args.knowledge,
            device=distributed.device_for_rank(args.device),
            seed=args.seed,
            recursive=args.recursive,
            mc_passes=args.mc_passes,
        )
        start = time.perf_counter()
        bar, update = _progress(console, "Scoring")
        with bar:
            ranking = rank_folder(
                Path(images), model, out / "cache", config, update, set(session.labelled()), knowledge
            )
        if not main_rank:
            return 0
        written = write_ranking(ranking, out)
        strategy = {"name": args.strategy, "alpha": args.alpha, "budget": args.budget, "seed": args.seed}
        record_round(session, model, ranking, Path(images), strategy, bool(args.trust), args.recursive)
    console.print(ranking_table(ranking, args.show))
    for note in (n for r in ranking.records for n in r.notes):
        console.print(f"[yellow]{note}[/yellow]")
    scored = sum(r.status == "scored" for r in ranking.rows)
    cached = sum(r.cached for r in ranking.records)
    console.print(
        f"Source knowledge: {ranking.knowledge.describe()}. {scored} scored ({cached} from cache), "
        f"{len(ranking.skipped)} skipped, {time.perf_counter() - start:.1f} s."
    )
    console.print("Query: " + ", ".join(r.file for r in ranking.selected))
    console.print("Wrote " + ", ".join(str(p) for p in written.values()))
    if scored == 0 and not any(r.status == "labelled" for r in ranking.rows):
        console.print("[red]No volume could be scored; see the reasons above.[/red]")
        return 1
    console.print(
        f"Next: label the query, then 'asfda labels import {out} --from LABEL_DIR' and 'asfda finetune {out}'."
    )
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


def cmd_labels(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .labels import import_labels, parse_mapping, resolve_cases
    from .session import Session

    words = list(args.words)
    action = words.pop(0) if words and words[0] in ("import", "status") and len(words) > 1 else "status"
    if len(words) != 1:
        raise ASFDAError("usage: asfda labels SESSION | asfda labels import SESSION --from DIR_OR_FILE")
    console = Console()
    if action == "import":
        if args.source is None:
            raise ASFDAError("asfda labels import needs --from DIR_OR_FILE")
        if args.all and args.cases:
            raise ASFDAError("give --all or --cases, not both")
        with Session.open(words[0]) as session:
            class_names = session.data["model"]["card"]["class_names"]
            mapping = parse_mapping(args.map, class_names)
            cases = (
                session.image_names()
                if args.all
                else resolve_cases(session, _split(args.cases))
                if args.cases
                else None
            )
            report = import_labels(session, args.source, class_names, mapping, cases)
            session.save()
        for line in report.lines(queried_only=cases is None):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return 0 if report.imported or not (report.refused or report.skipped) else 1
    session = Session.open(words[0])
    labelled = session.labelled()
    table = Table(title=f"Labels in {session.root}")
    for column in ("round", "image", "label file"):
        table.add_column(column)
    queried = session.queried()
    for entry in session.rounds:
        for name in entry["query"]:
            path = labelled.get(name)
            table.add_row(str(entry["index"]), name, session.relative(path) if path else "[red]missing")
    console.print(table)
    missing = [n for n in queried if n not in labelled]
    console.print(
        f"{len(queried) - len(missing)} of {len(queried)} queried volumes labelled"
        + (f"; missing: {', '.join(missing)}" if missing else "; ready for 'asfda finetune'")
    )
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_finetune(args: argparse.Namespace) -> int:
    import threading

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .adapt import finetune_session
    from .finetune import FinetuneConfig
    from .session import Session

    console = Console()
    config = FinetuneConfig(
        iterations=args.iterations,
        pseudo_iterations=args.pseudo_iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        device=args.device,
        keep_fraction=args.keep_fraction,
        confidence=args.confidence,
    )
    bar = Progress(
        TextColumn("[bold]{task.fields[stage]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f} {task.fields[val]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
    task = bar.add_task("finetune", total=None, stage="stage 1", loss=float("nan"), val="")

    def progress(p) -> None:
        val = "" if p.val_dice is None else f"val Dice {p.val_dice:.3f}"
        stage = "stage 1 (labels)" if p.stage == "stage1" else "stage 2 (+ pseudo-labels)"
        bar.update(task, completed=p.iteration, total=p.total, stage=stage, loss=p.loss, val=val)

    from contextlib import nullcontext

    from . import distributed

    distributed.init_from_env(args.device)
    if not distributed.is_main():
        console.quiet = True
    cancel = threading.Event()
    session = Session.open(args.session)
    with session if distributed.is_main() else nullcontext(session), bar:
        try:
            result = finetune_session(
                session,
                config,
                pseudo=not args.no_pseudo,
                resume=args.resume,
                cancel=cancel,
                progress=progress,
                on_status=console.print,
            )
        except KeyboardInterrupt:
            console.print("interrupted; the last checkpoint is kept: re-run with --resume to continue")
            return 130
    if result.kept:
        console.print(f"Pseudo-labelled (most reliable first): {', '.join(result.kept)}")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    console.print(f"Fine-tuning {result.status} ({times}). Adapted weights: {result.checkpoint}")
    console.print(
        f"Next: 'asfda predict {args.session} --images DIR --out DIR', or 'asfda rank --out "
        f"{args.session}' for the next round."
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .adapt import predict_folder, session_model
    from .session import Session

    console = Console()
    model = session_model(Session.open(args.session), adapted=not args.source_model)
    bar, update = _progress(console, "Predicting")
    with bar:
        written, skipped = predict_folder(model, args.images, args.out, args.device, update)
    for reason in skipped:
        console.print(f"[yellow]skipped {reason}[/yellow]")
    console.print(f"Wrote {len(written)} label maps to {args.out}")
    return 0 if written else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    import math

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .evaluate import evaluate_folders, foreign_warning, summary_rows, write_csv
    from .labels import parse_mapping
    from .modelcard import load_card
    from .session import Session

    if args.card:
        names = load_card(args.card).class_names
    elif args.session:
        names = list(Session.open(args.session).data["model"]["card"]["class_names"])
    else:
        names = None
    scores = evaluate_folders(args.pred, args.labels, names, parse_mapping(args.map, names))
    console = Console()
    if names is None:
        names = ["background", *[f"class{i}" for i in range(1, max(len(s.dice) for s in scores) + 1)]]
        console.print("no class names: give --session or --card (classes taken from the predictions' values)")
    for score in scores:
        if score.foreign:
            console.print(f"[yellow]warning[/yellow] {escape(foreign_warning(score, names))}", soft_wrap=True)
    rows = summary_rows(scores, names)
    table = Table(title="Dice / HD95 (mm) per class")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(
            *[("" if math.isnan(v) else f"{v:.3f}") if isinstance(v, float) else str(v) for v in row.values()]
        )
    console.print(table)
    out = args.out or Path(args.pred) / "evaluation.csv"
    print(f"Wrote {write_csv(rows, out)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .adapt import session_model
    from .export import export_bundle, export_torchscript
    from .session import Session

    model = session_model(Session.open(args.session), adapted=True)
    if args.format == "bundle":
        path = export_bundle(model, args.out)
    else:
        path = export_torchscript(model, args.out if args.out.suffix else args.out / "model.ts")
    print(f"Exported {args.format} to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .defaults import default_model_path
    from .demo import DemoConfig, run_demo

    console = Console()
    config = DemoConfig(
        pool=args.pool, test=args.test, budget=args.budget, iterations=args.iterations, device=args.device
    )
    bar = Progress(
        TextColumn("[bold]Demo"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    )
    task = bar.add_task("starting", total=1.0)
    with bar:
        report = run_demo(
            args.out,
            default_model_path(),
            config,
            lambda text, fraction: bar.update(task, completed=fraction, description=text),
        )
    console.print((args.out / "demo.md").read_text())
    gain = 100 * (report["mean_dice"]["asfda"] - report["mean_dice"]["random"])
    console.print(
        f"ASFDA vs random selection with the same {config.budget} labels: {gain:+.1f} Dice points. "
        f"{report['seconds'] / 60:.1f} min."
    )
    console.print(f"Plots: {args.out}/demo.png, {args.out}/session/ranking.png. Session: {args.out}/session")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from rich.console import Console

    from .benchmark import BenchmarkConfig, run_benchmark
    from .defaults import default_model_path

    console = Console()
    config = BenchmarkConfig.quick() if args.quick else BenchmarkConfig()
    overrides = {
        k: v
        for k, v in (
            ("pool", args.pool),
            ("test", args.test),
            ("iterations", args.iterations),
            ("budgets", args.budgets and tuple(args.budgets)),
            ("seeds", args.seeds and tuple(range(args.seeds))),
        )
        if v
    }
    config = replace(config, device=args.device, **overrides)
    bar, update = _progress(console, "Benchmark")
    with bar:
        report = run_benchmark(args.out, config, args.model or default_model_path(), update, not args.report_only)
    console.print((args.out / "benchmark.md").read_text())
    console.print(
        f"{report['wall_seconds'] / 60:.1f} min; wrote {args.out}/benchmark.json, benchmark.md, benchmark.png"
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

    labels = sub.add_parser(
        "labels",
        help="show which queried volumes are labelled, or import label files into a session",
        epilog="examples:\n  asfda labels ~/asfda/liver\n"
        "  asfda labels import ~/asfda/liver --from ~/exports/labels --map 7=1,8=2\n"
        "  asfda labels import ~/spine --from derivatives/ --map '41-48=2,49,50=vertebral body,*=0'\n"
        "  asfda labels import ~/asfda/liver --from late_labels/ --cases case12.nii.gz   # one not queried\n\n"
        "Only the labels of queried volumes are imported unless --all or --cases says otherwise: every other\n"
        "unlabeled volume stays in the pool that fine-tuning pseudo-labels.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    labels.add_argument("words", nargs="+", metavar="[import] SESSION")
    labels.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="label file or folder to import; files pair with images by case name: case_seg, case_mask, "
        "case.seg.nrrd for the image case; case for nnU-Net's case_0000; BIDS names by their entities "
        "(the suffix and seg/desc entities ignored); a label that fits no image or several is refused",
    )
    labels.add_argument("--map", help=MAP_HELP)
    labels.add_argument("--all", action="store_true", help="import labels of every volume, not only the queried ones")
    labels.add_argument(
        "--cases", help="comma-separated images to import labels for (default: the volumes queried so far)"
    )
    labels.set_defaults(func=cmd_labels)

    finetune = sub.add_parser(
        "finetune",
        help="fine-tune the session's model on its labels plus reliable pseudo-labels",
        description="Stage 1 on the labelled volumes; then the most reliable unlabeled volumes get pseudo-labels "
        "(low-confidence voxels ignored) and stage 2 trains on both. Checkpoints every --checkpoint-every "
        "iterations; Ctrl-C keeps the last one and --resume continues with the same data order.",
        epilog="examples:\n  asfda finetune ~/asfda/liver\n  asfda finetune ~/asfda/liver --iterations 500 --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_argument("session", type=Path)
    finetune.add_argument("--iterations", type=int, default=200, help="stage-1 iterations (default: %(default)s)")
    finetune.add_argument(
        "--pseudo-iterations", type=int, default=200, help="stage-2 iterations (default: %(default)s)"
    )
    finetune.add_argument("--no-pseudo", action="store_true", help="stage 1 only (no pseudo-labels)")
    finetune.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    finetune.add_argument("--batch-size", type=int, default=2)
    finetune.add_argument("--lr", type=float, default=1e-3, help="decoder learning rate; the encoder gets 0.1x")
    finetune.add_argument("--checkpoint-every", type=int, default=50)
    finetune.add_argument(
        "--keep-fraction",
        type=float,
        default=0.5,
        help="share of the unlabeled pool that gets pseudo-labels (default: %(default)s)",
    )
    finetune.add_argument(
        "--confidence",
        type=float,
        default=0.9,
        help="voxels below this probability are ignored in pseudo-labels (default: %(default)s)",
    )
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--device", default="auto")
    finetune.set_defaults(func=cmd_finetune)

    predict = sub.add_parser(
        "predict",
        help="label maps for a folder, in each input's own grid and format",
        epilog="example:\n  asfda predict ~/asfda/liver --images /data/new --out /data/pred",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("session", type=Path)
    predict.add_argument("--images", type=Path, required=True)
    predict.add_argument("--out", type=Path, required=True)
    predict.add_argument("--source-model", action="store_true", help="use the model before adaptation")
    predict.add_argument("--device", default="auto")
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser(
        "evaluate",
        help="Dice and HD95 per class of predictions against reference labels",
        epilog="examples:\n  asfda evaluate --pred /data/pred --labels /data/gt --session ~/asfda/liver\n"
        "  asfda evaluate --pred pred/ --labels raw_gt/ --card card.json --map '41-48=2,49,50=vertebral body,*=0'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--pred", type=Path, required=True, help="folder of predicted label maps")
    evaluate.add_argument("--labels", type=Path, required=True, help="folder of reference labels (paired by case name)")
    classes = evaluate.add_mutually_exclusive_group()
    classes.add_argument("--session", type=Path, help="session folder: class names from its model card")
    classes.add_argument("--card", type=Path, help="model card, for class names")
    evaluate.add_argument("--map", help="for the reference labels: " + MAP_HELP)
    evaluate.add_argument("--out", type=Path, help="CSV path (default: PRED/evaluation.csv)")
    evaluate.set_defaults(func=cmd_evaluate)

    export = sub.add_parser(
        "export",
        help="write the adapted model as a MONAI bundle or TorchScript",
        epilog="example:\n  asfda export ~/asfda/liver --format bundle --out liver_bundle/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("session", type=Path)
    export.add_argument("--format", choices=("bundle", "torchscript"), default="bundle")
    export.add_argument("--out", type=Path, required=True)
    export.set_defaults(func=cmd_export)

    demo = sub.add_parser(
        "demo",
        help="the whole method on the built-in model in a few minutes (ground truth plays the clinician)",
        description="Generates a 3-site MRI-like pool, ranks it, takes the ground truth of the query as the "
        "clinician's labels, fine-tunes with selective pseudo-labels, and reports test Dice of the source model, "
        "of random selection with the same budget, and of ASFDA.",
        epilog="example:\n  asfda demo --out asfda-demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", type=Path, default=Path("asfda-demo"), help="output folder (default: %(default)s)")
    demo.add_argument("--pool", type=int, default=24)
    demo.add_argument("--test", type=int, default=8)
    demo.add_argument("--budget", type=int, default=4)
    demo.add_argument("--iterations", type=int, default=200, help="per fine-tuning stage (default: %(default)s)")
    demo.add_argument("--device", default="auto")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser(
        "benchmark",
        help="the active-learning benchmark: every strategy, budgets x seeds, on multi-site phantoms",
        description="Pool of 40 MRI-like target volumes from three sites (10%% rare subgroups), 20 test volumes, "
        "budgets 2/4/8, 5 seeds; every strategy fine-tuned with the same recipe. Resumes if interrupted.",
        epilog="examples:\n  asfda benchmark --out bench/            # the full protocol (~1.5 h on 2 CPU cores)\n"
        "  asfda benchmark --quick --out /tmp/b    # a smoke run (seconds)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--out", type=Path, required=True)
    bench.add_argument("--quick", action="store_true", help="1 seed, budget 2, a few iterations: checks that it runs")
    bench.add_argument("--model", type=Path, help="state dict with a card (default: the built-in model)")
    bench.add_argument("--pool", type=int)
    bench.add_argument("--test", type=int)
    bench.add_argument("--budgets", type=int, nargs="+")
    bench.add_argument("--seeds", type=int, help="number of seeds")
    bench.add_argument("--iterations", type=int, help="fine-tuning iterations per run (default 300)")
    bench.add_argument("--device", default="auto")
    bench.add_argument(
        "--report-only",
        action="store_true",
        help="summarise the runs already in OUT/results.json (e.g. of an unfinished benchmark)",
    )
    bench.set_defaults(func=cmd_benchmark)

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
