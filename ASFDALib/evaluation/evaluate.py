"""Dice and HD95 per class between predicted and reference label maps, matched by case name.

Reference labels may be raw exports (any label values): a ``--map`` turns them into model classes, and
values that are still not classes are left out of the scores and reported, never turned into classes.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ASFDALib.atomic import atomic_write_text
from ASFDALib.data.labels import (
    NO_IMAGE,
    LabelMap,
    Pairing,
    align_to_image,
    classes_by_segment_name,
    example_map,
    pair_mirrored,
    read_label,
    refuse_intensity_image,
    value_ranges,
)
from ASFDALib.data.volumes import content_hash, discover_volumes, read_volume, relative_name
from ASFDALib.errors import ASFDAError, VolumeError
from ASFDALib.evaluation.metrics import score_case

if TYPE_CHECKING:
    from ASFDALib.adaptation.session import Session


@dataclass
class CaseScore:
    case: str
    dice: list[float]
    hd95: list[float]
    reason: str = ""
    foreign: list[int] = field(default_factory=list)  # reference values (after the map) that are not classes
    prediction: str = ""  # the map's name under its folder (site1/a.nii.gz), which the folder's manifest is keyed by


PRED_FIX = "give --pred the folder of predicted label maps, as asfda predict --out writes"


class NotAPrediction(ASFDAError):
    """A --pred file that is an intensity image (a scan): the whole evaluation is refused, not one row."""


LABELS_FIX = "give --labels the folder of reference label maps (a clinician's or a dataset's), not the scans"


def _refuse_scan(array: np.ndarray, path: Path, fix: str = PRED_FIX) -> None:
    try:
        refuse_intensity_image(array, path, fix=fix)
    except VolumeError as exc:  # out of the per-case rows' handler: a folder of scans is no evaluation
        raise NotAPrediction(str(exc)) from None


def refuse_swapped_folders(pred_dir: Path, label_dir: Path) -> None:
    """Refuse, before any case is read, reference labels that are a predictions folder (asfda predict's record
    is in it): the two folders were given the wrong way round, or twice the predictions."""
    from ASFDALib.outputs import PREDICTIONS_MANIFEST

    if Path(label_dir).resolve() == Path(pred_dir).resolve() and not (Path(label_dir) / PREDICTIONS_MANIFEST).is_file():
        raise ASFDAError(
            f"{label_dir}: given as both --pred and --labels (every Dice would be 1); give each its folder"
        )
    if (Path(label_dir) / PREDICTIONS_MANIFEST).is_file():
        same = Path(label_dir).resolve() == Path(pred_dir).resolve()
        # both written by predict: swapping would only move the refusal to the other folder
        both = same or (Path(pred_dir) / PREDICTIONS_MANIFEST).is_file()
        fix = "give the reference labels as --labels" if both else "swap --pred and --labels"
        raise ASFDAError(
            f"{label_dir}: holds label maps asfda predict wrote ({PREDICTIONS_MANIFEST}), not reference labels; {fix}"
        )


def _predicted_classes(paths: list[Path]) -> int:
    """Without class names: the class count the predictions show (they are model output, so classes); a scan
    among them is refused here already, before any case is scored."""
    highest = 1
    for path in paths:
        try:
            array = read_volume(path, allow_constant=True).array
        except VolumeError:
            continue  # an unreadable prediction is left to its case's row
        _refuse_scan(array, path)
        highest = max(highest, int(array.max()))
    return highest + 1


def case_files(pred_dir: Path, label_dir: Path) -> tuple[list[Path], list[Path]]:
    """The predicted maps and the reference labels to pair: each folder's volumes, and those of its sub-folders
    where asfda predict --recursive wrote the maps there (its manifest names them ``site1/a.nii.gz``)."""
    from ASFDALib.outputs import nested_predictions

    nested = nested_predictions(pred_dir)
    return discover_volumes(pred_dir, recursive=nested), discover_volumes(label_dir, recursive=nested)


def pair_cases(pred_dir: Path, label_dir: Path) -> tuple[Pairing, dict[str, Path], dict[str, Path]]:
    """Predictions paired with references by case name (:func:`pair_mirrored`), each known by its name under its
    folder (``site1/a.nii.gz`` where predict wrote nested maps, as the manifest records it); also those names'
    files, predictions' then references'. A reference folder of sub-folders mirrors the pool (a BIDS
    ``derivatives/<pipeline>`` tree, say): a map pairs with a reference of its own sub-folder (``site1/a`` with
    ``site1/a_seg``, never ``site2/a``); a flat one pairs with maps wherever they lie, by file name alone, two
    that fit one reference being refused as always."""
    preds, refs = case_files(pred_dir, label_dir)
    predictions = {relative_name(p, pred_dir): p for p in preds}
    references = {relative_name(p, label_dir): p for p in refs}
    return pair_mirrored(list(predictions), list(references)), predictions, references


def evaluate_folders(
    pred_dir: Path, label_dir: Path, class_names: list[str] | None = None, mapping: LabelMap | None = None
) -> list[CaseScore]:
    """Score each prediction against the reference label of the same case.

    Reference values go through ``mapping``; those that are not classes afterwards (of ``class_names``, or
    without names of what the predictions contain) are listed in ``CaseScore.foreign`` and their voxels
    are left out of every class's score.
    """
    refuse_swapped_folders(pred_dir, label_dir)
    pairing, predictions, reference = pair_cases(pred_dir, label_dir)
    if not pairing.pairs:
        first = next(iter(pairing.problems.items()), None)
        detail = f" ({first[0]}: {first[1]})" if first else ""
        raise VolumeError(
            pred_dir, f"no prediction matches a reference label by case name{detail}", "use the same names"
        )
    mapping = mapping or LabelMap()
    paired = sorted(predictions[p] for p in pairing.pairs.values())
    num_classes = len(class_names) if class_names else _predicted_classes(paired)
    scores = []
    for name, prediction in sorted(pairing.pairs.items()):
        pred_path = predictions[prediction]
        try:
            ref, segment_names = read_label(reference[name])
            case_map = mapping
            if segment_names and class_names:  # a Slicer segmentation: its names say the classes, --map terms first
                case_map = classes_by_segment_name(segment_names, class_names, reference[name], mapping)
            pred = read_volume(pred_path, allow_constant=True)
            _refuse_scan(pred.array, pred_path)  # nothing is written before every case is scored
            _refuse_scan(ref.array, reference[name], LABELS_FIX)  # scans as references would score 0, "mapped"
            pred_array, _ = align_to_image(np.asarray(pred.array), pred.affine, ref.array.shape, ref.affine, pred_path)
            ref_array = np.asarray(ref.array).astype(np.int64)
            present = [int(v) for v in np.unique(ref_array)]
            lut = {v: case_map.target(v) for v in present}
            foreign = sorted(v for v, target in lut.items() if not 0 <= target < num_classes)
            mapped = np.zeros(ref_array.shape, np.int64)
            for value, target in lut.items():
                if target and value not in foreign:
                    mapped[ref_array == value] = target
            pred_array = np.asarray(pred_array).astype(np.int64)
            if foreign:  # left out: such voxels count for no class, in the reference or the prediction
                pred_array = np.where(np.isin(ref_array, foreign), 0, pred_array)
            spacing = np.linalg.norm(ref.affine[:3, :3], axis=0)
            dice, distance = score_case(pred_array, mapped, spacing, num_classes)
            scores.append(CaseScore(name, dice, distance, foreign=foreign, prediction=prediction))
        except VolumeError as exc:
            scores.append(CaseScore(name, [], [], exc.reason, prediction=prediction))
    return scores


def left_out(pred_dir: Path, label_dir: Path) -> list[str]:
    """What no mean includes, one line each, as the pairing by case name left it: predictions of no reference's
    case, references no prediction claimed, and predictions set aside for a reason (two for one case)."""
    pairing, _, references = pair_cases(pred_dir, label_dir)
    alone = [p for p, why in pairing.problems.items() if why.startswith(NO_IMAGE)]
    orphans = [r for r in references if r not in pairing.pairs and r not in pairing.contested]
    lines = []
    for folder, names, what, other, searched in (
        (pred_dir, alone, "prediction", "reference", label_dir),
        (label_dir, orphans, "reference", "prediction", pred_dir),
    ):
        if names:
            shown = ", ".join(sorted(names)[:5]) + (f", … ({len(names) - 5} more)" if len(names) > 5 else "")
            has = f"{what}s in {folder} have" if len(names) > 1 else f"{what} in {folder} has"
            lines.append(f"{len(names)} {has} no {other} of the same case in {searched}, left out: {shown}")
    torn = sorted(p for p in pairing.problems if p not in alone)
    if torn:
        lines.append(
            f"{len(torn)} predictions in {pred_dir} fit the same reference as another, or several references, "
            f"left out: {', '.join(torn)} (keep one prediction per case)"
        )
    return lines


def foreign_warning(score: CaseScore, class_names: list[str], imported_with: str = "") -> str:
    """One line for a case whose reference holds values that are not classes; ``imported_with``: the ``--map``
    the session imported this very reference file with, the likelier fix than an example."""
    classes = ", ".join(f"{i}={n}" for i, n in enumerate(class_names))
    example = example_map(score.foreign, class_names)
    fix = (
        f"--map {imported_with}, as the session's labels were imported"
        if imported_with
        else f"--map, e.g. --map {example} (VALUE=CLASS, with the class each range is)"
    )
    return (
        f"{score.case}: reference values [{value_ranges(score.foreign)}] are not classes ({classes}); their voxels "
        f"are left out of the scores. Map them with {fix}"
    )


AS_ADAPTED = "as for the adapted model"  # why the source model's maps leave out the session's training cases


def trained_on(
    session: Session,
    scores: list[CaseScore],
    label_dir: Path,
    made_from: dict[str, str],
    up_to_round: int | None = None,
) -> dict[str, str]:
    """The evaluated cases the session's model trained on, each with how it trained on it and which rule told.

    ``up_to_round``: the round whose adapted model made the maps; what later rounds labelled it never saw, so
    those cases count as held out. Without it (the source model's maps, or maps of no one round) every case the
    session labelled or pseudo-labelled is left out.

    By content, never by name alone: a test folder's ``mri_002`` is not the pool's ``mri_002`` unless it is
    the same image, and a renamed copy of a training image still is one. The image a map was made from
    (``made_from``: map name -> SHA-256, as asfda predict records it) is looked up among the hashes of the
    pool's labelled and pseudo-labelled images. A map without that record (another tool's) is matched by its
    reference label file: the same bytes as a label the session imported or stored. Where neither can tell
    (another tool's maps of a pseudo-labelled image, which has no label in the session; labels imported or
    saved before their source was recorded) the name decides: such a case is still left out, since a held-out
    mean must not hold a training case, and the note says it was by name.
    """
    how: dict[str, str] = {}
    rounds = [r for r in session.rounds if up_to_round is None or r["index"] <= up_to_round]
    for round_ in rounds:
        how |= dict.fromkeys((round_.get("metrics") or {}).get("pseudo_labelled", []), "pseudo-labelled")
    recorded = [(r.get("metrics") or {}).get("labelled") for r in rounds if r.get("checkpoint")]
    if up_to_round is None or not recorded or None in recorded:  # a round that kept no list: every label counts
        labelled = list(session.data["labels"])  # what the session recorded, a label file deleted since included
    else:  # what those rounds trained on, as each finished run recorded it
        labelled = sorted({n for names in recorded for n in names})
    how |= dict.fromkeys(labelled, "labelled")
    images: dict[str, list[str]] = {}
    for entry in (session.data.get("images") or {}).get("files", []):
        images.setdefault(entry["sha256"], []).append(entry["name"])
    for name, known in session.labelled_images().items():  # a scan labelled anew since the pool was last ranked
        if known["sha256"] and name not in images.get(known["sha256"], []):
            images.setdefault(known["sha256"], []).append(name)
    labels = {
        digest: name
        for name in labelled
        for version in session.data["labels"].get(name, [])
        for digest in (version.get("sha256"), version.get("source_sha256"))
        if digest
    }
    # labelled names whose import recorded the source file: a reference label with other bytes is another case
    comparable = {n for n in labelled if any(v.get("source_sha256") for v in session.data["labels"].get(n, []))}
    found = {}
    for score in scores:
        if score.prediction in made_from:
            same = [name for name in images.get(made_from[score.prediction], []) if name in how]
            if same:
                found[score.case] = f"{how[same[0]]} in the session (same image as its {same[0]})"
        elif (name := labels.get(_hash_or_none(Path(label_dir) / score.case))) is not None:
            found[score.case] = f"labelled in the session (same label file as its {name})"
        elif score.case in how and score.case not in comparable:
            found[score.case] = f"{how[score.case]} in the session (by name: nothing recorded to compare contents)"
    return found


def _hash_or_none(path: Path) -> str | None:
    """The file's SHA-256, or None where it cannot be read (its score already says why)."""
    try:
        return content_hash(path)
    except OSError:
        return None


def summary_rows(
    scores: list[CaseScore], class_names: list[str], trained: dict[str, str] | None = None, source: bool = False
) -> list[dict]:
    """One row per case and a MEAN row. ``trained`` maps a case to how the session's adapted model trained on
    it and which rule told (see :func:`trained_on`): such a case is noted and left out of the mean, which is
    then a held-out figure. ``source``: the maps are the source model's, which did not train on them; they are
    still left out, so that its mean and the adapted model's are over the same cases."""
    trained = trained or {}
    why = f"not in the mean, {AS_ADAPTED}" if source else "trained on, not in the mean"
    rows = []
    for s in scores:
        note = f"not classes, left out: {value_ranges(s.foreign)}" if s.foreign else ""
        if s.case in trained:
            note = "; ".join(filter(None, [f"{trained[s.case]}: {why}", note]))
        row = {"case": s.case, "reason": s.reason or note}
        for i, name in enumerate(class_names[1:]):
            row[f"dice_{name}"] = s.dice[i] if i < len(s.dice) else float("nan")
            row[f"hd95_{name}"] = s.hd95[i] if i < len(s.hd95) else float("nan")
        finite = [d for d in s.dice if not math.isnan(d)]
        row["dice_mean"] = float(np.mean(finite)) if finite else float("nan")
        rows.append(row)
    if rows:
        held_out = [r for r in rows if r["case"] not in trained]
        left = len(rows) - len(held_out)
        reason = f"without the {left} case{'s' * (left != 1)} the session trained on" if left else ""
        if left and source:
            reason += " (the source model did not: left out so the mean compares with the adapted model's)"
        mean = {"case": "MEAN", "reason": reason}
        for key in rows[0]:
            if key not in ("case", "reason"):
                values = [r[key] for r in held_out if not math.isnan(r[key])]
                mean[key] = float(np.mean(values)) if values else float("nan")
        rows.append(mean)
    return rows


def mean_caption(rows: list[dict], trained: dict[str, str], source: bool = False) -> str:
    """The per-class mean's title for ``summary_rows``' rows: over how many cases, and which it left out."""
    held_out = sum(r["case"] not in trained for r in rows[:-1])
    left = len(rows) - 1 - held_out
    clause = f" (not the {left} the session trained on{', ' + AS_ADAPTED if source else ''})" if left else ""
    return f"Mean over {held_out} cases{clause}, per class"


def is_evaluation_table(path: Path) -> bool:
    """Whether ``path`` is a table :func:`write_csv` wrote (its header starts ``case,reason``), which a new
    evaluation may replace; any other file is never written over."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            return handle.readline().startswith("case,reason,")
    except (OSError, UnicodeDecodeError):
        return False


def write_csv(rows: list[dict], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return atomic_write_text(path, buffer.getvalue())
