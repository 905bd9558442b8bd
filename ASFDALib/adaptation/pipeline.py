"""Session-level adaptation: stage 1 on the labels, reliability-gated pseudo-labels, stage 2 on both,
with resume, cancel and progress; and prediction with the adapted model.

This is what ``asfda finetune`` / ``asfda predict`` and the Slicer panel call.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ASFDALib import PROGRESS_EVERY_S, distributed
from ASFDALib.adaptation.blend import blend_state
from ASFDALib.adaptation.patches import Case, load_case
from ASFDALib.adaptation.pseudo import selective_pseudo_labels
from ASFDALib.adaptation.recipe import FinetuneConfig, handover_share, stage2_augment, stage2_mix, stage2_teacher
from ASFDALib.adaptation.runs import (
    FINETUNE_MODES,
    MODE_HELP,
    RUN_RECIPE,
    RUN_TRAINING,
    count_checkpoint,
    count_last,
    done_text,
    handover_pending,
    how_ended,
    labels_changed_since,
    listed_runs,
    read_run,
    record_handover,
    record_killed,
    resume_recipe,
    same_in_effect,
    session_labels,
    stage2_recipe,
    unlabelled_new_query,
)
from ASFDALib.adaptation.session import Session, SessionError, ascii_case_id, case_id, storage_stems
from ASFDALib.adaptation.trainer import ProgressFn, Trainer
from ASFDALib.atomic import atomic_write, atomic_write_json, atomic_write_npz
from ASFDALib.data.preprocess import labels_to_native, preprocess
from ASFDALib.data.volumes import (
    content_changed,
    content_hash,
    content_record,
    deeper_series,
    no_volumes_message,
    read_scan,
    read_volume,
    relative_name,
    walk_pool,
    write_volume,
)
from ASFDALib.errors import ASFDAError, VolumeError, as_arg, brief
from ASFDALib.inference.predict import predict_label
from ASFDALib.models.card import NetworkSpec, card_from_dict
from ASFDALib.models.loading import LoadedModel, load_model


@dataclass
class AdaptResult:
    """What a fine-tuning call did: its status, weights, mode, and the iterations that ran."""

    status: str
    checkpoint: Path | None
    mode: str = "new"
    iterations: dict[str, int] = field(default_factory=dict)
    summary: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    reliability: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] | None = None  # the gate the pseudo-labels were made with (pseudo.json)
    teacher: str = ""  # who labelled the pseudo-labelled patches in stage 2 ("fixed" or "ema"; "" for none)
    augment: str = ""  # how stage 2 augmented them ("weak", "strong" or "remap"; "" for none)
    mix: str = ""  # what stage 2 mixed them with ("none" or "copy-paste"; "" where none was pseudo-labelled)
    blend: float = 0.0  # the round's starting weights' share of the model handed over (adaptation/blend.py)
    loss: float | None = None


def session_model(session: Session, adapted: bool = True) -> LoadedModel:
    """The session's model, with the newest fine-tuned weights when ``adapted`` and there are some.

    Rebuilt from what session.json recorded at the first rank (the network and its arguments, the card, trust,
    the class map), so the same loading happens with the same report; the adapted checkpoint, a plain state
    dict of this very network, then loads strictly over it.
    """
    info = session.data.get("model")
    if not info:
        raise SessionError(f"{session.root}: no model recorded; run 'asfda rank --out {as_arg(session.root)}' first")
    model = load_as_recorded(session, model_location(session))
    if model.digest != info["digest"]:
        raise SessionError(
            f"{info['path']}: the model changed since this session was started (digest {model.digest} vs "
            f"{info['digest']}); start a new session for a new model"
        )
    checkpoint = session.adapted_checkpoint() if adapted else None
    model.made_by = {"session": str(session.root.resolve()), "model": "source", "digest": info["digest"]}
    if checkpoint is not None:
        model.network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        sha256 = content_hash(checkpoint)
        model.digest = f"{model.digest}+{sha256[:16]}"
        model.network.eval()
        latest = session.adapted_round()
        model.made_by = {
            "session": model.made_by["session"],
            "model": "adapted",
            "round": latest["index"],
            "checkpoint": latest["checkpoint"],
            "sha256": sha256,
        }
    return model


def load_as_recorded(session: Session, path: Path) -> LoadedModel:
    """The model file at ``path`` loaded as the session recorded its model at the first rank: its card, network,
    trust and class map (its digest then says whether these are the session's weights), with the card's notes
    recorded then (the card given here is read from nothing that could say them again)."""
    info = session.data["model"]
    network = NetworkSpec(**info["network"]) if info.get("network") else None
    card = card_from_dict(info["card"])
    model = load_model(path, card, network, trust=bool(info.get("trust")), class_map=info.get("class_map"))
    model.card_notes = list(info.get("card_notes") or [])  # absent from sessions started before they were kept
    return model


def model_location(session: Session) -> Path:
    """Where the session's model file is now: where it was recorded, or for the built-in model, where this
    install keeps it (a reinstall, a new environment, a colleague's copy of the session). Another model that
    moved is named with the one command that records its new place (its content is checked)."""
    from ASFDALib.models.defaults import DEFAULT_MODEL_NAME, default_model_path

    recorded = Path(session.data["model"]["path"])
    if recorded.exists():
        return recorded
    if recorded.name == DEFAULT_MODEL_NAME:
        return default_model_path()  # the digest check below still holds it to the same weights and card
    raise SessionError(
        f"{recorded}: the model this session started with is not there (moved, or another machine); give its new "
        f"place once, 'asfda rank --out {as_arg(session.root)} --model NEW_PATH' (the same file: its content is "
        "checked), and every command uses it from then on"
    )


def _pseudo_pool(session: Session, labelled: set[str], limit: int) -> list[str]:
    names = [n for n in session.image_names() if n not in labelled]
    if len(names) > limit:  # an even spread over the pool, deterministic
        names = [names[i] for i in np.linspace(0, len(names) - 1, limit).astype(int)]
    return names


def build_pseudo_labels(
    session: Session,
    model: LoadedModel,
    cases: list[Case],
    folder: Path,
    config: FinetuneConfig,
    say: Callable[[str], None] | None = None,
) -> tuple[list[str], dict[str, float]]:
    """Score the unlabeled pool with the stage-1 model, keep the reliable part and store its pseudo-labels.
    ``say`` hears how far each gate has got: at its first and last volume and at most every 10 s between
    (a gate over a pool of real volumes takes minutes)."""
    last = float("-inf")

    def progress(gate: str, done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if say and (done in (1, total) or now - last >= PROGRESS_EVERY_S):
            last = now
            say(f"the {gate} gate: {done} of {total} unlabeled volumes judged")

    pool = []
    for name in _pseudo_pool(session, {c.name for c in cases}, config.max_pseudo_volumes):
        try:
            # the session lists the skipped volumes too: a label map among them is no scan to pseudo-label
            pool.append((name, preprocess(read_scan(session.image_path(name)), model.card)))
        except VolumeError:
            continue
    # "rounds" compares with the model this round started from: the source, or the last round's
    reference = round_start_model(session).network if config.reliability == "rounds" else None
    made = selective_pseudo_labels(
        model.network,
        model.card,
        [c.image for c in cases],
        pool,
        config.keep_fraction,
        config.confidence,
        config.device,
        config.reliability,
        config.min_agreement,
        reference,
        config.fallback,
        progress,
    )
    folder.mkdir(parents=True, exist_ok=True)
    stems = storage_stems({*session.image_names(), *made.labels})
    for name, label in made.labels.items():
        atomic_write_npz(folder / f"{stems[name]}.npz", {"label": label}, compressed=True)
    # the gate that judged; where it stood in for the one asked, which that was and how near it came
    gate: dict = {"reliability": made.gate, "keep_fraction": config.keep_fraction}
    if made.gate == "confidence":
        gate["confidence"] = config.confidence
    else:
        gate["min_agreement"] = config.min_agreement
    if made.asked:
        # the asked gate's floor too: a confidence fallback records none of its own
        gate |= {"asked": made.asked, "asked_best": round(made.asked_best, 6), "asked_floor": config.min_agreement}
    elif made.gate != "confidence":
        # what would have judged had this gate kept no volume (a fallback that is the gate itself never does)
        gate["fallback"] = "none" if config.fallback == made.gate else config.fallback
    # the scans they were made from, by which a resume or an extension knows a scan replaced since
    drawn_on = {n: content_record(session.image_path(n)) for n in made.kept}
    record = {"gate": gate, "kept": made.kept, "reliability": made.reliability, "images": drawn_on}
    atomic_write_json(folder / "pseudo.json", record)
    return made.kept, made.reliability


VIEWS = {
    "flips": "the adapted model's flipped views agree",
    "rounds": "the adapted model agrees with the model the round started from",
}


# what stage 2 said it mixes the pseudo-labelled patches with, where a mix was asked for
MIX_LINES = {
    "copy-paste": "each pseudo-labelled patch is mixed with a labelled one, a cuboid of two thirds of each side "
    "pasted one way or the other, the labels following (--pseudo-mix copy-paste)",
    "none": "the pseudo-labelled patches are not mixed: the EMA teacher labels each patch online as it is drawn, "
    "and --pseudo-mix copy-paste mixes only the fixed teacher's labels",
}


def augment_line(ran: str, asked: str, fallback_judged: bool) -> str:
    """What stage 2 does to the pseudo-labelled patches, said once the gate has judged, and for the default that
    resolves by the gate (remap-if-fallback) why it resolved so."""
    line = {
        "weak": "the pseudo-labelled patches are augmented as the labelled ones (--pseudo-augment weak)",
        "strong": "the pseudo-labelled patches get more intensity change than the labelled ones (--pseudo-augment)",
        "remap": "half the pseudo-labelled patches go through random intensity curves (--pseudo-augment)",
    }[ran]
    if asked != "remap-if-fallback":
        return line
    if fallback_judged:
        return line + ": the fallback gate judged, so contrast may be what changed"
    return line + ", no intensity curves: the gate asked for judged, so the contrast is the round's starting model's"


def below(value: float, floor: float | None) -> str:
    """``value`` to as few decimals (2 to 4) as show it below ``floor``: 0.498 is not "0.50, below 0.5". Past 4
    decimals it is cut, not rounded, so the number shown never reaches the floor it fell short of."""
    for digits in (2, 3, 4):
        text = f"{value:.{digits}f}"
        if floor is None or value >= floor or float(text) < floor:
            return text
    return f"{math.floor(value * 1e4) / 1e4:.4f}"


def _instead(gate: dict) -> str:
    """Where the fallback judged: which gate was asked, and how near it came (a clause, or "")."""
    if not gate.get("asked"):
        return ""
    best = below(gate["asked_best"], gate.get("asked_floor", gate.get("min_agreement")))  # older records: no floor
    return (
        f"no volume reached the {gate['asked']} gate's floor ({VIEWS[gate['asked']]} at most {best}), so the "
        f"{gate['reliability']} gate judged instead (--pseudo-fallback)"
    )


def _why_none(result: AdaptResult) -> str:
    """Why an agreement gate passed no volume, and the other ways on: a clause for the "no volume" line."""
    floor = (result.gate or {}).get("min_agreement")
    if floor is None or not result.reliability:
        return ""
    best = max(result.reliability.values())
    instead = _instead(result.gate)
    asked = f"; {instead}" if instead else ""
    if result.gate.get("fallback") == "none":
        asked += "; no fallback gate judged: --pseudo-fallback none"
    return (
        f" ({VIEWS[result.gate['reliability']]} at most {below(best, floor)} on any volume, class-balanced Dice, "
        f"below the floor of {floor:g}, --min-agreement{asked}). To judge by the adapted model's confidence instead: "
        "--restart --pseudo-gate confidence (in the panel: Pseudo-label gate confidence, then Train again); "
        "--no-pseudo skips stage 2"
    )


def _passed(result: AdaptResult, kept: int) -> str:
    """How many volumes the gate let through, and what cut the rest: the floor, or the kept share."""
    gate = result.gate or {}
    total = len(result.reliability)
    share = f"--keep-fraction {gate.get('keep_fraction', 0):g}"
    floor = gate.get("min_agreement")
    instead = _instead(gate)
    lead = f"{instead}: " if instead else ""
    if floor is None:
        return (
            f"{lead}{kept} of {total} unlabeled volumes get pseudo-labels: the most reliable by the confidence gate "
            f"({share})"
        )
    reached = sum(score >= floor and score > 0 for score in result.reliability.values())
    return (
        f"{lead}{reached} of {total} unlabeled volumes reached the {gate['reliability']} gate's floor "
        f"({floor:g}); the {kept} that agree most get pseudo-labels ({share})"
    )


def _load_pseudo(
    session: Session, model: LoadedModel, folder: Path
) -> tuple[list[Case], list[str], dict[str, float], dict[str, Any]]:
    """The round's stored pseudo-labels: cases, kept names, every candidate's score, and the gate that made them."""
    info = _pseudo_record(folder)
    cases = []
    stems = storage_stems({*session.image_names(), *info["kept"]})
    for name in info["kept"]:
        image = preprocess(read_volume(session.image_path(name)), model.card)
        # stored before 2026-12-06 by the case id alone, of ASCII letters only
        candidates = [folder / f"{stem}.npz" for stem in (stems[name], case_id(name), ascii_case_id(name))]
        stored = next((p for p in candidates if p.is_file()), candidates[0])
        with np.load(stored, allow_pickle=False) as data:
            cases.append(Case(name, image.numpy(), data["label"]))
    return cases, info["kept"], info["reliability"], info["gate"]


def _refuse_changed_pseudo_scans(session: Session, folder: Path) -> None:
    """Refuse going on with a round's stored pseudo-labels (in ``folder``) where a scan they were made from is gone
    or changed since (their record holds its hash and stamp; records made before 2026-12-06 hold none)."""
    info = _pseudo_record(folder)
    for name, made_from in info.get("images", {}).items():
        path = session.image_path(name)
        if not path.exists() or content_changed(path, made_from["sha256"], made_from["stamp"]):
            raise SessionError(
                f"{path}: pseudo-labelled as it was when this round's pseudo-labels were made, and it is gone or "
                "changed since; --restart makes them anew from the pool as it is (or put the scan back)"
            )


def _pseudo_record(folder: Path) -> dict[str, Any]:
    """A round's pseudo.json (in ``folder``): the gate, the volumes kept and every candidate's score."""
    info = json.loads((folder / "pseudo.json").read_text(encoding="utf-8"))
    info.setdefault("gate", {"reliability": "confidence"})  # stored before the gate was a choice: confidence
    return info


def round_start_checkpoint(session: Session) -> Path | None:
    """The weights the current round starts from: the newest adapted checkpoint of an earlier round."""
    for entry in reversed(session.rounds[:-1]):
        if entry.get("checkpoint"):
            path = session.path(entry["checkpoint"])
            if path.is_file():
                return path
    return None


def round_start_model(session: Session) -> LoadedModel:
    """The session's model with the weights the current round starts from (the previous round's, if any)."""
    model = session_model(session, adapted=False)
    start = round_start_checkpoint(session)
    if start is not None:
        model.network.load_state_dict(torch.load(start, map_location="cpu", weights_only=True))
    return model


def check_mode(
    mode: str,
    run: dict | None,
    config: FinetuneConfig,
    folder: Path,
    index: int,
    pseudo: bool = True,
    labels: dict[str, str] | None = None,
) -> str:
    """The mode that really applies, or a one-line refusal that names the user's real choices. ``labels``
    (image name -> label content hash, runs.session_labels) are this call's, which a resume must share with
    the run it continues."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose from {', '.join(FINETUNE_MODES)}")
    if run is None:
        if mode in ("resume", "restart"):
            return "new"  # nothing to continue or replace: the first run of the round
        if mode == "extend":
            raise SessionError(f"{folder}: round {index} has not been fine-tuned yet; run without --extend")
        return "new"
    state = how_ended(run)
    if mode == "new":
        choices = ("extend", "restart") if run["finished"] else ("resume", "restart")
        raise SessionError(
            f"{folder}: round {index} already has {'an' if state == 'interrupted' else 'a'} {state} run "
            f"({done_text(run['done'])}); " + "; ".join(MODE_HELP[c] for c in choices)
        )
    if mode == "resume" and run["finished"]:
        anew = " (with only --blend-start S: handed over anew at that share)" if can_blend(folder) else ""
        raise SessionError(
            f"{folder}: round {index}'s run finished ({done_text(run['done'])}); {MODE_HELP['extend']}{anew}"
        )
    if mode == "resume":  # it goes on as the run ran (the command line refuses the options by name first)
        ran = resume_recipe(run)
        pseudo_json = folder / "pseudo" / "pseudo.json"
        # the blend share acts at the handover, after the training: a resume may take another
        changed = [
            f"{k} {getattr(config, k)} (it had {v})"
            for k, v in ran.items()
            if k != "blend_start" and not same_in_effect(k, getattr(config, k), v, pseudo_json, ran.get("teacher"))
        ]
        if not pseudo and (run["targets"] or {}).get("stage2"):
            changed.append("stage 1 only (it has a stage 2 with pseudo-labels)")
        relabelled = labels_changed_since(run, labels) if labels is not None else ""
        if relabelled:  # nothing un-imports a label: only a restart trains on the labels as they are now
            changed.append(f"the labels ({relabelled} since it ran)")
        if changed:
            own = "" if relabelled else "resume with the run's own, or "
            raise SessionError(
                f"{folder}: a resume continues round {index}'s run as it ran, so {' and '.join(changed)} would "
                f"change it part-way; {own}{MODE_HELP['restart']}"
            )
    if mode == "extend":
        if not run["finished"]:
            ended = how_ended(run)
            raise SessionError(
                f"{folder}: round {index}'s run {'failed' if ended == 'failed' else 'was ' + ended}; "
                f"{MODE_HELP['resume']} first"
            )
        done = run["done"]
        if done["stage2"] > 0:
            # the same length with a share that blends otherwise: handed over anew, training nothing
            same_length = config.pseudo_iterations == done["stage2"]
            anew = handover_anew(run, folder, config.blend_start) if same_length else None
            if config.pseudo_iterations <= done["stage2"] and anew is None:
                raise SessionError(
                    f"{folder}: stage 2 already ran {done['stage2']} iterations; ask for more with "
                    f"--pseudo-iterations N (N > {done['stage2']}), or --restart{_handover_hint(run, folder, config)}"
                )
        elif config.iterations <= done["stage1"] and config.pseudo_iterations <= 0:
            raise SessionError(
                f"{folder}: stage 1 already ran {done['stage1']} iterations; ask for more with --iterations N "
                f"(N > {done['stage1']}), or --restart"
            )
    return mode


def _stored_gate(folder: Path) -> tuple[str, int]:
    """The gate that made a round's pseudo-labels and how many volumes it kept ("", 0 where none were made)."""
    if not (folder / "pseudo" / "pseudo.json").is_file():
        return "", 0
    info = _pseudo_record(folder / "pseudo")
    return info["gate"]["reliability"], len(info["kept"])


def _handover_hint(run: dict, folder: Path, config: FinetuneConfig) -> str:
    """What a handover anew could do for a finished round whose extension asks for no more iterations: the
    share its final.pt already holds, why no share applies, or that --blend-start alone does it."""
    asked_another = config.blend_start != resume_recipe(run).get("blend_start", 0.0)
    if not can_blend(folder):
        return f" (no --blend-start applies to this round: {_why_no_blend(_stored_gate(folder)[0])})" * asked_another
    if config.pseudo_iterations != run["done"]["stage2"]:
        return "; --blend-start S without --pseudo-iterations hands it over anew"
    held = _held_share(run)
    return f"; its final.pt already holds {held:.0%} of the round's start, another --blend-start hands it over anew"


def can_blend(folder: Path) -> bool:
    """Whether a round's pseudo-labels let its handover blend in the start (the rounds gate kept volumes)."""
    return handover_share(0.5, *_stored_gate(folder)) > 0


def handover_anew(run: dict, folder: Path, share: float) -> float | None:
    """The share of its start a finished round's stage 2 handed over anew at ``share`` would hold
    (recipe.handover_share, as its pseudo-labels were gated); None where that is what its final.pt holds."""
    applied = handover_share(share, *_stored_gate(folder))
    return applied if applied != _held_share(run) else None


def _held_share(run: dict) -> float:
    """The share of its start a finished round's final.pt holds: its newest handover's (0 before the blend)."""
    return next((h["handover_blend"] for h in reversed(run["history"]) if "handover_blend" in h), 0.0)


def _fresh_tensors(session: Session, model: LoadedModel) -> list[str]:
    """The tensors a round starts from a random initialisation (round 1's new head or decoder), which no blend
    with the start should bring back; none in later rounds, which start from the previous round's weights."""
    return model.load_report.new if model.load_report and round_start_checkpoint(session) is None else []


def _hand_over_anew(
    session: Session, round_entry: dict, run: dict, folder: Path, share: float, say: Callable[[str], None]
) -> AdaptResult:
    """A finished stage 2 handed over at another share of the round's start, training nothing (``--extend``
    with only ``--blend-start``): final.pt becomes last.pt's tuned weights blended anew; run.json records an
    extension of no iterations, its recipe the new share; session.json the share applied."""
    timer = time.perf_counter()
    last = folder / "last.pt"
    if not last.is_file():
        raise SessionError(f"{last}: the run's checkpoint is missing; {MODE_HELP['restart']}")
    model = round_start_model(session)
    fresh = _fresh_tensors(session, model)
    tuned = torch.load(last, map_location="cpu", weights_only=True)["network"]
    result = AdaptResult("done", folder / "final.pt", mode="extend", iterations=dict(run["done"]))
    result.blend = handover_anew(run, folder, share) or 0.0
    say(
        f"stage 2 has run its {run['done']['stage2']} iterations, so nothing trains: the tuned weights (last.pt) "
        + (
            f"are handed over blended with {result.blend:.0%} of the round's starting weights"
            if result.blend
            else "are handed over as they are (--blend-start 0)"
        )
    )
    entry = {"mode": "extend", "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "done", "handover_anew": True}
    entry["recipe"] = run["recipe"] = (run.get("recipe") or {}) | {"blend_start": share}
    entry["handover_blend"] = result.blend  # the share applied; no iteration ran, so no stage is listed
    run["history"].append(entry)
    if distributed.is_main():
        blended = blend_state(tuned, model.network.state_dict(), result.blend, fresh)
        atomic_write(result.checkpoint, lambda tmp: torch.save(blended, tmp))
        metrics = {k: v for k, v in (round_entry.get("metrics") or {}).items() if k != "runs"}
        seconds = metrics.get("seconds") or {}
        seconds["handover"] = seconds.get("handover", 0.0) + time.perf_counter() - timer
        metrics |= {"handover_blend": result.blend, "seconds": seconds}
        _finish_record(session, run, folder, session.relative(result.checkpoint), metrics)
    result.seconds = {"handover": time.perf_counter() - timer}
    result.summary = f"round {round_entry['index']} handed over anew, no iteration run"
    return result


def _finish_record(session: Session, run: dict, folder: Path, checkpoint: str, metrics: dict[str, Any]) -> None:
    """Record a finished run whose model (``checkpoint``) is on disk: run.json first, with what session.json's
    round is to say of it (``handover``), then session.json; a process stopped between the two leaves run.json
    holding it, and the next fine-tune records it (:func:`_record_stopped_handover`)."""
    run["finished"] = True
    run["handover"] = {"checkpoint": checkpoint, "metrics": metrics}
    atomic_write_json(folder / "run.json", run)
    record_handover(session, run)
    session.save()


def _record_stopped_handover(session: Session, run: dict | None, mode: str, say: Callable[[str], None]) -> bool:
    """Where the newest round's run finished and its process was stopped before session.json recorded it, record
    it now and say so. True where that was all a fine-tune of ``mode`` (a first run or a resume: the run's
    own) had left to do."""
    if not handover_pending(session, run):
        return False
    index = session.rounds[-1]["index"]
    if distributed.is_main():
        record_handover(session, run)
        session.save()
    say(f"round {index}'s run had finished ({done_text(run['done'])}); session.json records its model now")
    return mode in ("new", "resume")


def _set_aside(folder: Path) -> Path:
    """Move an earlier run of the round out of the way, never deleting it."""
    k = 1
    while (aside := folder.with_name(f"{folder.name}-replaced-{k}")).exists():
        k += 1
    folder.rename(aside)
    return aside


def _record_aside(session: Session, round_entry: dict, run: dict | None, folder: Path, aside: Path) -> None:
    """Record in the round (not saved here) that its run in ``folder`` (``run``: its record) now lies in ``aside``:
    what it was, under the round's ``replaced``, and the round's model until a new run finishes."""
    previous = session.path(round_entry["checkpoint"]) if round_entry.get("checkpoint") else None
    # whether the round's model is this folder's (else an earlier restart set it aside already)
    owned = previous is not None and previous.is_relative_to(folder.resolve())
    if owned:  # it moved with the folder
        previous = aside.resolve() / previous.relative_to(folder.resolve())
    # the round's metrics describe its model: this folder's final.pt, or one an earlier restart set aside
    metrics = round_entry.get("metrics") or {}
    mine = metrics if owned else {}
    replaced = {"folder": session.relative(aside), "iterations": mine.get("iterations")}  # its final.pt's
    if run is not None and not run["finished"]:  # and how far the unfinished run after it got (its last.pt)
        replaced |= {"unfinished": dict(run["done"]), "status": (run["history"] or [{}])[-1].get("status")}
    # what the set-aside run's stage 2 trained on, so the record alone tells the runs apart
    stage2 = ("pseudo_gate", "pseudo_labelled", "pseudo_teacher", "pseudo_augment", "pseudo_mix", "handover_blend")
    kept = (*stage2, "seconds")
    replaced |= {k: mine[k] for k in kept if k in mine}
    for key, field_ in (
        ("pseudo_teacher", "teacher"),
        ("pseudo_augment", "pseudo_augment"),
        ("pseudo_mix", "pseudo_mix"),
    ):
        ran = [h[field_] for h in (run or {}).get("history", []) if field_ in h and "stage2_lr" in h]
        if key not in replaced and ran:  # an unfinished run's (what its stage 2 ran with)
            replaced[key] = ran[-1]
    round_entry.setdefault("replaced", []).append(replaced)
    # until the new run finishes, the round's model stays the finished one set aside (predict and export
    # use it, and say so), with what trained it; an interrupted restart then loses nothing
    if previous is not None and previous.is_file():
        round_entry["checkpoint"] = session.relative(previous)
        # its time stays in the replaced record: the new run's own time starts from none
        round_entry["metrics"] = {k: v for k, v in metrics.items() if k != "seconds"}
    else:
        round_entry["checkpoint"], round_entry["metrics"] = None, {}


def _record_stopped_aside(session: Session, round_entry: dict, folder: Path, say: Callable[[str], None]) -> None:
    """A restart stopped (SIGKILL, a power cut) between setting the round's earlier run aside and recording it:
    session.json still names the run's model where it was. Recorded now, as the restart would have."""
    listed = {entry["folder"] for entry in round_entry.get("replaced", [])}
    found = folder.parent.glob(f"{folder.name}-replaced-*")
    for aside in sorted(found, key=lambda p: (len(p.name), p.name)):  # in the order set aside: -2 before -10
        if aside.is_dir() and session.relative(aside) not in listed:
            _record_aside(session, round_entry, read_run(aside), folder, aside)
            session.save()
            say(f"round {round_entry['index']}'s earlier run, set aside in {session.relative(aside)}, is recorded now")


def finetune_session(
    session: Session,
    config: FinetuneConfig,
    pseudo: bool = True,
    mode: str = "new",
    cancel: threading.Event | None = None,
    progress: ProgressFn | None = None,
    on_status: Callable[[str], None] | None = None,
    validation: list[tuple[Path, Path]] | None = None,
) -> AdaptResult:
    """Fine-tune the session's model on its labels (stage 1), then with selective pseudo-labels (stage 2).

    ``mode``: ``new`` (the round's first run), ``resume`` (an interrupted run, to its own targets),
    ``extend`` (a finished run, further, to ``config``'s iteration counts; at the length stage 2 ran, only
    handed over anew at ``config.blend_start``) or ``restart`` (the round
    again from its start). session.json records the iterations that ran, never the ones asked for. The
    session's lock is held for the call (taken here unless held already), so no other run trains it meanwhile.
    """
    with session.held():
        return _finetune_session(session, config, pseudo, mode, cancel, progress, on_status, validation)


def _finetune_session(
    session: Session,
    config: FinetuneConfig,
    pseudo: bool,
    mode: str,
    cancel: threading.Event | None,
    progress: ProgressFn | None,
    on_status: Callable[[str], None] | None,
    validation: list[tuple[Path, Path]] | None,
) -> AdaptResult:
    say = on_status or (lambda _msg: None)
    session.refuse_missing_labels()
    labelled = session.labelled()
    if not labelled:
        raise SessionError(f"{session.root}: no labels yet; label the queried volumes or 'asfda labels import'")
    if not session.rounds:
        session.add_round([], {}, session.data["model"]["digest"])
    round_entry = session.rounds[-1]
    index = round_entry["index"]
    folder = session.root / "checkpoints" / f"round{index}"
    if distributed.is_main():
        _record_stopped_aside(session, round_entry, folder, say)
    run = read_run(folder)
    if run and run["history"] and run["history"][-1]["status"] == "running":
        # this call holds the session's lock, so that run is not going on: it was killed without a word
        record_killed(run)
        if distributed.is_main():
            atomic_write_json(folder / "run.json", run)
            # session.json lists it at once, whatever this call does next (a refusal included)
            round_entry["metrics"] = (round_entry.get("metrics") or {}) | {"runs": listed_runs(run)}
            session.save()
    if _record_stopped_handover(session, run, mode, say):
        summary = f"round {index}'s run had finished: nothing left to run"
        return AdaptResult("done", folder / "final.pt", mode, dict(run["done"]), summary)
    labels = session_labels(session)
    mode = check_mode(mode, run, config, folder, index, pseudo, labels)
    if mode == "extend" and 0 < run["done"]["stage2"] == config.pseudo_iterations:  # only the share is new
        return _hand_over_anew(session, round_entry, run, folder, config.blend_start, say)
    session.refuse_image_changes()  # before any long work: a label must fit the voxels it trains with
    if mode in ("resume", "extend") and (folder / "pseudo" / "pseudo.json").is_file():  # and a stored pseudo-label
        _refuse_changed_pseudo_scans(session, folder / "pseudo")
    query = unlabelled_new_query(session, labelled) if mode in ("new", "restart") else []
    if query:  # the earlier rounds' labels alone: the round's query, the reason it exists, would teach nothing
        raise SessionError(
            f"{session.root}: round {index}'s query ({', '.join(query)}) has no label yet, so this would train on "
            f"the earlier rounds' labels only; label it first ('asfda labels {as_arg(session.root)}' lists it, 'asfda "
            f"labels import {as_arg(session.root)} --from DIR' imports it)"
        )
    # Everything that can refuse (the model, the memory estimate, the labels) comes before anything changes:
    # a refused --restart must leave the finished run where it was.
    model = round_start_model(session)
    # what the round starts from, for the blend it may hand over (a copy of the weights: only where one may)
    may_blend = pseudo and config.blend_start > 0
    start_state = {k: v.detach().clone() for k, v in model.network.state_dict().items()} if may_blend else {}
    fresh = _fresh_tensors(session, model)
    trainer = Trainer(model.network, model.card, config, folder, model.load_report)
    say(f"loading {len(labelled)} labelled volumes")
    cases = [load_case(n, session.image_path(n), p, model.card) for n, p in sorted(labelled.items())]
    val_cases = [load_case(case_id(i.name), i, lab, model.card) for i, lab in validation or []]
    if mode == "restart" and distributed.is_main():
        aside = _set_aside(folder)
        say(f"training round {index} again from its start; the earlier run is kept in {session.relative(aside)}")
        _record_aside(session, round_entry, run, folder, aside)
        session.save()
        run = None
    distributed.barrier()
    if mode in ("new", "restart"):
        targets = {"stage1": config.iterations, "stage2": config.pseudo_iterations if pseudo else 0}
        run = {"targets": targets, "done": {"stage1": 0, "stage2": 0}, "finished": False, "history": []}
    elif mode == "extend":
        stage2_ran = run["done"]["stage2"] > 0
        run["targets"] = {
            "stage1": run["done"]["stage1"] if stage2_ran else config.iterations,
            "stage2": config.pseudo_iterations if (stage2_ran or pseudo) else 0,
        }
    elif run["targets"] is None:  # resuming a run without a record: the targets it was started with are unknown
        run["targets"] = {"stage1": config.iterations, "stage2": config.pseudo_iterations if pseudo else 0}
    targets = run["targets"]
    run["finished"] = False  # until this call reaches its targets (an extend cancelled half-way is unfinished)
    # Resume and extend load this round's own last checkpoint over the round's starting weights.
    if mode == "extend" and not trainer.load():
        raise SessionError(f"{trainer.last_path}: the run's checkpoint is missing; {MODE_HELP['restart']}")
    if mode == "resume" and not trainer.load():
        say("the interrupted run saved no checkpoint yet: it starts from the beginning")
        run["done"] = {"stage1": 0, "stage2": 0}
    elif mode == "resume":  # how the run ended, and where its newest checkpoint stands
        stage = trainer.stage.replace("stage", "stage ")
        say(
            f"resuming the {how_ended(run)} run from its newest checkpoint: {stage}, iteration {trainer.iteration} of "
            f"{targets[trainer.stage]}"
        )
    if mode in ("resume", "extend") and trainer.iteration:
        count_checkpoint(run, trainer.stage, trainer.iteration)  # the checkpoint loaded is the truth
        if mode == "resume" and run["history"]:  # of the stopped run too, stopped after last.pt and before last.json
            count_last(run)
    before = dict(run["done"])
    entry = {"mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "running"}
    # the optimizer's base rates (a loaded checkpoint holds its last step's), so the record says what trained how fast
    entry["learning_rates"] = [
        {"group": g["name"], "lr": lr, "tensors": len(g["params"])}
        for g, lr in zip(trainer.optimizer.param_groups, trainer.base_lrs)
    ]
    entry["lower_rate_for"] = config.lower_rate_for
    entry["checkpoint_every"] = config.checkpoint_every  # how much a kill can cost; a resume keeps it
    # what this run trains with; the run's own is the newest start's or extension's, which a resume keeps
    entry["recipe"] = {k: getattr(config, k) for k in (RUN_RECIPE if targets["stage2"] else RUN_TRAINING)}
    if mode != "resume":
        run["recipe"] = entry["recipe"]
    elif run.get("recipe") and "blend_start" in entry["recipe"]:  # a resume may take another share: it is kept
        run["recipe"]["blend_start"] = config.blend_start
    entry["labels"], entry["world_size"] = labels, distributed.world()  # what it trains on, on how many processes
    ran_on = run["history"][-1].get("world_size") if mode == "resume" and run["history"] else None
    if ran_on not in (None, entry["world_size"]):  # a lost node: go on, and say what it changes
        now, size = entry["world_size"], config.batch_size
        say(
            f"the run trained on {ran_on} processes and resumes on {now}: each process draws its own batch of "
            f"{size}, so the batch of a step is now {now * size}, not {ran_on * size}"
        )
    decays = ""
    if targets["stage2"] > before["stage2"]:  # how stage 2's rate runs: held, or decayed along a cosine
        entry["stage2_lr"] = config.stage2_lr
        # the augmentation, teacher and mix asked for (a resume's or an extension's: the run's own); "pseudo_augment",
        # "teacher" and "pseudo_mix", the ones that ran, once the gate has judged ("none": nothing passed)
        entry["pseudo_augment_asked"] = config.pseudo_augment
        entry["teacher_asked"] = config.teacher
        entry["pseudo_mix_asked"] = config.pseudo_mix
        if config.stage2_lr == "cosine":
            decays = f"; stage 2 decays them to zero along a cosine over its {targets['stage2']} iterations"
    say(
        "learning rates: "
        + ", ".join(f"{r['lr']:.1e} for {r['tensors']} {r['group']} parameter tensors" for r in entry["learning_rates"])
        + decays
    )
    before_stage2 = stage2_recipe(run) if mode == "extend" else {}  # how stage 2 ran before this extension
    run["history"].append(entry)

    def note(status: str) -> None:
        """How this run stands and what it ran, as the trainer counted it, in its entry of the run record."""
        entry["status"] = status
        for stage in ("stage1", "stage2"):
            if run["done"][stage] != before[stage]:
                entry[stage] = [before[stage], run["done"][stage]]

    def record(status: str) -> None:
        """What ran, written before anything else can go wrong (a finished run's: :func:`_finish_record`)."""
        note(status)
        if distributed.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder / "run.json", run)
            if status in ("cancelled", "interrupted", "failed"):
                # session.json lists the run too; its iterations stay those of the round's finished checkpoint
                round_entry["metrics"] = (round_entry.get("metrics") or {}) | {"runs": listed_runs(run)}
                session.save()
        if status == "cancelled":  # the caller's result says what ran too, as the records do
            result.iterations = dict(run["done"])
            result.summary = _summary(mode, index, before, run["done"]) + " before it was cancelled"

    def count() -> None:
        run["done"][trainer.stage] = trainer.iteration

    record("running")
    result = AdaptResult("done", None, mode=mode)
    try:
        timer = time.perf_counter()
        if trainer.stage == "stage1":
            result.status = trainer.run(cases, targets["stage1"], None, cancel, progress, val_cases)
            count()
            result.seconds["stage1"] = time.perf_counter() - timer
            if result.status == "cancelled":
                record("cancelled")
                return result
            if distributed.is_main():
                atomic_write(folder / "stage1.pt", lambda tmp: torch.save(model.network.state_dict(), tmp))
        pseudo_cases: list[Case] = []
        if targets["stage2"] > 0:
            timer = time.perf_counter()
            made = not (folder / "pseudo" / "pseudo.json").is_file()
            if made and distributed.is_main():
                say("scoring the unlabeled pool for reliable pseudo-labels")
                build_pseudo_labels(session, model, cases, folder / "pseudo", config, say)
            distributed.barrier()  # under torchrun, rank 0 writes the pseudo-labels and every rank reads them
            if (folder / "pseudo" / "pseudo.json").is_file():
                stored = _load_pseudo(session, model, folder / "pseudo")
                pseudo_cases, result.kept, result.reliability, result.gate = stored
            result.seconds["pseudo_labels"] = time.perf_counter() - timer
            gate = (result.gate or {}).get("reliability", config.reliability)
            asked = (result.gate or {}).get("asked") or gate  # the gate chosen, where its fallback judged
            if not result.reliability:  # no unlabeled volume to judge: no gate ran, and the records say none
                gate, result.gate = None, None
            if targets["stage2"] > before["stage2"]:  # what this stage 2 trains on: the gate that judged (the
                # recipe holds the one asked for) and the volumes it kept, most reliable first
                entry["pseudo_gate"], entry["pseudo_labelled"] = gate, list(result.kept)
            if not pseudo_cases:
                if targets["stage2"] > before["stage2"]:  # no teacher, augmentation or mix of pseudo-labels ran
                    entry["teacher"] = entry["pseudo_augment"] = entry["pseudo_mix"] = "none"
                # the iterations asked for still run, on the labels alone, as the benchmark's row does
                why = f"passed the {gate} gate" if result.reliability else "is left in the pool"
                say(f"no unlabeled volume {why}: stage 2 trains on the labels alone{_why_none(result)}")
            elif made:
                say(_passed(result, len(pseudo_cases)))
            else:
                # a resume or extend keeps what was made, whatever gate is named now
                other = (
                    "; --restart (the panel's Train again) makes them anew with another"
                    if asked != config.reliability
                    else ""
                )
                say(
                    f"stage 2 keeps this round's {len(pseudo_cases)} pseudo-labelled volumes, made by the {gate} "
                    f"gate{other}"
                )
            if pseudo_cases:
                # who labels the patches, now that the gate has judged; recorded at once where it will teach
                fallback_judged = bool((result.gate or {}).get("asked"))
                result.teacher = stage2_teacher(config.teacher, fallback_judged)
                result.augment = stage2_augment(config.pseudo_augment, fallback_judged)
                result.mix = stage2_mix(config.pseudo_mix, result.teacher)
                trainer.config = replace(
                    config, teacher=result.teacher, pseudo_augment=result.augment, pseudo_mix=result.mix
                )
                if targets["stage2"] > before["stage2"]:
                    entry["teacher"], entry["pseudo_augment"] = result.teacher, result.augment
                    entry["pseudo_mix"] = result.mix
                    if result.teacher == "ema":  # its voxel gate and its labels' weight, which a resume must keep
                        entry["confidence"], entry["ema_weight"] = config.confidence, config.ema_weight
                    record("running")
                if result.teacher == "ema":
                    why = "; the fallback gate judged, so the labels improve as the model does" * fallback_judged
                    say(f"an EMA teacher (the model's moving average) relabels the pseudo-labelled patches online{why}")
                else:
                    say("the gate's pseudo-labels teach as they were made (the fixed teacher, --pseudo-teacher)")
                say(augment_line(result.augment, config.pseudo_augment, fallback_judged))
                if config.pseudo_mix != "none":
                    say(MIX_LINES[result.mix])
                augmented = before_stage2.get("pseudo_augment")
                # the run's mix as it ran: an extension keeps the teacher
                mixed = stage2_mix(before_stage2["pseudo_mix"], result.teacher) if before_stage2 else None
                if targets["stage2"] > before["stage2"]:
                    if augmented and augmented != result.augment:
                        say(
                            f"the extension augments them as {result.augment}, where the run's stage 2 had "
                            f"{augmented}; run.json lists both, session.json the newest"
                        )
                    if mixed and mixed != result.mix:
                        say(
                            f"the extension's mix of them is {result.mix}, where the run's stage 2 had {mixed}; "
                            "run.json lists both, session.json the newest"
                        )
            timer = time.perf_counter()
            trainer.begin_stage("stage2")
            result.status = trainer.run(cases, targets["stage2"], pseudo_cases or None, cancel, progress, val_cases)
            count()
            result.seconds["stage2"] = time.perf_counter() - timer
            if result.status == "cancelled":
                record("cancelled")
                return result
        if targets["stage2"] > 0:  # the handover: a blend with the start where it vouched for the pool
            gate = (result.gate or {}).get("reliability", "")
            result.blend = handover_share(config.blend_start, gate, len(pseudo_cases)) if may_blend else 0.0
            if result.blend:
                tuned = model.network.state_dict()
                model.network.load_state_dict(blend_state(tuned, start_state, result.blend, fresh))
                say(
                    f"handing over the tuned weights blended with {result.blend:.0%} of the round's starting "
                    "weights, which vouched for the pseudo-labelled volumes (--blend-start; last.pt keeps the "
                    "tuned ones)"
                )
            elif config.blend_start:
                say(f"handing over the tuned weights as they are: {_why_no_blend(gate)}")
            else:
                say("handing over the tuned weights as they are (--blend-start 0)")
            entry["handover_blend"] = result.blend  # the share applied ("recipe" holds the one asked for)
        note("done")
        result.iterations = dict(run["done"])
        result.summary = _summary(mode, index, before, run["done"])
        final = folder / "final.pt"
        result.checkpoint = final
        if not distributed.is_main():
            return result
        # the model first: run.json calls the run finished only once its model is on disk
        atomic_write(final, lambda tmp: torch.save(model.network.state_dict(), tmp))
        previous_seconds = (round_entry.get("metrics") or {}).get("seconds") or {}
        metrics = {
            "labelled": sorted(labelled),
            "pseudo_labelled": result.kept,
            "pseudo_gate": result.gate,
            **(
                {"pseudo_teacher": result.teacher, "pseudo_augment": result.augment, "pseudo_mix": result.mix}
                if result.teacher
                else {}
            ),
            "handover_blend": result.blend,  # the starting weights' share of final.pt, as applied
            # every run of the round adds its time: an extend does not erase stage 1's
            "seconds": {
                k: previous_seconds.get(k, 0.0) + result.seconds.get(k, 0.0)
                for k in {*previous_seconds, *result.seconds}
            },
            "iterations": dict(run["done"]),  # what ran, as counted by the trainer
        }
        _finish_record(session, run, folder, session.relative(final), metrics)
        return result
    except BaseException as exc:
        # Ctrl-C, SIGTERM (the CLI turns it into Ctrl-C) or an error such as running out of GPU memory: what
        # the newest checkpoint holds is what ran (iterations after it are lost on a resume), and the run is
        # unfinished even if only writing its final model failed (a resume then writes it).
        if trainer.saved is not None:
            count_checkpoint(run, *trainer.saved)
        run["finished"] = False
        # a stop is not a failure: Ctrl-C, or the reader of the output gone (`| head`: a broken pipe, which
        # rich's console turns into SystemExit) stops the run as SIGPIPE would, resumable like an interruption
        lost = distributed.peer_lost(exc)  # another torchrun process left: torchrun stops this one next
        stopped = lost or isinstance(exc, (KeyboardInterrupt, BrokenPipeError, SystemExit))
        if lost:
            entry["stopped"] = f"another process of the torchrun job left ({brief(exc)})"
        elif isinstance(exc, BrokenPipeError):
            entry["stopped"] = "the output's reader left (a closed pipe)"
        elif isinstance(exc, SystemExit):  # rich's console exits so where the output's reader left
            entry["stopped"] = f"the process was told to exit (SystemExit {exc.code}), e.g. the output's reader left"
        elif not stopped:  # why it failed, in the record (out of memory, say)
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
        record("interrupted" if stopped else "failed")
        raise


def _why_no_blend(gate: str) -> str:
    """Why a round hands over its tuned weights unblended (``FinetuneConfig.blend_start`` > 0)."""
    if gate == "rounds":
        return "the round's starting model vouched for no unlabeled volume"
    if gate:
        return f"the {gate} gate judged the pool, not the round's starting model (the rounds gate)"
    return "no pseudo-labels were made"


def _summary(mode: str, index: int, before: dict, done: dict) -> str:
    verb = {"new": "trained", "resume": "resumed", "extend": "extended", "restart": "trained again"}[mode]
    parts = [
        f"stage {s[-1]} {before[s]} -> {done[s]}" if before[s] else f"stage {s[-1]} {done[s]}"
        for s in ("stage1", "stage2")
        if done[s] != before[s]
    ]
    return f"round {index} {verb}: " + (", ".join(parts) + " iterations" if parts else "nothing left to run")


def prediction_name(path: Path, root: Path | None = None) -> str:
    """The file a prediction of ``path`` is written to: the input's name and format (DICOM -> NIfTI; a header
    with its data beside it, .nhdr or .mhd, -> the one-file form of its format, .nrrd or .mha, as
    volumes.write_volume writes it, so that no map depends on a second file). Given the ``root`` of a pool
    searched recursively, under the sub-folder the input lies in there (``site1/a.nii.gz``, with ``/``)."""
    name = path.name if path.is_file() else f"{path.name}.nii.gz"
    for detached, whole in ((".nhdr", ".nrrd"), (".mhd", ".mha")):
        if name.lower().endswith(detached):
            name = name[: -len(detached)] + whole
    # a DICOM series given as the images folder itself lies at the top of it, not in a sub-folder
    inside = root is not None and Path(path).parent.is_relative_to(root)
    folder = relative_name(path.parent, root) if inside else "."
    return name if folder == "." else f"{folder}/{name}"


def predictions_folder_for(images: Path) -> Path:
    """A folder to suggest for predictions: beside the images, or beside the session folder the images lie in
    (a session keeps every file inside it, so a suggestion there would be refused too)."""
    from ASFDALib.outputs import session_folder_of

    folder = session_folder_of(Path(images).parent) or Path(images)
    if folder.name in ("", ".."):  # '.' or '..' given: the folder they name has the name to go beside
        folder = folder.absolute().resolve()
    return folder.with_name(folder.name + "_pred")


@dataclass(frozen=True)
class PredictionPlan:
    """What a prediction run will read and write, checked before any map is: ``scans`` under the images
    folder, ``targets`` their label maps under ``out`` (in the same order, at the same paths under it as the
    scans under the images folder), ``replaced`` the targets an earlier prediction run wrote, which this one
    replaces; ``names`` the scans' names under the images folder (``site1/a.nii.gz`` in a recursive pool)."""

    scans: list[Path]
    targets: list[Path]
    replaced: list[Path]
    names: list[str]
    hold: Any = None  # the output folder's lock (outputs.hold_predictions), from the claim to the last map
    out: Path | None = None
    fix: str = ""
    passed_over: list[Path] = field(default_factory=list)  # files of the images folder that are no volume
    # sub-folders holding DICOM series deeper than a walk without --recursive looks (a CD's patient folders)
    deeper: list[Path] = field(default_factory=list)
    kept_out: list[Path] = field(default_factory=list)  # ASFDA sessions a recursive walk met in the images folder

    def claim(self) -> PredictionPlan:
        """This plan with ``out`` held and its targets claimed in the manifest (the checks made again under
        the hold: another run may have written there since the plan was made)."""
        from ASFDALib.outputs import claim_predictions, hold_predictions

        hold = hold_predictions(self.out)  # the claim and every map after it are this run's alone
        try:
            return replace(self, replaced=claim_predictions(self.out, self.targets, self.fix), hold=hold)
        except BaseException:
            hold.release()
            raise

    def release(self) -> None:
        """Free the output folder for another run (predict_folder does at its end; the OS at the process's)."""
        if self.hold is not None and self.hold.is_locked:
            self.hold.release()
            Path(self.hold.lock_file).unlink(missing_ok=True)  # no lock file left among the maps


def plan_predictions(
    images: Path,
    out: Path,
    protected: Iterable[Path] = (),
    fix: str | None = None,
    claim: bool = True,
    recursive: bool = False,
    exclude: Iterable[Path] = (),
) -> PredictionPlan:
    """Refuse, before anything is written, a prediction run that would lose a file: ``out`` being the images
    folder or inside it or a session folder, a map landing on a scan, on a file of ``protected`` (a session's),
    on a file no prediction run wrote (e.g. reference labels) or outside ``out`` (through a sub-folder linked
    elsewhere), two scans sharing a map's name; then claim the targets in ``out``'s manifest, so a rerun or a
    resumed run replaces them. ``fix``: the remedy the refusals name (default: another output folder, beside
    the images). ``claim=False``: the refusals alone, writing nothing (a caller that loads the model in between
    calls :meth:`PredictionPlan.claim` after). ``recursive``: the scans of sub-folders too, as ``asfda rank
    --recursive`` finds them (but in ``exclude``: a session folder kept in the pool), each map at its scan's path
    under ``out`` (``out/site1/a.nii.gz``)."""
    from ASFDALib.outputs import (
        claim_predictions,
        path_inside,
        refuse_inside_session,
        refuse_overwrite,
        refuse_same_folder,
    )

    images, out = Path(images), Path(out)
    exclude = tuple(exclude)
    walked = walk_pool(images, recursive, exclude)  # one walk: the scans, what is no scan, the sessions kept out
    scans, others = walked.volumes, walked.others
    if not scans:
        raise ASFDAError(no_volumes_message(images, others, recursive, "segment", exclude))
    fix = fix or f"choose another output folder, e.g. {predictions_folder_for(images)}"
    refuse_same_folder(out, images, "images", fix)
    if out.resolve().is_relative_to(images.resolve()):  # maps among the scans: a recursive rank would meet them
        raise ASFDAError(f"{out}: is inside the images folder {images}, where the maps would mix with the scans; {fix}")
    refuse_inside_session(out, fix)
    root = images if recursive else None
    targets = [out / prediction_name(p, root) for p in scans]
    seen: dict[Path, Path] = {}
    for target, scan in zip(targets, scans):  # a.nhdr and a.nrrd both make a.nrrd: the second map would replace
        if (first := seen.setdefault(target, scan)) != scan:
            raise ASFDAError(
                f"{scan}: its label map would be {relative_name(target, out)}, as {first.name}'s is; rename one of "
                "the two scans"
            )
        # a sub-folder of out that links elsewhere would put the map there, perhaps over a file no check saw
        path_inside(out, relative_name(target, out), scan, f"the output folder {out}", fix)
    refuse_overwrite(targets, scans, "the input scan", fix)
    refuse_overwrite(targets, protected, "a file the session references", fix)
    existing = claim_predictions(out, targets, fix, check_only=True)  # refused before the folder is touched
    names = [p.name if p == images else relative_name(p, images) for p in scans]  # a series given itself
    deeper = [] if recursive else deeper_series(images, scans, exclude)  # left out unsaid otherwise, as rank names them
    plan = PredictionPlan(
        scans, targets, existing, names, out=out, fix=fix, passed_over=others, deeper=deeper, kept_out=walked.sessions
    )
    return plan.claim() if claim else plan


def predict_folder(
    model: LoadedModel,
    images: Path,
    out: Path,
    device: str = "auto",
    progress: Callable[[int, int, str], None] | None = None,
    made_by: dict | None = None,
    protected: Iterable[Path] = (),
    fix: str | None = None,
    plan: PredictionPlan | None = None,
    recursive: bool = False,
    exclude: Iterable[Path] = (),
) -> tuple[list[Path], list[str]]:
    """Label maps for every volume under ``images`` in the input's own grid and format (DICOM -> NIfTI),
    written to ``out``; returns (maps written, reasons for the files skipped). Refused first, writing nothing,
    where a map would land on a scan or another file it must not replace (:func:`plan_predictions`; a
    session's files in ``protected``). ``out``'s manifest records which model wrote each map (``made_by``;
    default: a session's model as :func:`session_model` loaded it, else the model file and its digest) and the
    SHA-256 of the scan it segments. ``plan``: one a caller
    made already (to say what it replaces before the model loads), so its checks are not made twice.
    ``recursive``: the volumes of sub-folders too, each map at its scan's path under ``out``
    (``images/site1/a.nii.gz`` -> ``out/site1/a.nii.gz``), as ``asfda predict --recursive``; ``exclude``:
    sub-folders that hold no scans, and always the session a session's model comes from, as the command leaves
    it out (a session kept in the pool: its labels and cache are the session's)."""
    from ASFDALib.outputs import mark_writing, record_predictions

    if plan is None:
        own = (model.made_by or {}).get("session")
        exclude = [*exclude, Path(own)] if own else list(exclude)
        plan = plan_predictions(images, out, protected, fix, recursive=recursive, exclude=exclude)
    made_by = made_by or model.made_by or {"model": str(Path(model.path).resolve()), "digest": model.digest}
    written, skipped = [], []
    try:
        for i, (path, target, name) in enumerate(zip(plan.scans, plan.targets, plan.names)):
            if progress:
                progress(i, len(plan.scans), name)
            try:
                volume = read_scan(path)  # a label map in the folder is skipped with its reason, not segmented
            except VolumeError as exc:
                skipped.append(str(exc))
                continue
            image = preprocess(volume, model.card)
            label = predict_label(model.network, image, model.card, device).astype(np.uint8)
            native = labels_to_native(label, image.affine.numpy(), volume.array.shape, volume.affine)
            mark_writing(plan.out, relative_name(target, plan.out))
            written.append(write_volume(target, native, volume.affine))
            # each map recorded as it is written: an interrupted run's maps are its own to replace on a rerun
            made_from = {relative_name(target, plan.out): content_hash(path)}
            record_predictions(plan.out, written[-1:], made_by, made_from)
    finally:
        plan.release()
    if progress:
        progress(len(plan.scans), len(plan.scans), "")
    return written, skipped
