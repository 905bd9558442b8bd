"""What each ``asfda`` command does, once its arguments are parsed (:mod:`ASFDALib.app.cli` parses them).

Engine modules are imported inside each command, so ``asfda --help`` and argument errors answer at
once instead of after torch and MONAI have loaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from ASFDALib.app.progress import stage_progress, training_progress, volume_progress
from ASFDALib.errors import ASFDAError, as_arg, interrupted_exit_code
from ASFDALib.outputs import is_session_folder

if TYPE_CHECKING:  # the benchmark imports torch: only the commands that run it load it
    from ASFDALib.bench.benchmark import BenchmarkConfig, Folders


# a line holding a command to copy: never wrapped at the terminal's width, nor coloured in parts by rich
WHOLE_LINE = {"soft_wrap": True, "markup": False, "highlight": False}


def model_source(args: argparse.Namespace, default: Path | None = None):
    """The model the model options name (``default``: where --model is not given; else the built-in one)."""
    from ASFDALib.models.card import NetworkSpec
    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.loading import ModelSource

    spec = NetworkSpec(args.network, args.network_args) if args.network else None  # args parsed as JSON
    path = Path(args.model or default or default_model_path())
    return ModelSource(path, args.card, spec, args.trust, getattr(args, "class_map", None))


def load_model_from_args(args: argparse.Namespace):
    return model_source(args).load()


NOTHING_SCORED = -1  # _rank's result where no volume could be scored (the command exits 1)

# what a new session writes into its folder (session.json itself aside)
SESSION_WRITES = ("ranking.csv", "ranking.json", "ranking.png", "rankings", "labels", "cache", "checkpoints")


def cmd_rank(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ASFDALib import distributed
    from ASFDALib.outputs import refuse_same_folder

    distributed.init_from_env(args.device)
    main_rank = distributed.is_main()
    console = Console(quiet=not main_rank)
    out = Path(args.out)
    if args.images is not None:
        refuse_same_folder(out, args.images, "--images", "give the session its own folder, e.g. --out asfda-session")
    first_rank = not is_session_folder(out)
    # a new session writes these into --out: in a folder that is no session they would be someone else's
    # (a file of notes, or a dataset's labels/ that the session's label versions would land among)
    # (a score cache alone is an interrupted first rank's: the same command resumes from it)
    clash = [n for n in SESSION_WRITES if first_rank and (out / n).exists() and not _resumable(out / n)]
    volumes = _volume_files(out) if first_rank else []
    if volumes:  # the scans' (or labels') own folder: the demo's sample data or a session would mix with them
        from ASFDALib.data.volumes import holds_label_maps

        # a labels folder is no folder of scans: --images is named only for scans
        labels = holds_label_maps(volumes)
        images = f"--images {as_arg(out)} " if args.images is None and not labels else ""
        example = as_arg(out.parent / "asfda-session")
        raise ASFDAError(
            f"{out}: holds {len(volumes)} {'label map' if labels else 'volume file'}(s) ({volumes[0].name}, ...), "
            f"and is no session: a session needs a folder of its own; give {images}--out a new folder, e.g. "
            f"--out {example}"
        )
    if clash:
        raise ASFDAError(
            f"{out / clash[0]}: exists, and {out} is no session: a new session would write there; "
            "give --out a new folder (or the session folder 'asfda rank --out' made)"
        )
    before = set(out.iterdir()) if out.is_dir() else None
    try:
        code = _rank(args, out, console, main_rank, first_rank)
    except ASFDAError:
        if first_rank and main_rank:  # a failed first rank leaves no half-made session behind
            _remove_new(out, before)
        raise
    if code == NOTHING_SCORED and first_rank and main_rank:  # nor one where no volume could be scored
        _remove_new(out, before)
        console.print(f"Nothing kept in {out}: fix the files above and run the same command again.")
    return 1 if code == NOTHING_SCORED else code


def _volume_files(folder: Path) -> list[Path]:
    from ASFDALib.data.volumes import discover_volumes

    return discover_volumes(folder) if folder.is_dir() else []


def _resumable(path: Path) -> bool:
    """Whether ``path``, in a folder without session.json, is what an interrupted first rank there left, from
    which the same command goes on: its score cache, or its ranking files (written just before session.json),
    which session.unrecorded_query knows as a rank's as it knows a later round's."""
    from ASFDALib.adaptation.session import unrecorded_query
    from ASFDALib.query.cache import is_score_cache

    if path.name == "cache":
        return is_score_cache(path)
    return path.name.startswith("ranking.") and path.is_file() and unrecorded_query(path.parent) is not None


def _names(names: list[str], shown: int = 8) -> str:
    """Class names for one line: all of a few, the first ``shown`` and a count of the rest otherwise."""
    if len(names) <= shown + 1:
        return ", ".join(names)
    return ", ".join(names[:shown]) + f" and {len(names) - shown} more"


def _remove_new(folder: Path, before: set[Path] | None) -> None:
    """Remove what a failed first rank created in ``folder`` (all of it when the folder itself is new), holding
    the session's lock: where another process holds it (a rank started beside this one, whose lock refused this
    one), what is new there is that process's, and stays."""
    from ASFDALib.adaptation.session import Session, SessionError

    try:
        held = Session(folder).lock()
    except SessionError:
        return
    try:
        if before is None:
            shutil.rmtree(folder, ignore_errors=True)
            return
        for path in set(folder.iterdir()) - before:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    finally:
        held.unlock()


def _rank(args: argparse.Namespace, out: Path, console, main_rank: bool, first_rank: bool) -> int:
    from ASFDALib import distributed
    from ASFDALib.adaptation.rounds import rank_round
    from ASFDALib.adaptation.session import Session
    from ASFDALib.models.defaults import sample_images
    from ASFDALib.query.ranking import RankConfig
    from ASFDALib.query.report import ranking_table

    session = Session.open(out, create=True)
    recorded = session.data.get("model")
    described = [
        o for o, v in (("--card", args.card), ("--class-map", args.class_map), ("--network", args.network)) if v
    ]
    if recorded and described and args.model is None:
        # they describe the model a session starts with; without --model they would silently do nothing
        raise ASFDAError(
            f"{out}: {' and '.join(described)} describe the model a session starts with, and this session keeps "
            f"{recorded['path']}'s; leave them out, or give them with --model {recorded['path']} to check they match "
            "(another model, card or class map needs another session: --out)"
        )
    with session if main_rank else nullcontext(session):  # only rank 0 writes the session
        images = args.images
        if images is None and session.data.get("images"):
            images = session.image_root
        if images is None:
            if main_rank:
                sample_images(out / "sample_data")
            distributed.barrier()
            images = out / "sample_data" / "images"
            console.print(
                f"No --images given: using the built-in sample MRI-like pool in {images} (its labels, to stand in "
                f"for a clinician's: {images.parent / 'labels'})"
            )

        def describe(model) -> None:
            adapted = "+" in model.digest
            name = model.card.name if model.card.name != "model" else model.path.name  # "model": the card named none
            console.print(
                f"Model: {name} ({model.kind}{', adapted in this session' if adapted else ''}, "
                f"{model.card.num_classes} classes: background + {_names(model.card.class_names[1:])})"
                + (f"; {distributed.world()} processes" if distributed.world() > 1 else "")
            )
            console.print(f"Input: {model.card.describe_input()}", markup=False, highlight=False, soft_wrap=True)
            if model.load_report is not None:  # what the checkpoint gave: loaded, newly initialised, ignored
                console.print(f"Weights: {model.load_report.summary}", markup=False, highlight=False, soft_wrap=True)
            if adapted:  # the load report is the pre-trained checkpoint's: name the weights that rank now
                console.print(
                    f"Fine-tuned weights: {session.adapted_checkpoint()}", markup=False, highlight=False, soft_wrap=True
                )

        # a re-rank (another alpha, say) queries as many as the session's last round did, unless told
        budget = args.budget or ((session.rounds[-1].get("strategy") or {}).get("budget") if session.rounds else None)
        config = RankConfig(
            budget=budget or RankConfig.budget,
            alpha=args.alpha,
            fusion=args.fusion,
            strategy=args.strategy,
            knowledge=args.knowledge,
            device=distributed.device_for_rank(args.device),
            seed=args.seed,
            recursive=args.recursive,
            mc_passes=args.mc_passes or RankConfig.mc_passes,
        )
        start = time.perf_counter()
        ranked_before = {r["index"] for r in session.rounds}  # so the output says which round it made or replaced
        bar, update = volume_progress(console, "Scoring")
        with bar:
            ranking, written = rank_round(
                session,
                Path(images),
                lambda: load_model_from_args(args),
                args.model,
                config,
                bool(args.trust),
                update,
                describe,
                card_given=args.card is not None,
            )
        if not main_rank:
            return 0
    console.print(ranking_table(ranking, args.show))
    for note in (n for r in ranking.records for n in r.notes):
        console.print(f"[yellow]{note}[/yellow]")
    for note in ranking.notes:  # e.g. a new head: round 1 ranks by DKD alone
        console.print(note, style="yellow", markup=False, highlight=False, soft_wrap=True)
    scored = {r.file for r in ranking.rows if r.status == "scored"}
    labelled = sum(r.status == "labelled" for r in ranking.rows)
    swept = [r for r in ranking.records if r.ok]  # the labelled volumes are swept too: diversity is to them
    console.print(
        f"Source knowledge: {ranking.knowledge.describe()}. {len(swept)} volumes swept "
        f"({sum(r.cached for r in swept)} from cache): {len(scored)} ranked, {labelled} labelled; "
        f"{len(ranking.skipped)} skipped; {time.perf_counter() - start:.1f} s."
    )
    added = [r.file for r in ranking.selected]
    kept = [n for n in (session.rounds[-1]["query"] if session.rounds else []) if n not in added]
    index = session.rounds[-1]["index"] if session.rounds else 1
    which = f"Round {index}'s query" + (" (ranked anew)" if index in ranked_before and added else "")
    console.print(
        f"{which}: "
        + (", ".join(added) or "nothing new")
        + (f" (labelled already: {', '.join(kept)})" if kept else ""),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if not scored and not labelled and first_rank:  # cmd_rank removes what it wrote
        console.print("[red]No volume could be scored; see the reasons above.[/red]")
        return NOTHING_SCORED
    console.print("Wrote " + ", ".join(str(p) for p in written.values()))
    for warning in written.warnings:  # e.g. no ranking.png: matplotlib missing; the ranking itself is written
        console.print(warning, style="yellow", markup=False, highlight=False, soft_wrap=True)
    if not scored and not labelled:
        console.print("[red]No volume could be scored; see the reasons above.[/red]")
        return 1
    if not scored:
        console.print(
            f"Every volume is labelled: nothing left to query. Next: 'asfda finetune {as_arg(out)}'.", **WHOLE_LINE
        )
        return 0
    if not added:
        console.print(
            f"The round's query of {len(kept)} is labelled. Next: 'asfda finetune {as_arg(out)}', or a re-rank with "
            f"--budget above {len(kept)} to query more.",
            **WHOLE_LINE,
        )
        return 0
    sample = out / "sample_data"
    labels = sample / "labels" if Path(images).resolve() == (sample / "images").resolve() else "LABEL_DIR"
    console.print(
        f"Next: label the query, then 'asfda labels import {as_arg(out)} --from {as_arg(labels)}' and "
        f"'asfda finetune {as_arg(out)}'.",
        **WHOLE_LINE,
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ASFDALib.data.volumes import kept_out_line, no_volumes_message, walk_pool
    from ASFDALib.models.loading import card_candidates
    from ASFDALib.outputs import refuse_existing, refuse_folder_as_file, refuse_inside_session, refuse_overwrite
    from ASFDALib.query.source_stats import compute_source_stats

    console = Console()
    # before the model loads and the pool is summarised; the example beside it, never among the scans
    refuse_folder_as_file(args.out, Path(args.out).parent / "source_stats.npz")
    walked = walk_pool(args.images, args.recursive)
    scans, others = walked.volumes, walked.others
    if not scans:  # as rank and predict refuse it: a wrong folder costs no model load
        raise ASFDAError(no_volumes_message(args.images, others, args.recursive, "summarise"))
    if walked.sessions:  # their label versions are no scans of the source domain
        console.print(kept_out_line(args.images, walked.sessions, "summarise"), style="yellow", **WHOLE_LINE)
    model = load_model_from_args(args)
    # the model, its card (given, or found beside it) and the scans: the summary goes beside them, never over one
    cards = ([Path(args.card)] if args.card else []) + card_candidates(model.path)
    protected = [*scans, model.path, *(c for c in cards if c.is_file())]
    refuse_overwrite([args.out], protected, "an input", "choose another --out file (.npz)")
    refuse_inside_session(args.out, "choose another --out file (.npz)")
    # never over earlier statistics: a card may name them (the model's own source knowledge)
    refuse_existing(args.out, "the file", "choose a new --out file (.npz), or remove the old one first")
    bar, update = volume_progress(console, "Summarising")
    with bar:
        pooled, skipped = compute_source_stats(model, args.images, args.out, args.device, args.recursive, update)
    for reason in skipped:
        console.print(f"[yellow]skipped {reason}[/yellow]")
    console.print(
        f'Wrote {args.out}: {len(pooled.layers)} layers. Add "source_stats": "{args.out.name}" '
        "to the model card and keep the file beside the model."
    )
    return 0


def labels_action(args: argparse.Namespace) -> tuple[str, list[str]]:
    """``asfda labels``'s action (status or import) and the words left (the session)."""
    words = list(args.words)
    action = words.pop(0) if words and words[0] in ("import", "status") and len(words) > 1 else "status"
    return action, words


def labels_argument_problem(args: argparse.Namespace) -> str:
    """What is wrong with the shape of an ``asfda labels`` command line, in a line ("" when nothing is): an
    argument error, which the parser answers with exit 2 before any session is opened."""
    action, words = labels_action(args)
    usage = "usage: asfda labels SESSION | asfda labels import SESSION --from DIR_OR_FILE"
    if len(words) == 2 and words[1] in ("import", "status"):  # the action after the session
        return f"'{words[1]}' comes first: 'asfda labels {words[1]} {as_arg(words[0])} ...' ({usage})"
    if len(words) != 1 or words == ["import"]:
        return usage
    if action == "status" and (args.source is not None or args.all or args.cases or args.map):
        return f"--from, --map, --all and --cases are for importing: 'asfda labels import {as_arg(words[0])} ...'"
    if action == "import" and args.source is None:
        return "asfda labels import needs --from DIR_OR_FILE"
    if args.all and args.cases:
        return "give --all or --cases, not both"
    return ""


def cmd_labels(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ASFDALib.adaptation.runs import finish_hint, labels_changed_since, newest_run, session_labels, unfinished_run
    from ASFDALib.adaptation.session import Session, unrecorded_query
    from ASFDALib.data.labels import import_labels, parse_mapping, resolve_cases

    action, words = labels_action(args)  # labels_argument_problem has refused every other shape while parsing
    console = Console()
    if action == "import":
        if is_session_folder(args.source) and not is_session_folder(words[0]):
            raise ASFDAError(
                f"{args.source} is the session and {words[0]} the labels, the wrong way round: "
                f"'asfda labels import {as_arg(args.source)} --from {as_arg(words[0])}'"
            )
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
            # import_labels saves session.json once, where it imported: its .bak is the session before the command
            report = import_labels(session, args.source, class_names, mapping, cases)
        for line in report.lines(queried_only=cases is None):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        if report.imported and (unfinished := unfinished_run(session)):  # the import may have changed its fix
            console.print(
                f"{unfinished[0].upper()}{unfinished[1:]}: {finish_hint(session)}", markup=False, soft_wrap=True
            )
        # An asked-for volume's label refused is an error even beside imported ones (a script must not go on to
        # fine-tune without it); a file of no asked-for volume is not, but finding nothing at all is, as --help says,
        # unless every asked-for volume is labelled already (a second import from a folder of the others' labels)
        found = report.imported or report.unchanged or report.nothing_left
        return 1 if report.failed or not found else 0
    session = Session.open(words[0])
    labelled = session.labelled()
    table = Table(title=f"Labels in {session.root}")
    for column in ("round", "image", "label file"):
        table.add_column(column, overflow="fold")  # a name is never cut: its version is at its end
    queried = session.queried()
    for entry in session.rounds:
        for name in entry["query"]:
            path = labelled.get(name)
            table.add_row(str(entry["index"]), name, session.relative(path) if path else "[red]missing")
    extra = sorted(n for n in labelled if n not in queried)  # imported with --cases or --all: trained on too
    for name in extra:
        table.add_row("-", name, session.relative(labelled[name]))
    console.print(table)
    missing = [n for n in queried if n not in labelled]
    unfinished = unfinished_run(session)
    newest = session.rounds[-1] if session.rounds else None
    gone = session.missing_label_files()  # deleted by hand: fine-tuning refuses until restored or re-imported
    if gone:
        name, path = next(iter(sorted(gone.items())))
        then = (
            f"; {session.relative(path)} ({name}'s label, recorded in session.json) is missing: fine-tuning refuses "
            f"until it is restored or imported again ('asfda labels import {as_arg(session.root)} --from DIR "
            f"--cases {as_arg(name)}')"
        )
    elif changes := session.image_changes():  # what a rank and a fine-tune refuse, said before they are run
        moved = any(changes.values())
        fix = "the pool is moved back or named with --images" if moved else "it is put back or labelled anew"
        then = f"; {session.describe_image_changes(changes)}: fine-tuning refuses until {fix}"
    elif missing:
        then = f"; missing: {', '.join(missing)}"
    elif unfinished:
        then = f"; {unfinished}: {finish_hint(session)}"
    elif newest is not None and newest.get("checkpoint"):  # its run finished: what comes next is not a fine-tune
        run = newest_run(session)
        # --extend takes the new length, above what the run trained (its refusal says so otherwise); once stage 2
        # has run, only stage 2 goes further
        done = (run or {}).get("done") or {}
        option, stage = ("--pseudo-iterations", "stage2") if done.get("stage2") else ("--iterations", "stage1")
        extend = f"'asfda finetune {as_arg(session.root)} --extend {option} N' (N above {done.get(stage, 0)})"
        if changed := labels_changed_since(run, session_labels(session)):  # its model does not know them yet
            then = (
                f"; round {newest['index']} is fine-tuned, but on other labels than now ({changed}): {extend} "
                f"trains on them, or 'asfda finetune {as_arg(session.root)} --restart' trains the round anew"
            )
        else:
            then = (
                f"; round {newest['index']} is fine-tuned: 'asfda predict {as_arg(session.root)} --images DIR --out "
                f"DIR', 'asfda rank --out {as_arg(session.root)}' for the next round, or {extend} to train it further"
            )
    else:
        then = "; ready for 'asfda finetune'"
    if (shown := unrecorded_query(session.root, session)) is not None:  # a rank stopped before it recorded them
        console.print(
            f"ranking.json shows a query session.json does not record ({', '.join(shown) or 'none'}): a rank "
            f"stopped before recording it; running that 'asfda rank --out {as_arg(session.root)}' again records it",
            **WHOLE_LINE,
        )
    unrecorded = session.unrecorded_labels()
    if unrecorded:  # kept, never written over: an import stopped before its record, or a restored session.json
        console.print(
            f"{len(unrecorded)} label file(s) in {session.root / 'labels'} recorded by no version ("
            f"{', '.join(p.name for p in unrecorded[:3])}{', ...' if len(unrecorded) > 3 else ''}): an import "
            "stopped before its record, or a session.json restored from its .bak; importing the same label again "
            "records it",
            **WHOLE_LINE,
        )
    also = f" (and {len(extra)} not queried, imported with --cases or --all)" if extra else ""
    console.print(f"{len(queried) - len(missing)} of {len(queried)} queried volumes labelled{also}{then}", **WHOLE_LINE)
    return 0


def _duration(seconds: float) -> str:
    """Seconds under a minute, else minutes: a run of seconds is not '0.0 min'."""
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# --pseudo-mix with a teacher that never lets it act (recipe.stage2_mix): refused, as other idle options are
MIX_WITH_EMA = (
    "--pseudo-mix copy-paste mixes the labels a fixed teacher made before stage 2, and the EMA teacher labels each "
    "patch online, so it would do nothing; leave it out, or add --pseudo-teacher fixed (or ema-if-fallback)"
)


def check_gate_options(
    gate: str,
    confidence: float | None,
    min_agreement: float | None,
    fallback: str | None = None,
    blend_start: float | None = None,
    runs_gate: bool = False,
) -> None:
    """Refuse, before any work, a pseudo-label option the chosen gates do not read (it would do nothing).
    ``runs_gate``: ``gate`` is a run's own, which a resume or an extension keeps."""
    if blend_start and gate != "rounds":
        fix = "--restart --pseudo-gate rounds to make its pseudo-labels anew" if runs_gate else "--pseudo-gate rounds"
        whose = "this round's" if runs_gate else "the"
        raise ASFDAError(
            f"--blend-start blends the start in where the rounds gate keeps volumes (the start vouched for them), "
            f"and {whose} gate is {gate}; leave it out, or add {fix}"
        )
    if fallback not in (None, "none") and gate == "confidence":
        raise ASFDAError(
            "--pseudo-fallback judges when the gate keeps no volume, and the confidence gate always keeps some; "
            "leave it out, or add --pseudo-gate rounds"
        )
    if fallback == gate:
        raise ASFDAError(f"--pseudo-fallback {fallback} is the gate itself; name another, or none")
    if min_agreement is not None and gate == "confidence":
        raise ASFDAError(
            "--min-agreement is the floor of the flips and rounds gates; add --pseudo-gate flips or rounds, "
            "or leave it out"
        )
    if confidence is not None and "confidence" not in (gate, fallback):
        raise ASFDAError(
            f"--confidence is the voxel threshold of the confidence gate, and the gate is {gate}; add "
            "--pseudo-gate confidence (or --pseudo-fallback confidence), or leave it out"
        )


# what a resume keeps of its run (option: the argument's and the record's name): the targets, what the run
# started with (runs.RUN_RECIPE) and how its stage 2 ran (runs.stage2_recipe)
RESUME_KEEPS = {
    "--iterations": "iterations",
    "--pseudo-iterations": "pseudo_iterations",
    "--batch-size": "batch_size",
    "--lr": "lr",
    "--seed": "seed",
    "--pseudo-gate": "reliability",
    "--keep-fraction": "keep_fraction",
    "--confidence": "confidence",
    "--min-agreement": "min_agreement",
    "--pseudo-fallback": "fallback",
    "--stage2-lr": "stage2_lr",
    "--pseudo-augment": "pseudo_augment",
    "--pseudo-mix": "pseudo_mix",
}


def refuse_changes_part_way(args: argparse.Namespace, ran: dict, pseudo: Path | None) -> None:
    """A resume goes on as its run ran, so it refuses another length, batch size, learning rate, seed, gate,
    stage-2 schedule, augmentation, mix or teacher, and --no-pseudo where stage 2 has pseudo-labels; an extension
    keeps the round's pseudo-labels, so it refuses another teacher of them (it may change the rest). ``ran``: the
    run's runs.stage2_recipe, run_recipe and targets (``iterations``, ``pseudo_iterations``); ``pseudo``: the
    round's pseudo.json, if made."""
    from ASFDALib.adaptation.runs import same_in_effect

    if args.mode not in ("resume", "extend"):
        return
    named = {"--pseudo-teacher": (args.pseudo_teacher, "teacher")}
    if args.mode == "resume":
        named |= {option: (getattr(args, key, None), key) for option, key in RESUME_KEEPS.items()}
    changed = []
    for option, (value, key) in named.items():
        if value is None or key not in ran:
            continue
        if same_in_effect(key, value, ran[key], pseudo, ran.get("teacher")):
            continue
        changed.append(f"{option} {value} (it had {ran[key]})")
    if args.mode == "resume" and getattr(args, "no_pseudo", False) and ran.get("pseudo_iterations"):
        changed.append(f"--no-pseudo (it has a stage 2 of {ran['pseudo_iterations']} iterations)")
    if changed:
        why = (
            "--resume continues the run as it ran"
            if args.mode == "resume"
            else "--extend keeps the round's pseudo-labels and the teacher that labels them"
        )
        them = "it" if len(changed) == 1 else "them"
        raise ASFDAError(
            f"{args.session}: {why}, so {' and '.join(changed)} would change it part-way; leave {them} out, or "
            f"--restart to train the round with {them}"
        )


def cmd_finetune(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ASFDALib import distributed
    from ASFDALib.adaptation.pipeline import can_blend, check_mode, finetune_session, handover_anew
    from ASFDALib.adaptation.recipe import FinetuneConfig
    from ASFDALib.adaptation.runs import (
        checkpoint_every_of,
        done_text,
        newest_run,
        read_run,
        record_killed,
        resume_recipe,
        run_state,
    )
    from ASFDALib.adaptation.session import Session

    console = Console()
    recipe = FinetuneConfig()
    # the options that choose which volumes get pseudo-labels, and the rest of stage 2's
    gate_options = {
        "--pseudo-gate": args.reliability,
        "--confidence": args.confidence,
        "--min-agreement": args.min_agreement,
        "--pseudo-fallback": args.fallback,
        "--keep-fraction": args.keep_fraction,
    }
    stage2_options = gate_options | {
        "--pseudo-augment": args.pseudo_augment,
        "--pseudo-mix": args.pseudo_mix,
        "--pseudo-teacher": args.pseudo_teacher,
        "--pseudo-iterations": args.pseudo_iterations,
        "--stage2-lr": args.stage2_lr,
        "--blend-start": args.blend_start,
    }
    given = [name for name, value in stage2_options.items() if value is not None]
    if args.no_pseudo and given:
        raise ASFDAError(
            f"--no-pseudo skips stage 2, so {' and '.join(given)} would do nothing; leave out one or the other"
        )
    iterations = recipe.iterations if args.iterations is None else args.iterations
    run, pseudo_json, same_share = None, None, False
    if args.mode in ("extend", "resume"):
        opened = Session.open(args.session)
        index = opened.rounds[-1]["index"] if opened.rounds else 1
        folder = opened.root / "checkpoints" / f"round{index}" if opened.rounds else None
        run = read_run(folder) if folder else None
        # --blend-start alone hands a finished stage 2 over with another share, training nothing (the engine
        # refuses it where stage 2 has not run, or the share would blend as final.pt does)
        no_length = args.mode == "extend" and args.iterations is None and args.pseudo_iterations is None
        if no_length and args.blend_start is not None and run is not None and run["done"]["stage2"] > 0:
            training = {
                "--lr": args.lr,
                "--batch-size": args.batch_size,
                "--seed": args.seed,
                "--pseudo-augment": args.pseudo_augment,
                "--pseudo-mix": args.pseudo_mix,
                "--pseudo-teacher": args.pseudo_teacher,
                "--stage2-lr": args.stage2_lr,
            }
            given = [name for name, value in training.items() if value is not None]
            if given:
                raise ASFDAError(
                    f"--extend with only --blend-start trains nothing, so {' and '.join(given)} would do nothing; "
                    f"leave {'it' if len(given) == 1 else 'them'} out, or give --pseudo-iterations N (N > "
                    f"{run['done']['stage2']}) to train further"
                )
            # the same share again: as the command asks already, so it succeeds, recording nothing (below, once
            # the options it refuses whatever the share are refused)
            same_share = run["finished"] and can_blend(folder) and handover_anew(run, folder, args.blend_start) is None
        elif no_length:
            if run is not None and run_state(opened, run) == "killed":
                record_killed(run)  # as the engine will record it, so the refusal calls it killed too
            # first what the run's state refuses (none yet, or an interrupted one: --resume), as the engine would
            unbounded = FinetuneConfig(iterations=1 << 30, pseudo_iterations=1 << 30)
            check_mode("extend", run, unbounded, opened.root / "checkpoints" / f"round{index}", index)
            raise ASFDAError(
                f"--extend needs the new length: --iterations N (stage 1, when only stage 1 ran) or "
                f"--pseudo-iterations N (stage 2), more than the run has done ({done_text(run['done'])})"
                + ("; or --blend-start S to hand its stage 2 over anew" if folder and can_blend(folder) else "")
                + (" (--blend-start acts on a stage 2, which this run did not have)" * (args.blend_start is not None))
            )
        made = [name for name, value in gate_options.items() if value is not None]
        pseudo_json = folder / "pseudo" / "pseudo.json" if folder else None
        if pseudo_json and made and pseudo_json.is_file():
            mode = "--" + args.mode
            raise ASFDAError(
                f"{args.session}: round {opened.rounds[-1]['index']}'s pseudo-labels are made, and {mode} keeps "
                f"them, so {' and '.join(made)} would do nothing; leave {'it' if len(made) == 1 else 'them'} out, "
                f"or --restart to make them anew"
            )
        if same_share:
            console.print(
                f"{folder / 'final.pt'} already holds {args.blend_start:.0%} of round {index}'s start "
                f"(--blend-start {args.blend_start:g}): nothing to do"
            )
            return 0
    # a resume or an extension goes on as its run ran where not told otherwise (a resume refuses another,
    # below; an extension may take one): what it started with and how its stage 2 ran
    ran = resume_recipe(run)

    def own(value, key: str):
        return ran.get(key, getattr(recipe, key)) if value is None else value

    reliability = own(args.reliability, "reliability")
    # after the refusal above: its fix (leave the options out) is the one that holds
    runs_gate = run is not None and args.reliability is None  # a resume's or an extension's: the run's own
    check_gate_options(reliability, args.confidence, args.min_agreement, args.fallback, args.blend_start, runs_gate)
    if args.blend_start and args.pseudo_iterations == 0:
        raise ASFDAError("--pseudo-iterations 0 skips stage 2, and the blend follows it; leave one of them out")
    if args.pseudo_mix == "copy-paste" and own(args.pseudo_teacher, "teacher") == "ema":
        if args.mode in ("resume", "extend") and ran.get("teacher") == "ema":  # the run's, which it keeps
            raise ASFDAError(
                f"{args.session}: the run's stage 2 has the EMA teacher, which --{args.mode} keeps, and it labels each "
                "patch online, so --pseudo-mix copy-paste would do nothing; leave it out, or --restart with "
                "--pseudo-teacher fixed to mix the fixed teacher's labels"
            )
        raise ASFDAError(MIX_WITH_EMA)
    if run and run["targets"]:  # a resume keeps the run's length too
        ran |= {"iterations": run["targets"]["stage1"], "pseudo_iterations": run["targets"]["stage2"]}
    if not (args.mode == "resume" and run and run["finished"]):  # that resume is refused, naming --extend
        refuse_changes_part_way(args, ran, pseudo_json)
    pseudo_iterations = recipe.pseudo_iterations if args.pseudo_iterations is None else args.pseudo_iterations
    if args.mode == "extend":
        if run and args.pseudo_iterations is None and run["done"]["stage2"]:
            pseudo_iterations = run["done"]["stage2"]  # --blend-start alone: stage 2 stays as it ran
        if run and args.iterations is None:
            iterations = run["done"]["stage1"]  # extending stage 2 only: stage 1 stays as it ran
        elif run and run["done"]["stage2"] > 0 and args.iterations != run["done"]["stage1"]:
            raise ASFDAError(
                f"{args.session}: stage 2 has run, so only stage 2 can be extended; use --pseudo-iterations N "
                f"(N > {run['done']['stage2']}), or --restart to train stage 1 longer"
            )
    config = FinetuneConfig(
        iterations=iterations,
        pseudo_iterations=pseudo_iterations,
        batch_size=own(args.batch_size, "batch_size"),
        lr=own(args.lr, "lr"),
        # a resume or an extension checkpoints as its run did unless told (a kill costs what it cost before)
        checkpoint_every=args.checkpoint_every
        or (checkpoint_every_of(run) if args.mode in ("resume", "extend") else None)
        or recipe.checkpoint_every,
        seed=own(args.seed, "seed"),
        device=args.device,
        keep_fraction=own(args.keep_fraction, "keep_fraction"),
        # a resume or extend keeps an EMA teacher's voxel gate (gate options are refused once labels exist)
        confidence=own(args.confidence, "confidence"),
        reliability=reliability,
        min_agreement=own(args.min_agreement, "min_agreement"),
        fallback=own(args.fallback, "fallback"),
        stage2_lr=own(args.stage2_lr, "stage2_lr"),
        pseudo_augment=own(args.pseudo_augment, "pseudo_augment"),
        pseudo_mix=own(args.pseudo_mix, "pseudo_mix"),
        teacher=own(args.pseudo_teacher, "teacher"),
        ema_weight=own(None, "ema_weight"),
        blend_start=own(args.blend_start, "blend_start"),
    )
    bar, progress = training_progress(console)
    distributed.init_from_env(args.device)
    if not distributed.is_main():
        console.quiet = True
    if args.images is not None:  # where the pool is now, recorded by rank 0 before anything trains
        from ASFDALib.adaptation.rounds import pool_change

        if distributed.is_main():
            with Session.open(args.session) as moving:
                if note := pool_change(moving, args.images):  # refused where a labelled volume differs there
                    moving.move_images(Path(args.images))
                    moving.save()
                    console.print(note, **WHOLE_LINE)
        distributed.barrier()
    cancel = threading.Event()
    session = Session.open(args.session)
    with session if distributed.is_main() else nullcontext(session), bar:
        try:
            result = finetune_session(
                session,
                config,
                pseudo=not args.no_pseudo,
                mode=args.mode,
                cancel=cancel,
                progress=progress,
                on_status=console.print,
            )
        except KeyboardInterrupt as exc:
            done = (newest_run(session) or {}).get("done")
            held = f"the newest checkpoint is kept ({done_text(done)})" if done and any(done.values()) else ""
            console.print(f"interrupted; {held or 'no checkpoint was saved yet'}: re-run with --resume to continue")
            return interrupted_exit_code(exc)
    if result.kept:
        console.print(f"Pseudo-labelled (most reliable first): {', '.join(result.kept)}")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    if result.status == "cancelled":
        console.print(f"Fine-tuning cancelled ({times}); 'asfda finetune {as_arg(args.session)} --resume' continues it")
        return 130
    spent = f" ({times})" if times else ""  # none where nothing ran (a finished run recorded after a kill)
    console.print(f"{result.summary[0].upper()}{result.summary[1:]}{spent}. Adapted weights: {result.checkpoint}")
    console.print(
        f"Next: 'asfda predict {as_arg(args.session)} --images DIR --out DIR', or 'asfda rank --out "
        f"{as_arg(args.session)}' for the next round.",
        **WHOLE_LINE,
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ASFDALib.adaptation.pipeline import plan_predictions, predictions_folder_for, session_model
    from ASFDALib.adaptation.session import Session
    from ASFDALib.outputs import session_files

    console = Console()
    session = Session.open(args.session)
    fix = f"choose another --out folder, e.g. {predictions_folder_for(Path(args.images))}"
    # every refusal before the model loads, writing nothing; the claim (and --out itself) once it has loaded
    # a session kept in the pool is no scan, as rank leaves it out: its labels and cache are the session's
    protected = session_files(session)
    plan = plan_predictions(
        args.images, args.out, protected, fix, claim=False, recursive=args.recursive, exclude=[session.root]
    )
    model = session_model(session, adapted=not args.source_model)
    plan = plan.claim()
    try:  # the plan holds --out until its last map is written, or until this command fails on the way
        return _predict(args, console, session, plan, model)
    finally:
        plan.release()


def _predict(args: argparse.Namespace, console, session, plan, model) -> int:
    from ASFDALib.adaptation.pipeline import predict_folder
    from ASFDALib.adaptation.runs import finish_hint, handover_pending, newest_run, unfinished_run
    from ASFDALib.data.volumes import deeper_series_line, kept_out_line, passed_over_line

    replaced = plan.replaced
    if replaced:
        console.print(f"Replacing {len(replaced)} label maps an earlier asfda predict wrote to {args.out}")
    latest = session.adapted_round()
    unfinished = "" if args.source_model else unfinished_run(session)
    if unfinished:  # its weights are not the adapted model: say which model predicts instead, and the fix
        which = "the source model"
        if latest:  # an interrupted extension of the newest round: its weights as they finished before it
            newest = latest is session.rounds[-1] and not handover_pending(session, newest_run(session))
            before = " as it finished before this run" if newest else ""
            which = f"round {latest['index']}'s model{before}"
        console.print(
            f"[yellow]{unfinished[0].upper()}{unfinished[1:]}: predicting with {which} "
            f"({finish_hint(session, args.session)}).[/yellow]"
        )
    elif not args.source_model and not latest:
        console.print(
            "This session has not been fine-tuned yet: predicting with the source model "
            f"('asfda finetune {as_arg(args.session)}' adapts it first)."
        )
    made_by = model.made_by  # which model predicts, as session_model loaded it
    if made_by["model"] == "adapted":
        which = f"round {made_by['round']}'s fine-tuned model ({made_by['checkpoint']})"
    else:
        which = "the source model"
    bar, update = volume_progress(console, "Predicting")
    with bar:
        written, skipped = predict_folder(model, args.images, args.out, args.device, update, made_by, plan=plan)
    for reason in skipped:
        console.print(f"[yellow]skipped {reason}[/yellow]")
    if plan.passed_over:
        line = passed_over_line(args.images, plan.passed_over, "segment")
        console.print(line, style="yellow", markup=False, highlight=False)
    if plan.deeper:  # a CD's patient folders beside a series: named as rank names them
        console.print(
            deeper_series_line(plan.deeper, "segmented", "segment")
            + " (each map at its series' path under the output folder)",
            style="yellow",
            **WHOLE_LINE,
        )
    if plan.kept_out:
        console.print(kept_out_line(args.images, plan.kept_out, "segment"), style="yellow", **WHOLE_LINE)
    console.print(f"Wrote {len(written)} label maps to {args.out} with {which}")
    stale = Path(args.out) / "evaluation.csv"  # evaluate's default table: it scored the maps written over
    if replaced and stale.is_file():
        console.print(
            f"{stale} scores the label maps replaced: 'asfda evaluate --pred {as_arg(args.out)} --labels DIR --session "
            f"{as_arg(args.session)}' again",
            style="yellow",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    return 0 if written else 1


def _same_weights(session, made_by) -> bool:
    """Whether ``session`` holds the very checkpoint every map was made with (predict's record: its path in
    the session and SHA-256): a copy or a moved folder of the session that made them."""
    from ASFDALib.data.volumes import content_hash

    adapted = [m for m in made_by if m.get("sha256") and m.get("checkpoint")]
    if not adapted or len(adapted) != len(list(made_by)):
        return False
    try:
        return all(content_hash(session.path(m["checkpoint"])) == m["sha256"] for m in adapted)
    except (OSError, ASFDAError):
        return False


def cmd_evaluate(args: argparse.Namespace) -> int:
    import math

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ASFDALib.adaptation.session import Session
    from ASFDALib.data.labels import mapping_text, parse_mapping
    from ASFDALib.data.volumes import content_hash
    from ASFDALib.evaluation.evaluate import (
        case_files,
        evaluate_folders,
        foreign_warning,
        is_evaluation_table,
        left_out,
        mean_caption,
        refuse_swapped_folders,
        summary_rows,
        trained_on,
        write_csv,
    )
    from ASFDALib.models.card import load_card
    from ASFDALib.outputs import (
        predictions_made_by,
        predictions_made_from,
        refuse_folder_as_file,
        refuse_inside_session,
        refuse_overwrite,
    )

    out = args.out or Path(args.pred) / "evaluation.csv"
    refuse_folder_as_file(out, out / "evaluation.csv")
    refuse_swapped_folders(args.pred, args.labels)  # before its table would go into the reference labels
    inputs = [p for files in case_files(args.pred, args.labels) for p in files]
    refuse_overwrite([out], inputs, "an input label map", "choose another --out file")
    refuse_inside_session(out, "write the table elsewhere, e.g. --out evaluation.csv")
    if Path(out).is_file() and not is_evaluation_table(Path(out)):  # a card, a script: never replaced
        raise ASFDAError(f"{out}: exists and is not a table asfda evaluate wrote; choose another --out file (.csv)")
    console = Console()
    session = Session.open(args.session) if args.session else None
    # the session that made the maps (predict's record): held-out cases are judged by its labels, not another's
    made_by = predictions_made_by(args.pred).values()  # predict's record of each map (read once)
    makers = {m["session"] for m in made_by if m.get("session")}
    maker = next(iter(makers)) if len(makers) == 1 else None
    # --session names a copy or a moved folder of the session that made them (the very checkpoint)
    copy = session is not None and str(session.root.resolve()) not in makers and _same_weights(session, made_by)
    if session is None and maker and is_session_folder(maker):
        try:
            session = Session.open(maker)
            said = f"session {maker}: the one that made these label maps (--session names another)"
            console.print(said, markup=False)
        except ASFDAError as exc:  # asked for no session: one that cannot be read is noted, not a failure
            console.print(f"[yellow]note[/yellow] {escape(str(exc))}; evaluating without it", soft_wrap=True)
    elif session is None and maker:  # the session that made them is not where it was: its training cases count
        console.print(
            f"[yellow]warning[/yellow] {escape(maker)} made these label maps and is gone from there (moved, or "
            "another machine): the mean includes any case it trained on; give --session with its new place",
            soft_wrap=True,
        )
    elif session is not None and makers and str(session.root.resolve()) not in makers and not copy:
        console.print(
            f"[yellow]warning[/yellow] {escape(', '.join(sorted(makers)))} made these label maps, not "
            f"{escape(str(session.root))}: the cases left out of the mean are those {escape(str(session.root))} "
            "trained on",
            soft_wrap=True,
        )
    if args.card:
        names = load_card(args.card).class_names
    elif session:
        names = list(session.data["model"]["card"]["class_names"])
    else:
        names = None
    scores = evaluate_folders(args.pred, args.labels, names, parse_mapping(args.map, names))
    # a figure on cases the session's model trained on is not a test figure: they are noted, not averaged
    # maps of one round's adapted model: what later rounds labelled, it never trained on
    rounds = {m.get("round") if m.get("model") == "adapted" else None for m in made_by}  # None: the source model's
    one_round = next(iter(rounds)) if len(rounds) == 1 else None
    made_here = session is not None and (str(session.root.resolve()) in makers or copy)
    up_to = one_round if made_here and isinstance(one_round, int) else None
    trained = trained_on(session, scores, args.labels, predictions_made_from(args.pred), up_to) if session else {}
    if names is None:
        names = ["background", *[f"class{i}" for i in range(1, max(len(s.dice) for s in scores) + 1)]]
        console.print("no class names: give --session or --card (classes taken from the predictions' values)")
    # a reference file the session imported with a map (known by its content): that map, not an example
    versions = session.label_versions().values() if session else []
    imported = {e["source_sha256"]: mapping_text(e["map"]) for e in versions if e.get("map") and e.get("source_sha256")}
    # a map that keeps every value as it is changes no class: nothing to warn of without it
    identity = {
        mapping_text(e["map"])
        for e in versions
        if e.get("map")
        and e["map"].get("default") is None
        and all(int(k) == int(v) for k, v in e["map"]["values"].items())
    }
    maps_of: dict[str, str] = {}  # reference case -> the map the session imported its file with
    if imported:
        for score in scores:
            if text := imported.get(content_hash(Path(args.labels) / score.case)):
                maps_of[score.case] = text
    for score in scores:
        if score.foreign:
            warning = foreign_warning(score, names, maps_of.get(score.case, ""))
            console.print(f"[yellow]warning[/yellow] {escape(warning)}", soft_wrap=True)
    unmapped = sorted(
        {text for case, text in maps_of.items() if not next(s for s in scores if s.case == case).foreign} - identity
    )
    if unmapped and not args.map:  # values that are classes' indices all the same, but of other classes
        cases = [c for c, text in maps_of.items() if text in unmapped]
        console.print(
            f"[yellow]warning[/yellow] {len(cases)} reference file(s) here ({escape(', '.join(sorted(cases)[:3]))}) "
            f"were imported into {escape(str(session.root))} with --map {escape(as_arg(unmapped[0]))}: their values "
            f"are not this model's class indices, so without it the Dice compares other classes; run again with "
            f"--map {escape(as_arg(unmapped[0]))}",
            soft_wrap=True,
        )
    for line in left_out(args.pred, args.labels):
        console.print(line, style="yellow", markup=False, highlight=False, soft_wrap=True)
    # maps that predict recorded as this session's source model's: it trained on none of the session's cases
    root = str(session.root.resolve()) if session else None
    source = (
        bool(trained) and bool(made_by) and all((m.get("session"), m.get("model")) == (root, "source") for m in made_by)
    )
    rows = summary_rows(scores, names, trained, source)

    def cell(value: float) -> str:
        return "" if math.isnan(value) else f"{value:.3f}"

    # The terminal stays a few columns wide whatever the class count; the CSV has every case x class.
    mean = rows[-1]
    classes = Table(title=mean_caption(rows, trained, source))
    for column in ("class", "Dice", "HD95 (mm)"):
        classes.add_column(column)
    held_out = [r for r in rows[:-1] if r["case"] not in trained]
    partial = False  # an HD95 mean over fewer cases than the Dice's: a class missed has no surface distance
    for key in (k for k in mean if k.startswith("dice_") and k != "dice_mean"):
        name = key.removeprefix("dice_")
        measured = sum(not math.isnan(r[f"hd95_{name}"]) for r in held_out)
        scored = sum(not math.isnan(r[key]) for r in held_out)  # the Dice's cases: the class in map or reference
        count = f" ({measured} of {scored})" if 0 < measured < scored else ""
        partial |= bool(count)
        classes.add_row(name, cell(mean[key]), cell(mean[f"hd95_{name}"]) + count)
    classes.add_row("mean", cell(mean["dice_mean"]), "")
    cases = Table(title="Per case")
    for column in ("case", "mean Dice", "note"):
        cases.add_column(column)
    for row in rows[:-1]:
        cases.add_row(str(row["case"]), cell(row["dice_mean"]), str(row["reason"]))
    written = write_csv(rows, out)  # the command's own output, before the terminal's (which a closed pipe stops)
    console.print(classes)
    if partial:
        console.print(
            "HD95 (n of N): over the n cases where both the map and the reference hold the class; where the map "
            "misses it there is no surface distance (its Dice there is 0)",
            markup=False,
            soft_wrap=True,
        )
    console.print(cases)
    print(f"Wrote {written} (Dice and HD95 of every case and class)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ASFDALib.adaptation.session import Session
    from ASFDALib.models.export import export_session_model

    session = Session.open(args.session)
    exported = export_session_model(session, args.out, args.format, source_model=args.source_model, name=args.session)
    print(exported.message)
    return 0


def invoked_as() -> str:
    """How to run this command line again: ``asfda`` where that name finds it, else the path it was started by
    (``.venv/bin/asfda`` after ``make run``, which installs into an environment that is not activated)."""
    started = Path(sys.argv[0])
    if started.stem.lower() != "asfda":  # not started by its launcher (a test, python -m)
        return "asfda"
    found = shutil.which("asfda")  # the launcher that name finds (asfda.EXE on Windows, for an argv[0] of asfda)
    if found and Path(found).resolve().parent == started.resolve().parent:
        return "asfda"
    try:
        shown = os.path.relpath(started)
    except ValueError:  # on another drive than the working folder (Windows): the whole path
        shown = str(started)
    if Path(shown).name == shown:  # started in its own folder (./asfda): a bare name would not find it
        shown = os.path.join(os.curdir, shown)
    return as_arg(shown)


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ASFDALib.bench.demo import DemoConfig, demo_model_path, refuse_replacing, run_demo

    console = Console()
    config = DemoConfig(
        pool=args.pool,
        test=args.test,
        budget=args.budget,
        iterations=args.iterations,
        device=args.device,
        scenario=args.scenario,
    )
    refuse_replacing(args.out)  # before anything says "replacing"
    if (args.out / "demo.json").is_file() or (args.out / "session").is_dir():  # the demo's own, said before it goes
        console.print(f"Replacing the earlier demo in {args.out} (its data/, session/ and results)", **WHOLE_LINE)
    bar, update = stage_progress(console, "Demo")
    with bar:
        report = run_demo(args.out, demo_model_path(config.scenario), config, update)
    console.print((args.out / "demo.md").read_text(encoding="utf-8"))
    gain = 100 * (report["mean_dice"]["asfda"] - report["mean_dice"]["random"])
    console.print(
        f"ASFDA (its query, then selective pseudo-labels) vs random selection (labels only), the same "
        f"{config.budget} labels and iterations: {gain:+.1f} Dice points on this one pool and seed "
        f"(the benchmark measures it over seeds). {_duration(report['seconds'])}."
    )
    console.print(f"Plots: {args.out}/demo.png, {args.out}/session/ranking.png. Session: {args.out}/session")
    session, asfda = as_arg(args.out / "session"), invoked_as()
    console.print(  # going on from the demo: the next round's query has its reference labels beside the pool
        f"Next round: '{asfda} rank --out {session}', then '{asfda} labels import {session} --from "
        f"{as_arg(args.out / 'data' / 'pool' / 'labels')}' (the pool's reference labels stand in for a clinician's)"
    )
    for warning in report["warnings"]:  # a plot that could not be drawn (e.g. matplotlib missing)
        console.print(warning, style="yellow", markup=False, highlight=False, soft_wrap=True)
    return 0


def _count_or_folder(text: str | None) -> tuple[int | None, Path | None]:
    """A phantom count (digits, and no folder of that name) or a folder."""
    if text is None:
        return None, None
    if text.isdigit() and not Path(text).is_dir():
        return int(text), None
    return None, Path(text)


def benchmark_config(args: argparse.Namespace) -> tuple[BenchmarkConfig, Folders | None, Path | None]:
    """What ``asfda benchmark`` runs for these arguments: its config, the user's folders (None: phantoms) and
    the model (None: the built-in one); refuses, in one line, arguments that do not fit together."""
    from dataclasses import replace

    from ASFDALib.adaptation.recipe import may_blend
    from ASFDALib.bench.benchmark import SCENARIO_MODELS, BenchmarkConfig, Folders, row_training
    from ASFDALib.models.defaults import resources_dir

    config = BenchmarkConfig.quick() if args.quick else BenchmarkConfig()
    pool_count, pool_dir = _count_or_folder(args.pool)
    test_count, test_dir = _count_or_folder(args.test)
    val_count, val_dir = _count_or_folder(args.validation)
    folders = None
    if pool_dir or test_dir or val_dir:
        if args.scenario is not None:  # first: the other fixes would not make the two go together
            raise ASFDAError(
                f"--scenario {args.scenario} picks phantom data, and --pool/--test name your own folders; "
                "leave --scenario out"
            )
        if not (pool_dir and test_dir):
            raise ASFDAError(
                "benchmark on your own data needs both --pool DIR and --test DIR (--validation DIR optional)"
            )
        if args.model is None:
            raise ASFDAError(
                "benchmark on your own data needs --model (the model to adapt) and, if not beside it, --card"
            )
        folders = Folders(pool_dir, test_dir, val_dir)
    for option, count in (("--pool", pool_count), ("--test", test_count)):
        if count == 0:
            raise ASFDAError(f"{option} 0: a phantom count must be 1 or more (or give a folder)")
    overrides = {
        k: v
        for k, v in (
            ("pool", pool_count),
            ("test", test_count),
            ("validation", val_count),
            ("iterations", args.iterations),
            ("full_iterations", args.full_iterations),
            # a report without --budgets reports every budget that ran (benchmark.as_run)
            ("budgets", () if args.budgets is None and args.report_only else args.budgets),
            ("seeds", args.seeds),
            ("rows", args.rows),
            ("eval_at", args.eval_at),
            ("lr", args.lr),
            ("encoder_lr_scale", args.encoder_lr_scale),
            ("lower_rate_for", args.lower_rate_for),
            ("fusion", args.fusion),
        )
        if v is not None
    }
    scenario = args.scenario or config.scenario
    model_path = args.model
    if model_path is None and folders is None and scenario in SCENARIO_MODELS:
        # each five-class scenario has its own shipped source model; the earlier mri protocol the built-in one
        model_path = resources_dir() / "BenchmarkModels" / SCENARIO_MODELS[scenario]
        if not model_path.is_file():
            raise ASFDAError(
                f"{model_path}: --scenario {scenario}'s source model is missing; install ASFDA from its "
                "source tree or pass --model (benchmarks/train_source_model.py trains it)"
            )
    if args.pseudo_gate is not None:
        overrides["ssft"] = replace(config.ssft, reliability=args.pseudo_gate)
    gate = args.pseudo_gate or config.ssft.reliability
    check_gate_options(gate, None, args.min_agreement, args.pseudo_fallback, args.blend_start)
    if args.pseudo_mix == "copy-paste" and (args.pseudo_teacher or config.ssft.teacher) == "ema":
        raise ASFDAError(MIX_WITH_EMA)
    if args.min_agreement is not None:
        overrides["ssft"] = replace(overrides.get("ssft", config.ssft), min_agreement=args.min_agreement)
    for name, field in (
        ("stage2_lr", "stage2_lr"),
        ("pseudo_fallback", "fallback"),
        ("pseudo_augment", "pseudo_augment"),
        ("pseudo_mix", "pseudo_mix"),
        ("pseudo_teacher", "teacher"),
        ("ema_weight", "ema_weight"),
        ("blend_start", "blend_start"),
    ):
        value = getattr(args, name)
        if value is not None:
            overrides["ssft"] = replace(overrides.get("ssft", config.ssft), **{field: value})
    if args.pseudo_iterations is not None:  # stage 2's length as the fraction of stage 1's the runs record
        fraction = args.pseudo_iterations / overrides.get("iterations", config.iterations)
        overrides["ssft"] = replace(overrides.get("ssft", config.ssft), extra_fraction=fraction)
    config = replace(config, device=args.device, scenario=scenario, **overrides)
    ssft = config.ssft
    if may_blend(ssft.blend_start, ssft.reliability) and ssft.stage2_lr == "constant" and "ssft-control" in config.rows:
        raise ASFDAError(
            "with --stage2-lr constant the ssft-control row trains one longer stage, which no gate judges, so only "
            "the asfda+ssft row would be handed over blended; add --blend-start 0, or --stage2-lr cosine"
        )
    if config.eval_at and not (config.validation or val_dir):
        raise ASFDAError("--eval-at scores the validation set: give --validation DIR (or a phantom count)")
    longest = max((row_training(r, config)[1] for r in config.rows if r != "source"), default=0)
    if beyond := [str(i) for i in config.eval_at if i > longest]:
        raise ASFDAError(
            f"--eval-at {','.join(beyond)}: no row trains past {longest} iterations, so nothing would be scored "
            "there; give --iterations (for the upper bound, --full-iterations) at least as many"
        )
    return config, folders, model_path


def cmd_benchmark(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ASFDALib.bench.benchmark import run_benchmark

    console = Console()
    config, folders, model_path = benchmark_config(args)
    source = model_source(args, model_path)
    bar, update = volume_progress(console, "Benchmark", "runs")
    with bar:
        report = run_benchmark(
            args.out, config, source, update, not args.report_only, folders=folders, say=console.print
        )
    console.print((args.out / "benchmark.md").read_text(encoding="utf-8"))
    curves = ", curves.json, benchmark_curves.png" if (args.out / "curves.json").is_file() else ""
    # a resumed benchmark's command is short; the runs' own times (training, ranking, scoring) say what they cost
    console.print(
        f"{_duration(report['wall_seconds'])} this time ({report['runs']} runs, "
        f"{_duration(report['run_seconds'])} in all); wrote {args.out}/results.json, summary.json, "
        f"benchmark.json, benchmark.md, benchmark.png, benchmark_diff.png{curves}"
    )
    for warning in report["warnings"]:  # a plot that could not be drawn (e.g. matplotlib missing)
        console.print(warning, style="yellow", markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_phantoms(args: argparse.Namespace) -> int:
    from ASFDALib.bench.phantoms import CLASS_NAMES, write_phantoms
    from ASFDALib.outputs import refuse_inside_session, session_folder_of

    # not into a session (its labels/ is the session's versioned record), nor over a volume (a pool a session
    # ranks may be there): both refused before writing any
    if (session := session_folder_of(args.out)) is not None:
        refuse_inside_session(args.out, f"choose a folder outside it, e.g. {session.parent / 'phantoms'}")
    paths = write_phantoms(args.out, args.count, args.domain, args.seed, labels=not args.no_labels)
    classes = ", ".join(f"{i} {name}" for i, name in enumerate(CLASS_NAMES) if i)
    print(
        f"Wrote {len(paths)} {args.domain} phantoms to {args.out / 'images'}"
        + ("" if args.no_labels else f" and labels to {args.out / 'labels'} ({classes})")
    )
    return 0
