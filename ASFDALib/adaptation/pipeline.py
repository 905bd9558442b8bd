"""Session-level adaptation: stage 1 on the labels, reliability-gated pseudo-labels, stage 2 on both,
with resume, cancel and progress; and prediction with the adapted model.

This is what ``asfda finetune`` / ``asfda predict`` and the Slicer panel call.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ASFDALib import distributed
from ASFDALib.adaptation.patches import Case, load_case
from ASFDALib.adaptation.pseudo import selective_pseudo_labels
from ASFDALib.adaptation.recipe import FinetuneConfig
from ASFDALib.adaptation.session import Session, SessionError, case_id
from ASFDALib.adaptation.trainer import ProgressFn, Trainer
from ASFDALib.atomic import atomic_write, atomic_write_json, atomic_write_npz
from ASFDALib.data.preprocess import labels_to_native, preprocess
from ASFDALib.data.volumes import content_hash, discover_volumes, read_volume, write_volume
from ASFDALib.errors import VolumeError
from ASFDALib.inference.predict import predict_label
from ASFDALib.models.card import card_from_dict
from ASFDALib.models.loading import LoadedModel, load_model, load_weights


@dataclass
class AdaptResult:
    status: str
    checkpoint: Path | None
    seconds: dict[str, float] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    reliability: dict[str, float] = field(default_factory=dict)
    loss: float | None = None


def session_model(session: Session, adapted: bool = True) -> LoadedModel:
    """The session's model, with the newest fine-tuned weights when ``adapted`` and there are some."""
    info = session.data.get("model")
    if not info:
        raise SessionError(f"{session.root}: no model recorded; run 'asfda rank --out {session.root}' first")
    model = load_model(info["path"], card_from_dict(info["card"]), trust=bool(info.get("trust")))
    if model.digest != info["digest"]:
        raise SessionError(
            f"{info['path']}: the model changed since this session was started (digest {model.digest} vs "
            f"{info['digest']}); start a new session for a new model"
        )
    checkpoint = session.adapted_checkpoint() if adapted else None
    if checkpoint is not None:
        model.network.load_state_dict(load_weights(checkpoint))
        model.digest = f"{model.digest}+{content_hash(checkpoint)[:16]}"
        model.network.eval()
    return model


def _pseudo_pool(session: Session, labelled: set[str], limit: int) -> list[str]:
    names = [n for n in session.image_names() if n not in labelled]
    if len(names) > limit:  # an even spread over the pool, deterministic
        names = [names[i] for i in np.linspace(0, len(names) - 1, limit).astype(int)]
    return names


def build_pseudo_labels(
    session: Session, model: LoadedModel, cases: list[Case], folder: Path, config: FinetuneConfig
) -> tuple[list[str], dict[str, float]]:
    """Score the unlabeled pool with the stage-1 model, keep the reliable part and store its pseudo-labels."""
    pool = []
    for name in _pseudo_pool(session, {c.name for c in cases}, config.max_pseudo_volumes):
        try:
            pool.append((name, preprocess(read_volume(session.image_path(name)), model.card)))
        except VolumeError:
            continue
    kept, scores, labels = selective_pseudo_labels(
        model.network,
        model.card,
        [c.image for c in cases],
        pool,
        config.keep_fraction,
        config.confidence,
        config.device,
    )
    folder.mkdir(parents=True, exist_ok=True)
    for name, label in labels.items():
        atomic_write_npz(folder / f"{case_id(name)}.npz", {"label": label}, compressed=True)
    atomic_write_json(folder / "pseudo.json", {"kept": kept, "reliability": scores})
    return kept, scores


def _load_pseudo(session: Session, model: LoadedModel, folder: Path) -> tuple[list[Case], list[str], dict]:
    info = json.loads((folder / "pseudo.json").read_text())
    cases = []
    for name in info["kept"]:
        image = preprocess(read_volume(session.image_path(name)), model.card)
        with np.load(folder / f"{case_id(name)}.npz", allow_pickle=False) as data:
            cases.append(Case(name, image.numpy(), data["label"]))
    return cases, info["kept"], info["reliability"]


def finetune_session(
    session: Session,
    config: FinetuneConfig,
    pseudo: bool = True,
    resume: bool = False,
    cancel: threading.Event | None = None,
    progress: ProgressFn | None = None,
    on_status: Callable[[str], None] | None = None,
    validation: list[tuple[Path, Path]] | None = None,
) -> AdaptResult:
    """Fine-tune the session's model on its labels (stage 1), then with selective pseudo-labels (stage 2)."""
    say = on_status or (lambda _msg: None)
    labelled = session.labelled()
    if not labelled:
        raise SessionError(f"{session.root}: no labels yet; label the queried volumes or 'asfda labels import'")
    if not session.rounds:
        session.add_round([], {}, session.data["model"]["digest"])
    round_entry = session.rounds[-1]
    folder = session.root / "checkpoints" / f"round{round_entry['index']}"
    model = session_model(session, adapted=True)  # a later round warm-starts from the previous one
    trainer = Trainer(model.network, model.card, config, folder)
    if resume:
        if not trainer.load():
            say("nothing to resume; starting from the beginning")
    elif trainer.last_path.is_file() and distributed.is_main():
        raise SessionError(f"{trainer.last_path}: an earlier run of this round exists; pass --resume to continue it")
    say(f"loading {len(labelled)} labelled volumes")
    cases = [load_case(n, session.image_path(n), p, model.card) for n, p in sorted(labelled.items())]
    val_cases = [load_case(case_id(i.name), i, lab, model.card) for i, lab in validation or []]
    result = AdaptResult("done", None)
    timer = time.perf_counter()
    if trainer.stage == "stage1":
        result.status = trainer.run(cases, config.iterations, None, cancel, progress, val_cases)
        result.seconds["stage1"] = time.perf_counter() - timer
        if result.status == "cancelled":
            return result
        if distributed.is_main():
            atomic_write(folder / "stage1.pt", lambda tmp: torch.save(model.network.state_dict(), tmp))
    pseudo_cases: list[Case] = []
    if pseudo and config.pseudo_iterations > 0:
        timer = time.perf_counter()
        if not (folder / "pseudo" / "pseudo.json").is_file() and distributed.is_main():
            say("scoring the unlabeled pool for reliable pseudo-labels")
            build_pseudo_labels(session, model, cases, folder / "pseudo", config)
        distributed.barrier()  # under torchrun, rank 0 writes the pseudo-labels and every rank reads them
        if (folder / "pseudo" / "pseudo.json").is_file():
            pseudo_cases, result.kept, result.reliability = _load_pseudo(session, model, folder / "pseudo")
        result.seconds["pseudo_labels"] = time.perf_counter() - timer
        if pseudo_cases:
            timer = time.perf_counter()
            trainer.begin_stage("stage2")
            result.status = trainer.run(cases, config.pseudo_iterations, pseudo_cases, cancel, progress, val_cases)
            result.seconds["stage2"] = time.perf_counter() - timer
            if result.status == "cancelled":
                return result
    final = folder / "final.pt"
    result.checkpoint = final
    if not distributed.is_main():
        return result
    atomic_write(final, lambda tmp: torch.save(model.network.state_dict(), tmp))
    round_entry["checkpoint"] = session.relative(final)
    round_entry["metrics"] = {
        "labelled": sorted(labelled),
        "pseudo_labelled": result.kept,
        "seconds": result.seconds,
        "iterations": {"stage1": config.iterations, "stage2": config.pseudo_iterations if pseudo_cases else 0},
    }
    session.save()
    return result


def predict_folder(
    model: LoadedModel,
    images: Path,
    out: Path,
    device: str = "auto",
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[list[Path], list[str]]:
    """Label maps for every volume under ``images`` in the input's own grid and format (DICOM -> NIfTI)."""
    written, skipped = [], []
    paths = discover_volumes(images)
    for i, path in enumerate(paths):
        if progress:
            progress(i, len(paths), path.name)
        try:
            volume = read_volume(path)
        except VolumeError as exc:
            skipped.append(str(exc))
            continue
        image = preprocess(volume, model.card)
        label = predict_label(model.network, image, model.card, device).astype(np.uint8)
        native = labels_to_native(label, image.affine.numpy(), volume.array.shape, volume.affine)
        name = path.name if path.is_file() else f"{path.name}.nii.gz"
        written.append(write_volume(Path(out) / name, native, volume.affine))
    if progress:
        progress(len(paths), len(paths), "")
    return written, skipped
