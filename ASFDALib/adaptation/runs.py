"""A round's run record (``checkpoints/roundN/run.json``): reading it, how the run ended, what it started
with and how its stage 2 ran, so that a resume or an extension goes on as the run ran.

Torch-free on purpose: ``asfda labels``, ``asfda rank`` and the Slicer panel read a run's state without
importing the training engine.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ASFDALib.adaptation.session import Session
from ASFDALib.errors import as_arg

SAVED_FILE = "last.json"  # beside last.pt: the stage and iteration it holds

FINETUNE_MODES = ("new", "resume", "extend", "restart")
MODE_HELP = {
    "resume": "--resume continues an interrupted run to its own targets",
    "extend": "--extend trains a finished run further, to the iteration counts you give",
    "restart": "--restart trains this round again from its start (the earlier run is kept aside)",
}


def read_run(folder: Path) -> dict | None:
    """This round's run record (targets, iterations done, history), or None when no run started.

    An unfinished run's iterations are what its newest checkpoint holds (its ``last.json``): run.json is
    rewritten only at a run's start and end, so after a kill it lags behind.
    """
    path, saved = folder / "run.json", folder / SAVED_FILE
    if path.is_file():
        run = json.loads(path.read_text(encoding="utf-8"))
    elif (folder / "last.pt").is_file():  # a run from before run records: interrupted, targets unknown
        run = {"targets": None, "done": {"stage1": 0, "stage2": 0}, "finished": False, "history": []}
    else:
        return None
    if not run["finished"] and saved.is_file():
        try:
            state = json.loads(saved.read_text(encoding="utf-8"))
            count_checkpoint(run, state["stage"], int(state["iteration"]))
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: the run record's own counts stand
    return run


def record_killed(run: dict) -> None:
    """Mark the run record's last run as killed, with the iterations its checkpoint shows it ran."""
    run["history"][-1]["status"] = "killed"
    count_last(run)


def count_last(run: dict) -> None:
    """The iterations of the run record's last run, in its history entry: from where the run before it ended (it
    started there) to the record's ``done``."""
    entry, start = run["history"][-1], {"stage1": 0, "stage2": 0}
    for earlier in run["history"][:-1]:
        start |= {stage: earlier[stage][1] for stage in start if stage in earlier}
    entry |= {stage: [start[stage], run["done"][stage]] for stage in start if run["done"][stage] != start[stage]}


def count_checkpoint(run: dict, stage: str, iteration: int) -> None:
    """Set a run's iterations done to a checkpoint's (a checkpoint in stage 2 means stage 1 reached its target)."""
    run["done"][stage] = iteration
    if stage == "stage2" and not run["done"]["stage1"] and run["targets"]:
        run["done"]["stage1"] = run["targets"]["stage1"]


# what a run's weights depend on beside its targets and stage 2's recipe, recorded when it starts: a resume
# goes on with them, so that it reaches the weights an uninterrupted run reaches
RUN_TRAINING = ("batch_size", "lr", "seed")
# recorded where stage 2 runs: the gate, and the share of the start the handover may blend in (recipe.handover_share)
RUN_GATE = ("reliability", "keep_fraction", "confidence", "min_agreement", "fallback", "blend_start")
RUN_RECIPE = RUN_TRAINING + RUN_GATE


def run_recipe(run: dict | None) -> dict[str, Any]:
    """The batch size, learning rate, seed and pseudo-label gate a round's run last started or was extended
    with (empty for runs recorded before); each entry of its history has the one it ran with."""
    return dict((run or {}).get("recipe") or {})


# how stage 2 ran before run records said, or before each of these was a choice (the values a resume of such a
# run goes on with; the benchmark's SSFT_LATER_FIELDS take them too)
STAGE2_BEFORE_RECORDED = {"stage2_lr": "constant", "pseudo_augment": "weak", "teacher": "fixed", "pseudo_mix": "none"}


def stage2_recipe(run: dict | None) -> dict[str, Any]:
    """How stage 2 last ran in a round's run (its rate schedule, the pseudo-labelled patches' augmentation, mix
    and teacher, an EMA teacher's voxel gate and weight), so a resume or an extension goes on as it ran; empty when
    stage 2 has not run."""
    stage2 = [h for h in (run or {}).get("history", []) if "stage2_lr" in h]
    if not stage2:
        # stage 2 ran before its recipe was recorded (before 2026-12-04): a held rate, weakly augmented patches the
        # fixed teacher labelled, unmixed (recipe.py's defaults then), which a resume must not swap for today's
        # (every run since records it as its stage 2 starts; a kill may leave ``done`` behind, so a planned
        # stage 2 counts too)
        planned = any(((run or {}).get(key) or {}).get("stage2", 0) > 0 for key in ("done", "targets"))
        return dict(STAGE2_BEFORE_RECORDED) if planned else {}
    last = stage2[-1]

    # entries recorded before the augmentation, or the teacher, was a choice augmented weakly, or had the
    # fixed teacher; the augmentation and teacher that ran once the gate has judged, else (none ran: nothing
    # was pseudo-labelled) the ones asked for
    def ran(key: str) -> str | None:
        return last.get(key) if last.get(key) != "none" else None

    recipe = {
        "stage2_lr": last["stage2_lr"],
        "pseudo_augment": ran("pseudo_augment")
        or last.get("pseudo_augment_asked")
        or STAGE2_BEFORE_RECORDED["pseudo_augment"],
        "teacher": ran("teacher") or last.get("teacher_asked") or STAGE2_BEFORE_RECORDED["teacher"],
        # the mix asked for, which resolves by that teacher as it did (recipe.stage2_mix); none before it was a choice
        "pseudo_mix": last.get("pseudo_mix_asked", STAGE2_BEFORE_RECORDED["pseudo_mix"]),
    }
    ema = [h for h in stage2 if "confidence" in h]  # where an EMA teacher labelled: its voxel gate and weight
    if ema:  # (recorded before its weight was a choice: 1, as the fixed labels')
        recipe["confidence"], recipe["ema_weight"] = ema[-1]["confidence"], ema[-1].get("ema_weight", 1.0)
    return recipe


def same_in_effect(key: str, now: Any, then: Any, pseudo: Path | None, teacher: str | None = None) -> bool:
    """Whether a stage-2 choice asked for now does what the run's did. The teacher and the augmentation of the
    pseudo-labelled patches ("ema-if-fallback", "remap-if-fallback") are compared as they resolve once the
    round's pseudo-labels are made (``pseudo``: its pseudo.json), the mix as it resolves under the run's
    ``teacher`` then (none under an EMA teacher), and any two alike when none was kept (nothing was labelled,
    augmented or mixed); every other choice as given."""
    from ASFDALib.adaptation.recipe import stage2_augment, stage2_mix, stage2_teacher

    resolvers = {"teacher": stage2_teacher, "pseudo_augment": stage2_augment}
    if teacher is not None:  # the mix, as it resolves under the run's teacher
        resolvers["pseudo_mix"] = lambda asked, judged: stage2_mix(asked, stage2_teacher(teacher, judged))
    resolve = resolvers.get(key)
    made = json.loads(pseudo.read_text(encoding="utf-8")) if pseudo is not None and pseudo.is_file() else None
    if resolve is None or made is None:
        return now == then
    if not made["kept"]:
        return True
    judged = bool(made.get("gate", {}).get("asked"))  # the fallback judged the pool
    return resolve(now, judged) == resolve(then, judged)


def unlabelled_new_query(session: Session, labelled: Collection[str]) -> list[str]:
    """The newest round's query when it is a later round's and none of it is in ``labelled``: a run that starts
    then would train on the earlier rounds' labels only, and the round exists for its query ([] otherwise)."""
    latest = session.rounds[-1] if session.rounds else {}
    query = latest.get("query") or []
    return query if latest.get("index", 1) > 1 and not any(n in labelled for n in query) else []


def listed_runs(run: dict) -> list[dict]:
    """The run record's history as session.json lists it in the round's ``metrics.runs`` (each run's start last)."""
    return [{k: v for k, v in h.items() if k != "started"} | {"started": h["started"]} for h in run["history"]]


def handed_over(run: dict | None) -> dict | None:
    """What session.json's round records of a finished run: its ``checkpoint`` and ``metrics``, as run.json's
    ``handover`` holds them (written before session.json, so a process stopped between the two leaves them
    there); None where the run has not finished, or finished before run.json kept them."""
    handover = (run or {}).get("handover") if (run or {}).get("finished") else None
    if not handover:
        return None
    return {"checkpoint": handover["checkpoint"], "metrics": handover["metrics"] | {"runs": listed_runs(run)}}


def handover_pending(session: Session, run: dict | None) -> bool:
    """Whether the newest round's ``run`` finished and session.json does not record it yet: the process was
    stopped (SIGKILL, a power cut) between writing run.json and session.json."""
    record = handed_over(run)
    latest = session.rounds[-1] if session.rounds else {}
    return record is not None and {key: latest.get(key) for key in record} != record


def record_handover(session: Session, run: dict) -> None:
    """Record a finished run's model and metrics in the newest round of session.json (not saved here)."""
    session.rounds[-1].update(handed_over(run) or {})


def done_text(done: dict) -> str:
    return f"stage 1: {done['stage1']} iterations, stage 2: {done['stage2']}"


def how_ended(run: dict) -> str:
    """How a round's run ended, as its record says: finished, or cancelled, failed, killed or interrupted."""
    if run["finished"]:
        return "finished"
    ended = (run["history"] or [{}])[-1].get("status")
    return ended if ended in ("cancelled", "failed", "killed") else "interrupted"


def newest_run(session: Session) -> dict | None:
    """The run record of the session's newest round (``read_run``), or None when no round has run."""
    if not session.rounds:
        return None
    return read_run(session.root / "checkpoints" / f"round{session.rounds[-1]['index']}")


def session_labels(session: Session) -> dict[str, str]:
    """Image name -> the content hash of its newest label file: what a fine-tune now trains on. Each run
    records its own (``labels``), so a resume tells a label imported, replaced or removed since; by content,
    so a label saved again unchanged, or a session moved to another system, is the same."""
    # an entry written by hand, or by a tool before hashes were kept, is known by its file instead
    return {name: entry.get("sha256") or entry["file"] for name, entry in sorted(session.label_versions().items())}


def labels_change(before: dict[str, str], now: dict[str, str]) -> str:
    """What became of a run's labelled set, "" if nothing: volumes labelled since, no longer, relabelled."""
    parts = [
        (what, sorted(names))
        for what, names in (
            ("labelled", now.keys() - before.keys()),
            ("no longer labelled", before.keys() - now.keys()),
            ("relabelled", {n for n in before.keys() & now.keys() if before[n] != now[n]}),
        )
        if names
    ]
    return "; ".join(f"{', '.join(names)} {what}" for what, names in parts)


def resume_recipe(run: dict | None) -> dict[str, Any]:
    """Everything a resume goes on with, by the record's names: what the run started with, and how its stage 2
    ran (stage 2's record wins where both name a setting: it says what ran)."""
    return run_recipe(run) | stage2_recipe(run)


def checkpoint_every_of(run: dict | None) -> int | None:
    """How often a round's run last checkpointed (None for runs recorded before it was), which a resume or an
    extension keeps unless told otherwise: a kill then costs what it cost before."""
    history = (run or {}).get("history", [])
    return next((h["checkpoint_every"] for h in reversed(history) if "checkpoint_every" in h), None)


def labels_changed_since(run: dict | None, labels: dict[str, str]) -> str:
    """How ``labels`` (:func:`session_labels`) differ from those a round's run last trained on ("" if they do
    not, or the run did not record them)."""
    last = run["history"][-1] if run and run["history"] else {}
    return labels_change(last["labels"], labels) if "labels" in last else ""


def run_state(session: Session, run: dict, holder: str | None = None) -> str:
    """How a round's run stands now: as its record ended (:func:`how_ended`), except that one recorded as
    running is running where another process holds the session (``holder``: Session.in_use, if known), and
    was killed where none does."""
    if not run["finished"] and run["history"] and run["history"][-1].get("status") == "running":
        return "running" if (session.in_use() if holder is None else holder) else "killed"
    return how_ended(run)


# The panel's Fine-tune buttons for the engine's resume and restart (Resources/UI/ASFDA.ui: finetuneButton once the
# round has a run, finetuneAgainButton)
PANEL_RESUME, PANEL_RESTART = "Continue the last run", "Train again from the round's start"


def finish_ways(session: Session, name: str | Path | None = None, cli: bool = True) -> tuple[str, str]:
    """How the newest round's run is resumed and trained anew: ``asfda finetune``'s commands (``name``: the session
    as the user typed it), or with ``cli`` False the panel's buttons that run them."""
    if not cli:
        return PANEL_RESUME, PANEL_RESTART
    command = f"'asfda finetune {as_arg(name or session.root)}"
    return f"{command} --resume'", f"{command} --restart'"


def finish_hint(session: Session, name: str | Path | None = None, cli: bool = True) -> str:
    """How the newest round's unfinished run is finished, as a command (``name``: the session as the user
    typed it), or with ``cli`` False as what to press in the panel: a resume, or where its labels changed since it
    ran (a resume refuses them), a restart; for a run still going, to wait for it."""
    run = newest_run(session)
    resume, restart = finish_ways(session, name, cli)
    if handover_pending(session, run):
        return f"{resume} records it" if cli else f"press {resume} to record it"
    holder = session.in_use()  # probed once: the run may end in between
    if run is not None and run_state(session, run, holder) == "running":
        then = f"{resume} continues it" if cli else f"press {resume} to continue it"
        return f"wait for it to finish ({holder}), or stop it and {then}"
    if changed := labels_changed_since(run, session_labels(session)):
        how = f"{restart} trains the round on them" if cli else f"press {restart} to train the round on them"
        return f"its labels changed since ({changed}): {how}"
    return f"{resume} finishes it" if cli else f"press {resume} to finish it"


def unfinished_run(session: Session) -> str:
    """ "round N's fine-tune was interrupted (stage 1: i iterations, stage 2: j)" when the newest round has a
    run that did not finish (so its weights are not the session's adapted model), else ""; "is running" while
    another process trains it; "finished, but session.json does not record its model yet" where the process
    was stopped before it could (:func:`handover_pending`)."""
    run = newest_run(session)
    index = session.rounds[-1]["index"] if session.rounds else 1
    if handover_pending(session, run):
        done = done_text(run["done"])
        return f"round {index}'s fine-tune finished, but session.json does not record its model yet ({done})"
    if run is None or run["finished"]:
        return ""
    state = run_state(session, run)
    how = {"running": "is running", "failed": "failed"}.get(state, f"was {state}")
    return f"round {index}'s fine-tune {how} ({done_text(run['done'])})"
