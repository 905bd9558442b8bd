"""Rounds of a session: which model ranks (the given one, or the session's adapted one with the base
model's source knowledge), and recording a query in session.json. Shared by the CLI and the panel."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ASFDALib.adaptation.session import Session
from ASFDALib.errors import ASFDAError
from ASFDALib.models.loading import LoadedModel
from ASFDALib.query.ranking import Ranking, choose_knowledge
from ASFDALib.query.selection import Knowledge


def ranking_model(
    session: Session, load_given: Callable[[], LoadedModel], given: bool, knowledge: str = "auto"
) -> tuple[LoadedModel, Knowledge | None]:
    """The model to rank with, and the source knowledge to use (None: the model's own).

    ``load_given()`` loads the model the user named (or the built-in default); ``given`` says whether the
    user named one. A session that already has a model keeps it, adapted weights included, and keeps the
    original model's source knowledge; naming a different model for it is refused.
    """
    from ASFDALib.adaptation.pipeline import session_model

    recorded = session.data.get("model")
    if not recorded:
        return load_given(), None
    if given and load_given().digest != recorded["digest"]:
        raise ASFDAError(f"{session.root} was started with {recorded['path']}; use another session for a new model")
    model = session_model(session, adapted=True)
    base = session_model(session, adapted=False) if session.adapted_checkpoint() else model
    return model, choose_knowledge(base, knowledge)


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
        session.set_model(model.path, model.digest, model.kind, model.card.to_dict(), trust)
    session.set_images(images, {r.name: r.sha256 for r in ranking.records if r.sha256}, recursive)
    strategy = {**strategy, "knowledge": ranking.knowledge.kind}
    query = [r.file for r in ranking.selected]
    if session.rounds and not session.rounds[-1].get("checkpoint"):
        session.rounds[-1].update({"query": query, "strategy": strategy, "model_digest": model.digest})
    else:
        session.add_round(query, strategy, model.digest)
    session.save()
