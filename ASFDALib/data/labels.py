"""Label maps checked against their image before they enter a session: same grid, known classes, no NaNs.

Every refusal names the label file, what differs and by how much, and what to do about it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ASFDALib.adaptation.session import Session, case_id
from ASFDALib.data.volumes import content_hash, discover_volumes, read_volume, write_nifti
from ASFDALib.errors import VolumeError

AFFINE_TOLERANCE_MM = 0.01


class LabelError(VolumeError):
    """A label map that does not fit its image or the model's classes."""


def parse_mapping(text: str | None) -> dict[int, int]:
    """'7=1,8=2' -> {7: 1, 8: 2}: file label values to model class indices."""
    if not text:
        return {}
    mapping = {}
    for part in text.split(","):
        try:
            source, target = (int(v) for v in part.split("="))
        except ValueError:
            raise ValueError(f"label mapping {part!r} must look like 7=1 (file value = model class)") from None
        mapping[source] = target
    return mapping


def check_grid(label_shape, label_affine, image_shape, image_affine, path: Path, tol: float = AFFINE_TOLERANCE_MM):
    if tuple(label_shape) != tuple(image_shape):
        diffs = ", ".join(f"axis {i}: {a} vs {b}" for i, (a, b) in enumerate(zip(label_shape, image_shape)) if a != b)
        raise LabelError(
            path,
            f"label grid {tuple(label_shape)} differs from the image's {tuple(image_shape)} ({diffs})",
            "export the label on the image's grid (same size and geometry)",
        )
    delta = np.abs(np.asarray(label_affine) - np.asarray(image_affine))
    if delta.max() > tol:
        origin = float(np.abs(delta[:3, 3]).max())
        axes = float(delta[:3, :3].max())
        raise LabelError(
            path,
            f"label geometry differs from the image's: origin by {origin:.3g} mm, spacing/direction by {axes:.3g} mm",
            "resample the label onto the image or fix its header",
        )


def validate_label(
    label_path: Path, image_path: Path, class_names: list[str], mapping: dict[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The label as uint8 model classes on the image's grid, with the image's affine; or LabelError."""
    label = read_volume(label_path, allow_constant=True)
    image = read_volume(image_path)
    check_grid(label.array.shape, label.affine, image.array.shape, image.affine, label_path)
    values = label.array
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)):
            raise LabelError(label_path, "label has NaN/Inf voxels", "labels must be whole class numbers")
        if np.any(values != np.round(values)):
            raise LabelError(label_path, "label has fractional values", "labels must be whole class numbers")
    values = values.astype(np.int64)
    present = np.unique(values)
    mapping = mapping or {}
    lut_values = {int(v): mapping.get(int(v), int(v)) for v in present}
    unknown = sorted(v for v, target in lut_values.items() if not 0 <= target < len(class_names))
    if unknown:
        classes = ", ".join(f"{i}={n}" for i, n in enumerate(class_names))
        raise LabelError(
            label_path,
            f"label values {unknown} are not classes of the model ({classes})",
            "give a mapping, e.g. --map " + ",".join(f"{v}=1" for v in unknown[:2]),
        )
    out = np.zeros(values.shape, np.uint8)
    for value, target in lut_values.items():
        if target:
            out[values == value] = target
    return out, image.affine


def match_labels(label_paths: list[Path], image_names: list[str]) -> dict[str, Path]:
    """Pair label files with images by case name (``case.nii.gz``, ``case_seg.nrrd``, ``case-label.nii``)."""
    by_case = {case_id(Path(n).name): n for n in image_names}
    pairs: dict[str, Path] = {}
    for path in label_paths:
        cid = case_id(path.name)
        for suffix in ("", "_seg", "-seg", "_label", "-label", "_labels", "_mask", "_gt", ".seg"):
            if suffix == "" or cid.endswith(suffix):
                base = cid[: len(cid) - len(suffix)] if suffix else cid
                if base in by_case:
                    pairs[by_case[base]] = path
                    break
    return pairs


def import_labels(
    session: Session, source: Path, class_names: list[str], mapping: dict[int, int] | None = None
) -> tuple[dict[str, Path], list[str]]:
    """Validate label files against their images and copy them into ``labels/`` as new versions.

    Returns (image name -> stored file, reasons for files that were refused). Nothing already in the
    session is overwritten.
    """
    source = Path(source)
    files = [source] if source.is_file() else discover_volumes(source)
    pairs = match_labels(files, session.image_names())
    refused = [f"{p}: no image of the session has this case name" for p in files if p not in pairs.values()]
    stored: dict[str, Path] = {}
    for name, label_path in sorted(pairs.items()):
        try:
            label, affine = validate_label(label_path, session.image_path(name), class_names, mapping)
        except VolumeError as exc:
            refused.append(str(exc))
            continue
        target = session.next_label_path(name)
        write_nifti(target, label, affine)
        session.record_label(name, target, content_hash(target), f"import:{label_path}")
        stored[name] = target
    return stored, refused
