"""Rounds of a session: which model ranks (the given one, or the session's adapted one with the base
model's source knowledge), ranking the pool and recording the query in session.json.

:func:`rank_round` is the one rank orchestration: the CLI and the panel both call it. It also decides what
a round can rank by: a model whose output head is new (an encoder-only checkpoint, or a head re-initialised
for the target's classes with none mapped) has no segmentation for ASD to measure, so its first round ranks by
DKD alone and ASD joins once a fine-tune has trained the head."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ASFDALib import distributed
from ASFDALib.adaptation.runs import finish_hint, finish_ways, unfinished_run
from ASFDALib.adaptation.session import Session
from ASFDALib.atomic import atomic_write
from ASFDALib.data.volumes import content_hash
from ASFDALib.errors import ASFDAError, ModelError
from ASFDALib.inference.predict import check_outputs
from ASFDALib.models.card import card_from_dict
from ASFDALib.models.loading import LoadedModel
from ASFDALib.outputs import refuse_same_folder
from ASFDALib.query.ranking import Progress, RankConfig, Ranking, choose_knowledge, pool_volumes, rank_folder
from ASFDALib.query.report import RankingOutputs, write_ranking
from ASFDALib.query.selection import Knowledge


def ranking_model(
    session: Session,
    load_given: Callable[[], LoadedModel],
    given: Path | str | None,
    knowledge: str = "auto",
    card_given: bool = False,
) -> tuple[LoadedModel, Knowledge | None, list[str]]:
    """The model to rank with, the source knowledge to use (None: the model's own), and notes.

    ``load_given()`` loads the model the user named (or the built-in default); ``given`` is the path the
    user named (None: none), ``card_given`` whether with a card of their own. A session that already has a model
    keeps it, adapted weights included, and keeps the original model's source knowledge; naming a different model
    for it is refused. The same weights whose card, read from the model itself, differs from the one the
    session recorded (a later ASFDA reads a bundle's transforms or nnU-Net's plans more closely) keep the
    session's card, and a note says so.
    """
    from ASFDALib.adaptation.pipeline import session_model

    recorded = session.data.get("model")
    if not recorded:
        return load_given(), None, []
    notes = []
    if given and (named := _load_named(session, load_given, Path(given), card_given)).digest != recorded["digest"]:
        derived = not card_given and named.card.to_dict() != recorded["card"]
        if not (derived and _same_weights(session, named.path)):
            raise ASFDAError(f"{session.root}: {_model_change(named, recorded, card_given)}")
        notes.append(
            f"{named.path}: its card as read now ({named.card.describe_input()}) differs from this session's, "
            f"which it keeps ({card_from_dict(recorded['card']).describe_input()})"
        )
    if given and not Path(recorded["path"]).exists():  # the same model, moved: the session records its new place
        recorded["path"] = str(named.path.resolve())
    model = session_model(session, adapted=True)
    base = session_model(session, adapted=False) if session.adapted_checkpoint() else model
    return model, choose_knowledge(base, knowledge), notes


def _load_named(session: Session, load_given: Callable[[], LoadedModel], path: Path, card_given: bool) -> LoadedModel:
    """The model the user named for a session that has one. One that loads only with what the first rank gave
    with it (an nnssl checkpoint's card, a state dict's network), named alone as a moved model's place is
    ('--model NEW_PATH'), loads as the session recorded it; the digest then says whether it is the session's.
    Never so where the session trusts its model: a file named alone is not trusted to run code."""
    from ASFDALib.adaptation.pipeline import load_as_recorded

    try:
        return load_given()
    except ModelError as refused:
        if card_given or session.data["model"].get("trust"):
            raise
        try:
            return load_as_recorded(session, path)
        except ASFDAError:  # not loadable as the session's model either: the first refusal says why
            raise refused from None


def _same_weights(session: Session, path: Path) -> bool:
    """Whether the model file at ``path``, loaded with the session's card, network and class map, is the one the
    session started with (its digest)."""
    from ASFDALib.adaptation.pipeline import load_as_recorded

    try:
        return load_as_recorded(session, path).digest == session.data["model"]["digest"]
    except ASFDAError:  # weights that do not fit the session's network: another model
        return False


def _model_change(named: LoadedModel, recorded: dict, card_given: bool = False) -> str:
    """What differs between the model named and the one the session started with, as the user can check it, and
    the fix."""
    another = "use another session for another model"
    if Path(recorded["path"]).resolve() != named.path.resolve():
        return f"it was started with {recorded['path']}; {another}"
    changes, given = [], []
    now, was = named.card.to_dict(), recorded["card"]
    if now != was:
        fields = ", ".join(k for k in dict.fromkeys([*was, *now]) if now.get(k) != was.get(k))
        whose = "the card given with --card" if card_given else "the card"
        changes.append(f"{whose} differs from the one it started with (in {fields})")
        given += ["--card"] if card_given else []
    if named.class_map != recorded.get("class_map"):
        had = recorded.get("class_map") or "none"
        changes.append(f"--class-map {named.class_map or 'none'} differs (it had {had})")
        given += ["--class-map"] if named.class_map else []
    if not changes:
        return f"{named.path}'s weights changed since it started; {another}"
    keep = " and ".join(given)
    fix = f"leave {keep} out to rank on with the session's, or rank into another session (--out)" if keep else another
    return f"{' and '.join(changes)}; {fix}"


NEW_HEAD_NOTE = "the model's head is new: round 1 ranks by DKD alone; ASD joins after the first fine-tune"
NEW_HEAD_ASD_NOTE = (
    "the model's head is new: ASD measures an untrained head until the first fine-tune; --strategy asfda "
    "ranks round 1 by DKD alone"
)


def model_record(model: LoadedModel) -> dict[str, Any]:
    """What session.json keeps beside path, card and trust so that later commands rebuild the same model from
    the session alone: the MONAI network and its arguments, the class map, what loading reported, and the card's
    notes (read with the card from the model's own config, which later commands no longer read: every round's
    ranking says them)."""
    return {
        "network": asdict(model.spec) if model.spec is not None else None,
        "class_map": model.class_map,
        "load_report": model.load_report.to_dict() if model.load_report is not None else None,
        "card_notes": list(model.card_notes),
    }


def round_config(session: Session, model: LoadedModel, config: RankConfig) -> tuple[RankConfig, list[str]]:
    """The ranking this round can do, and notes saying why it differs from the one asked for.

    A head the model has not been trained with gives no segmentation worth measuring: until the session has
    an adapted checkpoint, DKD + ASD (``asfda``) ranks by DKD alone (alpha 1).
    """
    if not model.head_is_new or session.adapted_checkpoint() is not None:
        return config, []
    if config.strategy == "asfda":
        return replace(config, alpha=1.0), [NEW_HEAD_NOTE]
    if config.strategy == "asd":
        return config, [NEW_HEAD_ASD_NOTE]
    return config, []


def record_round(
    session: Session,
    model: LoadedModel,
    ranking: Ranking,
    images: Path,
    strategy: dict,
    trust: bool,
    recursive: bool = False,
) -> None:
    """Keep the model, the pool and this query in session.json (re-ranking before fine-tuning replaces it)."""
    if not session.data.get("model"):
        session.set_model(model.path, model.digest, model.kind, model.card.to_dict(), trust, model_record(model))
    unreadable = [r.name for r in ranking.records if r.sha256 and not r.ok]
    session.set_images(images, {r.name: r.sha256 for r in ranking.records if r.sha256}, recursive, unreadable)
    strategy = {**strategy, "knowledge": ranking.knowledge.kind}
    query = [r.file for r in ranking.selected]
    if session.rounds and not session.rounds[-1].get("checkpoint"):
        # A re-rank before fine-tuning replaces the round's query, but what was queried and labelled stays
        # queried: those labels were asked for in this round.
        labelled = session.labelled()
        kept = [n for n in session.rounds[-1]["query"] if n in labelled]
        query = kept + [n for n in query if n not in kept]
        session.rounds[-1].update({"query": query, "strategy": strategy, "model_digest": model.digest})
    elif query:  # nothing left to query (every volume labelled): no empty round
        session.add_round(query, strategy, model.digest)
    session.save()


def pool_change(session: Session, images: Path) -> str:
    """A session ranks one pool, its labels and runs recorded by image name: another ``images`` folder is
    refused where a labelled volume's image is missing there or differs (a folder moved or copied passes), and
    the session's own folder where a labelled volume's image changed since it was labelled. Returns the note
    that says the folder changed ("" if it did not)."""
    recorded = session.data.get("images")
    if not recorded:
        return ""
    if Path(images).resolve() == session.image_root.resolve():
        session.refuse_image_changes()  # its own pool, changed under a label: never re-recorded quietly
        return ""
    hashes = {name: known["sha256"] for name, known in session.labelled_images().items()}  # as each was labelled
    for name in sorted(session.labelled()):
        path = Path(images) / name  # a file, or a DICOM series' folder
        if not path.exists() or hashes.get(name) is None or content_hash(path) != hashes[name]:
            why = (
                "is not in it"
                if not path.exists()
                else "has no recorded content to compare with"
                if hashes.get(name) is None
                else "differs there from the image that was labelled"
            )
            raise ASFDAError(
                f"{images}: session {session.root} ranks {recorded['root']}, and its labelled volume {name} {why}; "
                "rank this folder into another session (--out), or leave out --images to rank the session's own pool"
            )
    now = Path(images).resolve()
    labelled = len(session.labelled())
    known = [f["name"] for f in recorded.get("files", [])]
    shared = sum((now / name).exists() for name in known)
    same = f"its {labelled} labelled volume(s) are the same" if labelled else "no volume was labelled"
    return (
        f"the pool's folder is now {now} (it was {recorded['root']}); {same}, and it holds {shared} of the "
        f"{len(known)} scans recorded"
    )


def rank_round(
    session: Session,
    images: Path,
    load_given: Callable[[], LoadedModel],
    given: Path | str | None,
    config: RankConfig,
    trust: bool,
    progress: Progress | None = None,
    on_model: Callable[[LoadedModel], None] | None = None,
    card_given: bool = False,
    cli: bool = True,
) -> tuple[Ranking, RankingOutputs]:
    """One round's ranking from start to end: choose the model, score and rank the pool, then (on rank 0
    under torchrun) write ranking.csv/json/png and record the query. Returns the ranking and the files
    written. ``on_model`` hears which model ranks before the long work starts. ``cli``: a refusal names
    ``asfda finetune``'s commands, else the panel's buttons."""
    # that run trains on the round's labels as they were: a new query now would change them under it
    if unfinished := unfinished_run(session):
        hint = finish_hint(session, cli=cli)
        _, restart = finish_ways(session, cli=cli)
        anew = f"{restart} trains the round anew" if cli else f"press {restart} to train the round anew"
        anew = "" if restart in hint else f", or label more and {anew}"
        raise ASFDAError(f"{session.root}: {unfinished}; {hint} (the next rank starts a new round){anew}")
    # the session's files would mix with the scans it ranks (the command line refuses it first, naming --out)
    refuse_same_folder(session.root, images, "images", "give the session a folder of its own")
    moved = pool_change(session, Path(images))  # before any long work
    pool = pool_volumes(Path(images), config.recursive, (session.root,))  # a folder of no scans: before the model
    model, knowledge, kept_card = ranking_model(session, load_given, given, config.knowledge, card_given)
    check_outputs(model.network, model.card, str(model.path), config.device)
    if on_model:
        on_model(model)
    config, notes = round_config(session, model, config)
    # what the card read from the model's own config cannot say (a bundle's crop, say): the loader gives notes where
    # it read the card so, and a later rank's model (given the card the session recorded) those the session kept
    notes += ([moved] if moved else []) + kept_card + model.card_notes
    labelled = set(session.labelled())
    budget, kept = config.budget, []
    if session.rounds and not session.rounds[-1].get("checkpoint"):  # a re-rank before fine-tuning
        kept = [n for n in session.rounds[-1]["query"] if n in labelled]  # record_round keeps them queried
        # the budget is the round's query: what is labelled of it counts, so re-ranking to look adds nothing
        config = replace(config, budget=max(0, budget - len(kept)))
    # the session folder may sit inside the pool (--out images/sess): its labels and predictions are not scans
    ranking = rank_folder(
        Path(images), model, session.root / "cache", config, progress, labelled, knowledge, (session.root,), pool
    )
    ranking.budget = budget
    left = sum(r.status == "scored" for r in ranking.rows)  # unlabelled volumes that could be queried
    if 0 < left < config.budget:
        are = "is" if left == 1 else "are"
        more = " more" if kept else ""
        notes.append(
            f"the budget asks for {config.budget}{more} volumes and only {left} {are} left to query: "
            "the query takes all"
        )
    if kept:
        added = len(ranking.selected)
        more = "" if added or not left else f"; --budget above {len(kept)} queries more"
        notes.append(
            f"round {session.rounds[-1]['index']}'s query keeps its {len(kept)} labelled "
            f"volume{'s' * (len(kept) != 1)} and adds {added}: {len(kept) + added} in all, its budget of {budget}"
            f"{more}"
        )
    ranking.notes = notes + ranking.notes  # the pool's own (files passed over) after the round's
    ranking.load_report = model.load_report.to_dict() if model.load_report is not None else None
    # a later round ranks with the newest fine-tuned checkpoint: which one (the first, with the source model)
    first = {"session": str(session.root.resolve()), "model": "source", "digest": model.digest}
    ranking.weights = model.made_by or first
    if not distributed.is_main():
        return ranking, RankingOutputs({}, [])
    written = write_ranking(ranking, session.root)
    strategy = {
        "name": config.strategy,
        "alpha": config.alpha,
        "fusion": ranking.fusion,
        "budget": budget,
        "seed": config.seed,
        **({"mc_passes": config.mc_passes} if config.strategy == "epistemic" else {}),
    }
    if notes:
        strategy["notes"] = notes
    record_round(session, model, ranking, Path(images), strategy, trust, config.recursive)
    # ranking.* at the top are the newest round's; each round keeps its own under rankings/ (a re-rank of a
    # round not yet fine-tuned replaces that round's, as its query does)
    if not session.rounds:  # nothing could be scored: no round was recorded
        return ranking, written
    kept = session.root / "rankings" / f"round{session.rounds[-1]['index']}"
    kept.mkdir(parents=True, exist_ok=True)
    names = {Path(p).name for p in written.values()}
    for old in kept.glob("ranking.*"):
        if old.name not in names:  # e.g. an earlier picture, where this ranking has none
            old.unlink()
    for path in written.values():
        atomic_write(kept / Path(path).name, lambda tmp, path=path: shutil.copyfile(path, tmp))
    return ranking, written
