"""Label maps checked against their image before they enter a session: same grid, known classes, no NaNs.

Every refusal names the label file, what differs and by how much, and what to do about it. Label files are
paired with images by name (:func:`pair_names`: exact case names, ``_seg``/``_mask``-style suffixes, nnU-Net
channel suffixes, BIDS entities); file values become model classes through a ``--map`` (:func:`parse_mapping`);
a label stored in another axis order on the image's grid is reoriented (:func:`align_to_image`).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nibabel import orientations

from ASFDALib.adaptation.session import Session, case_id, unrecorded_query
from ASFDALib.atomic import atomic_write_bytes
from ASFDALib.data.volumes import (
    LABEL_FILE_MAX_VALUES,
    Volume,
    content_hash,
    content_record,
    discover_volumes,
    header_fields,
    looks_like_label_map,
    nifti_bytes,
    passed_over,
    passed_over_line,
    read_components,
    read_volume,
    relative_name,
    validate_array,
)
from ASFDALib.errors import ASFDAError, VolumeError, as_arg
from ASFDALib.outputs import unchanged_predictions

AFFINE_TOLERANCE_MM = 0.01
MAP_EXAMPLE = '--map "41-48=2,49,50=vertebral body,*=0"'
MAX_RANGE = 65536  # a label range wider than any integer label type in practice: a typo, not a request
NO_IMAGE = "no image has this case name"  # a pairing problem that is no error where other files pair (import)


class LabelError(VolumeError):
    """A label map that does not fit its image or the model's classes."""


class LabelMapError(ASFDAError, ValueError):
    """A ``--map`` text that cannot be read; the message names the bad term and shows an example."""

    def __init__(self, term: str, problem: str, example: str = MAP_EXAMPLE) -> None:
        self.term, self.problem = term, problem
        super().__init__(f"--map term {term!r}: {problem} (example: {example})")


def map_example(class_names: list[str] | None) -> str:
    """A --map written with the model's own classes (the generic example names classes a model may not have)."""
    if not class_names or len(class_names) < 2:
        return MAP_EXAMPLE
    if len(class_names) == 2:
        return f'--map "7-9={class_names[1]},*=0"'
    return f'--map "7={class_names[1]},8,9={class_names[2]},*=0"'


@dataclass(frozen=True)
class LabelMap:
    """File label values -> model class indices; values not listed keep their number, or go to ``default``."""

    values: dict[int, int] = field(default_factory=dict)
    default: int | None = None

    def target(self, value: int) -> int:
        if value in self.values:
            return self.values[value]
        return value if self.default is None else self.default

    def __bool__(self) -> bool:
        return bool(self.values) or self.default is not None


def _class_list(class_names: list[str]) -> str:
    return ", ".join(f"{i}={n}" for i, n in enumerate(class_names))


def _normal_name(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", name.strip().lower())


def _map_target(text: str, term: str, class_names: list[str] | None) -> int:
    """A class index or a class name of the card -> the class index."""
    if re.fullmatch(r"\d+", text):
        index = int(text)
        if class_names is not None and index >= len(class_names):
            raise LabelMapError(term, f"class {index} is not a class of the model ({_class_list(class_names)})")
        return index
    if not text:
        raise LabelMapError(term, "no class after '='")
    if class_names is None:
        raise LabelMapError(term, f"class name {text!r} needs the model's classes (give --session or --card)")
    names = [_normal_name(n) for n in class_names]
    if _normal_name(text) in names:
        return names.index(_normal_name(text))
    close = difflib.get_close_matches(_normal_name(text), names, n=1, cutoff=0.5)
    hint = f"did you mean {class_names[names.index(close[0])]!r}? " if close else ""
    raise LabelMapError(term, f"{text!r} is not a class of the model; {hint}classes: {_class_list(class_names)}")


def _map_sources(text: str, term: str) -> list[int] | None:
    """'7' -> [7], '41-48' -> [41..48], '*' -> None (the default)."""
    if text == "*":
        return None
    if re.fullmatch(r"\d+", text):
        return [int(text)]
    match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
    if not match:
        raise LabelMapError(term, f"{text!r} is not a label value (7), a range (41-48) or * (every other value)")
    low, high = int(match[1]), int(match[2])
    if low > high:
        raise LabelMapError(term, f"range {text} runs backwards; write {high}-{low}")
    if high - low >= MAX_RANGE:
        raise LabelMapError(term, f"range {text} spans more than {MAX_RANGE} values")
    return list(range(low, high + 1))


def parse_mapping(text: str | None, class_names: list[str] | None = None) -> LabelMap:
    """'41-48=2,49,50=vertebral body,*=0' -> a :class:`LabelMap`; or :class:`LabelMapError`.

    Terms are separated by commas or semicolons; values before an ``=`` share its class, so ``49,50=1`` maps
    both. A source is a value, a range ``a-b`` or ``*`` (every value not listed elsewhere, 0 included). A class
    is an index or, with ``class_names``, a name from the card (case, spaces and underscores do not matter).
    A value given two different classes is refused rather than resolved by order.
    """
    try:
        return _parse_mapping(text, class_names)
    except LabelMapError as exc:  # its example in this model's classes, not in classes it may not have
        raise LabelMapError(exc.term, exc.problem, map_example(class_names)) from None


def _parse_mapping(text: str | None, class_names: list[str] | None) -> LabelMap:
    values: dict[int, int] = {}
    default: int | None = None
    pending: list[tuple[str, list[int] | None]] = []
    for piece in re.split(r"[,;]", text or ""):
        term = piece.strip()
        if not term:
            continue
        left, equals, right = term.partition("=")
        pending.append((term, _map_sources(left.strip(), term)))
        if not equals:
            continue
        group = ",".join(t for t, _ in pending)  # '49,50=vertebral body' is one term to the user
        if "=" in right:
            raise LabelMapError(group, "more than one '='; separate terms with commas")
        target = _map_target(right.strip(), group, class_names)
        for source_term, sources in pending:
            if sources is None:
                if default is not None and default != target:
                    raise LabelMapError(source_term, f"'*' is mapped twice (to {default} and {target})")
                default = target
                continue
            for value in sources:
                if values.get(value, target) != target:
                    raise LabelMapError(source_term, f"value {value} is mapped twice (to {values[value]} and {target})")
                values[value] = target
        pending = []
    if pending:
        raise LabelMapError(pending[-1][0], "has no '=CLASS'")
    return LabelMap(values, default)


def value_ranges(values: list[int]) -> str:
    """[41, 42, 43, 50, 60, 61] -> '41-43,50,60-61': how a user would write them in a --map."""
    parts: list[str] = []
    for _, group in itertools.groupby(enumerate(sorted(values)), key=lambda pair: pair[1] - pair[0]):
        run = [v for _, v in group]
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(parts)


def example_map(values: list[int], class_names: list[str]) -> str:
    """A --map that reads ``values`` (a file's own numbers) as classes, to show its form: each value to a
    class of its own where there are no more values than classes (7=1,8=2,9=3: 7-9=1 would merge three
    organs into one), else each range of values (up to three) to one."""
    foreground = max(1, len(class_names) - 1)
    terms = [str(v) for v in sorted(values)] if len(values) <= foreground else value_ranges(values).split(",")[:3]
    return ",".join(f"{term}={1 + i % foreground}" for i, term in enumerate(terms))


def _corners(shape) -> np.ndarray:
    """Homogeneous voxel indices of the grid's 8 corners, (4, 8)."""
    corners = np.array(list(itertools.product(*[(0, max(int(n) - 1, 0)) for n in shape[:3]])), dtype=np.float64)
    return np.vstack([corners.T, np.ones(len(corners))])


def check_grid(
    label_shape, label_affine, image_shape, image_affine, path: Path, tol: float = AFFINE_TOLERANCE_MM, note: str = ""
):
    """Refuse a label whose voxels are not the image's voxels in world space (within ``tol`` mm)."""
    note = f" {note}" if note else ""
    if tuple(label_shape) != tuple(image_shape):
        diffs = ", ".join(f"axis {i}: {a} vs {b}" for i, (a, b) in enumerate(zip(label_shape, image_shape)) if a != b)
        raise LabelError(
            path,
            f"label grid {tuple(label_shape)} differs from the image's {tuple(image_shape)} ({diffs}){note}",
            "export the label on the image's grid (same size and geometry)",
        )
    label_affine, image_affine = np.asarray(label_affine, float), np.asarray(image_affine, float)
    # World positions of the grid's corner voxels: an affine difference that moves no voxel centre by more
    # than ``tol`` (float32 headers, rounding of direction cosines) is the same grid.
    corners = _corners(image_shape)
    apart = np.linalg.norm((label_affine @ corners - image_affine @ corners)[:3], axis=0).max()
    if apart > tol:
        delta = np.abs(label_affine - image_affine)
        origin = float(delta[:3, 3].max())
        axes = float(delta[:3, :3].max())
        raise LabelError(
            path,
            f"label geometry differs from the image's: origin by {origin:.3g} mm, spacing/direction by {axes:.3g} mm "
            f"(voxel centres up to {apart:.3g} mm apart){note}",
            "resample the label onto the image or fix its header",
        )


def align_to_image(
    array: np.ndarray, affine: np.ndarray, image_shape, image_affine: np.ndarray, path: Path, tol=AFFINE_TOLERANCE_MM
) -> tuple[np.ndarray, str]:
    """The label in the image's storage order, and a note of what was done ('' when nothing).

    A label written by another tool may store the same voxels in another axis order or direction (LPS vs
    RAS, a transposed export): the affines then differ by a permutation/flip only. That is undone here;
    whether the result is the image's grid is decided in world space by :func:`check_grid`.
    """

    source = orientations.io_orientation(affine)
    target = orientations.io_orientation(image_affine)
    if np.array_equal(source, target):
        check_grid(array.shape, affine, image_shape, image_affine, path, tol)
        return array, ""
    transform = orientations.ornt_transform(source, target)
    moved = orientations.apply_orientation(array, transform)
    moved_affine = np.asarray(affine, float) @ orientations.inv_ornt_aff(transform, array.shape)
    codes = "".join(orientations.ornt2axcodes(source)), "".join(orientations.ornt2axcodes(target))
    note = f"reoriented from {codes[0]} to the image's {codes[1]} storage order"
    check_grid(moved.shape, moved_affine, image_shape, image_affine, path, tol, note=f"(after it was {note})")
    return np.ascontiguousarray(moved), note


def _segments(path: Path) -> list[tuple[str, int, int]]:
    """A Slicer segmentation's segments as (name, layer, label value), from its NRRD header (``Segment0_Name``
    ...); [] for any other file. Files from before Slicer 4.11 hold one segment per layer, at value 1."""
    if not path.name.lower().endswith((".nrrd", ".nhdr")):
        return []
    try:
        fields = header_fields(path)
    except Exception:  # noqa: BLE001 - an unreadable header: read_volume names the file and the fault
        return []
    segments = []
    for index in itertools.count():
        name = fields.get(f"Segment{index}_Name")
        if name is None:
            return segments
        layer = int(fields.get(f"Segment{index}_Layer", index))
        segments.append((name, layer, int(fields.get(f"Segment{index}_LabelValue", 1))))


def read_label(path: Path) -> tuple[Volume, dict[int, str]]:
    """A label map and, for a Slicer segmentation (``.seg.nrrd``), each value's segment name.

    Slicer numbers segments in the order they were made (Gallbladder may be 1 and Liver 2): their values say
    nothing of the classes, their names do (:func:`classes_by_segment_name`). Segments that overlap are
    stored in layers (a 4D file): the layers are merged, the k-th segment (from 0) as value k + 1 (the values
    a --map for the file reads), where no voxel is in two segments; overlapping ones are refused, naming them."""
    segments = _segments(path)
    if not segments:
        return read_volume(path, allow_constant=True), {}
    if len({layer for _, layer, _ in segments}) == 1:
        return read_volume(path, allow_constant=True), {value: name for name, _, value in segments}
    try:
        array, affine = read_components(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable file
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:160]
        raise VolumeError(path, f"unreadable segmentation ({detail})", "save it again from Slicer") from None
    if array.ndim == 3:
        array = array[..., None]
    merged = np.zeros(array.shape[:3], np.int32)
    owner: dict[int, str] = {}
    for number, (name, layer, value) in enumerate(segments, start=1):
        mask = array[..., layer] == value
        clash = mask & (merged > 0)
        if clash.any():
            other = owner[int(np.bincount(merged[clash]).argmax())]
            raise LabelError(
                path,
                f"segments {other!r} and {name!r} overlap ({int(clash.sum())} voxels)",
                "a voxel can be one class only: remove the overlap in Slicer's Segment Editor (e.g. Logical "
                "operators, Subtract), then save again",
            )
        merged[mask] = number
        owner[number] = name
    return Volume(validate_array(merged, path, allow_constant=True), affine, path), owner


def classes_by_segment_name(
    names: dict[int, str], class_names: list[str], path: Path, given: LabelMap | None = None
) -> LabelMap:
    """File value -> class by each segment's name (case aside: Slicer's terminology writes "Liver"), where a
    ``--map`` (``given``) names no value of its own: its VALUE=CLASS terms come first (a segment that is no
    class: ``3=0``), then the names, then its default (``*=0``) for segments named as no class. A segment of
    no class that nothing maps is refused, naming it, the classes and a --map term that reads it."""
    given = given or LabelMap()
    index_of = {n.casefold(): i for i, n in enumerate(class_names)}
    by_name = {v: index_of[n.casefold()] for v, n in names.items() if n.casefold() in index_of}
    foreign = {v: n for v, n in names.items() if v not in by_name and v not in given.values}
    if foreign and given.default is None:
        shown = ", ".join(f"{n!r} (value {v})" for v, n in sorted(foreign.items()))
        example = example_map(sorted(foreign), class_names)
        raise LabelError(
            path,
            f"segments {shown} are no class of the model ({_class_list(class_names)})",
            f"rename each to its class in Slicer's Segment Editor, or give --map VALUE=CLASS for it, e.g. --map "
            f"{example} (a segment that is no class: VALUE=0; the other segments keep their names' classes)",
        )
    return LabelMap({**by_name, **given.values}, given.default)


def validate_label(
    label_path: Path,
    image_path: Path,
    class_names: list[str],
    mapping: LabelMap | dict[int, int] | None = None,
    notes: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The label as uint8 model classes on the image's grid, with the image's affine; or LabelError.

    What was changed on the way (a reorientation) is appended to ``notes``.
    """
    label, segment_names = read_label(label_path)
    if segment_names:  # a Slicer segmentation: its segments' names say which class each is, --map terms first
        given = mapping if isinstance(mapping, LabelMap) else LabelMap(dict(mapping or {}))
        mapping = classes_by_segment_name(segment_names, class_names, label_path, given)
        if notes is not None:
            read = ", ".join(f"{n}={mapping.target(v)}" for v, n in sorted(segment_names.items()))
            notes.append(f"segments read by name{' and --map' if given else ''}: {read}")
    image = read_volume(image_path)
    values, note = align_to_image(np.asarray(label.array), label.affine, image.array.shape, image.affine, label_path)
    if note and notes is not None:
        notes.append(note)
    refuse_intensity_image(values, label_path, image.array, image_path.name)
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)):
            raise LabelError(label_path, "label has NaN/Inf voxels", "labels must be whole class numbers")
        if np.any(values != np.round(values)):
            raise LabelError(
                label_path,
                "label has fractional values",
                "labels must be whole class numbers: resample label maps with nearest-neighbour interpolation",
            )
    values = values.astype(np.int64)
    present = np.unique(values)
    mapping = mapping if isinstance(mapping, LabelMap) else LabelMap(dict(mapping or {}))
    lut_values = {int(v): mapping.target(int(v)) for v in present}
    unknown = sorted(v for v, target in lut_values.items() if not 0 <= target < len(class_names))
    if unknown:
        ranges = value_ranges(unknown).split(",")[:3]
        if all(v in unknown for v in lut_values if v):
            # every foreground value is foreign: the file numbers the structures its own way, so they are
            # classes under other numbers, and the rest can safely go to background
            example = example_map(unknown, class_names) + (",*=0" if mapping.default is None else "")
            fix = f"give a mapping, e.g. --map {example} (VALUE=CLASS, with the class each is)"
        else:
            # beside the model's own classes: most likely a structure the model does not segment, and
            # merging it into an organ would teach the model that organ's shape wrong
            example = ",".join(f"{r}=0" for r in ranges)
            organ = f"{ranges[0]}=1 if they are {class_names[1]}"
            fix = f"give a mapping, e.g. --map {example} to make them background, or {organ}"
        raise LabelError(
            label_path,
            f"label values [{value_ranges(unknown)}] are not classes of the model ({_class_list(class_names)})",
            fix,
        )
    out = np.zeros(values.shape, np.uint8)
    for value, target in lut_values.items():
        if target:
            out[values == value] = target
    return out, image.affine


def refuse_intensity_image(
    values: np.ndarray,
    path: Path,
    image: np.ndarray | None = None,
    image_name: str = "",
    fix: str = "give the case's label map, its segmentation file, e.g. the one in the labels/ folder",
) -> None:
    """Refuse, as an intensity image, a file offered as a label map that is ``image`` itself (the case's own
    scan, whatever its bit depth) or has more distinct values than a label map has (:data:`LABEL_FILE_MAX_VALUES`).
    Before the value-by-value checks: their advice (a --map of hundreds of values to background) would make a
    scan a label. A label resampled with linear interpolation (mostly whole values, few of them) is left to the
    fractional-values check, which names the cause."""
    if image is not None and values.shape == image.shape and np.array_equal(values, image):
        raise LabelError(
            path,
            f"is the session's image {image_name} itself ({np.unique(values).size} distinct values), not a label map",
            fix,
        )
    if looks_like_label_map(values, LABEL_FILE_MAX_VALUES):
        return
    whole = values[values == np.round(values)] if values.dtype.kind == "f" else values
    if 2 * whole.size >= values.size and looks_like_label_map(whole, LABEL_FILE_MAX_VALUES):
        return
    count = int(np.unique(values).size)
    if count <= LABEL_FILE_MAX_VALUES:  # a few fractional values: no scan; the caller's own checks judge them
        return
    raise LabelError(path, f"holds {count} distinct values and looks like an intensity image, not a label map", fix)


# Name suffixes that mark a file as the label of an image (longest first: '_labels' before '_label').
LABEL_SUFFIXES = ("_segmentation", "_labels", "-labels", "_label", "-label", "_seg", "-seg", ".seg")
LABEL_SUFFIXES += ("_mask", "-mask", "_msk", "_dseg", "_gt")
NNUNET_CHANNEL = re.compile(r"_\d{4}$")
BIDS_ENTITY = re.compile(r"[a-z0-9]+-[a-z0-9]+")
# Entities that say which segmentation/derivative a file is, not which scan: seg-vert, desc-brain, space-orig.
BIDS_DERIVATIVE_ENTITIES = frozenset({"seg", "desc", "space", "res", "den", "mod"})


def name_key(name: str) -> tuple[str, bool]:
    """The case a file name stands for, lower-case, and whether it was read as a BIDS name.

    ``case_0000.nii.gz`` (nnU-Net channel), ``case_seg.nrrd``, ``case-label.nii``, ``case.seg.nrrd`` -> 'case';
    BIDS ``sub-mri_label-6_T2w`` and ``sub-mri_seg-subreg_label-6_msk`` -> 'sub-mri_label-6': the suffix
    (modality or msk/dseg) and the derivative entities (seg-, desc-, ...) dropped, the rest kept in order; a
    derivative named after its source file, suffix included (``sub-01_T1w_desc-brain_dseg``,
    ``sub-01_T1w_label-GM_mask``), is the source's case ('sub-01'): entities after that suffix are the
    derivative's own.
    """
    case, bids = _case_name(name)
    return case.lower(), bids


def _case_name(name: str) -> tuple[str, bool]:
    """:func:`name_key` with the name's own upper and lower case, as a message shows it."""
    case, bids, _ = _read_name(name)
    return case, bids


def _read_name(name: str) -> tuple[str, bool, str]:
    """:func:`_case_name`, and for a BIDS name with a suffix the source file's name it implies, entities and
    suffix (``sub-01_T1w`` of ``sub-01_T1w_desc-brain_dseg``; "" for none): which of a subject's scans
    (T1w, T2w) a derivative named so segments."""
    stem = case_id(Path(name).name)
    for suffix in LABEL_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = NNUNET_CHANNEL.sub("", stem)
    tokens = stem.split("_")
    lower = [t.lower() for t in tokens]
    bare = [i for i, low in enumerate(lower) if not BIDS_ENTITY.fullmatch(low)]  # suffixes: T1w, not key-value
    if len(tokens) > 1 and lower[0].startswith("sub-") and len(bare) <= 1:
        count = bare[0] if bare else len(tokens)  # the source's entities: those before its suffix
        kept = [t for t, low in zip(tokens[:count], lower) if low.split("-", 1)[0] not in BIDS_DERIVATIVE_ENTITIES]
        return "_".join(kept), True, "_".join([*kept, tokens[bare[0]]]) if bare and bare[0] > 0 else ""
    return stem, False, ""


def _keys(name: str) -> list[str]:
    """The :func:`name_key` a file pairs by, then for a BIDS name with a ``label-`` entity the key without it:
    a derivative mask names its structure so (``sub-01_label-GM_mask`` of ``sub-01_T1w``), where some datasets'
    scans carry one of their own (TPTBox's ``sub-mri_label-6_T2w``), which is why it is kept first."""
    key, bids = name_key(name)
    tokens = key.split("_")
    kept = [t for t in tokens if not t.startswith("label-")]
    return [key, "_".join(kept)] if bids and len(kept) < len(tokens) else [key]


@dataclass
class Pairing:
    """Label file name -> image name pairs, and a one-line reason for every label file left unpaired."""

    pairs: dict[str, str] = field(default_factory=dict)  # image name -> label name
    problems: dict[str, str] = field(default_factory=dict)  # label name -> why it has no image
    contested: set[str] = field(default_factory=set)  # images left unpaired because several labels fit them


def _expected_image(label_name: str, source: bool = False) -> str:
    """The image name a label expects, quoted: ``source``, the one its BIDS name says (suffix included)."""
    key, bids, named = _read_name(label_name)
    lower = Path(label_name).name.lower()
    extension = next(
        (e for e in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd") if lower.endswith(e)), ""
    )
    extension = ".nrrd" if extension == ".seg.nrrd" else extension
    if source and named:
        return f"'{named}{extension}'"
    return f"'{key}_<modality>{extension}'" if bids else f"'{key}{extension}' (or '{key}_0000{extension}')"


def _nested(image: str) -> bool:
    """Whether ``image`` is a recursive pool's name of a scan in a sub-folder (``a/b/c``), not a file's path."""
    return "/" in image and not Path(image).is_absolute()


def _names_of(image: str) -> list[str]:
    """The names an image (or evaluate's nested map) pairs by: its file or folder name, and a recursive pool's
    whole name, / as _."""
    return [Path(image).name, image.replace("/", "_")] if _nested(image) else [Path(image).name]


def _is_label_name(name: str) -> bool:
    """Whether a file name ends in a label's suffix (``_seg``, ``_mask``, ``_dseg``...), not as a scan's does."""
    stem = case_id(Path(name).name).lower()
    return any(stem.endswith(suffix) and len(stem) > len(suffix) for suffix in LABEL_SUFFIXES)


def _suffixes(names: Collection[str]) -> frozenset[str]:
    """The BIDS suffixes (T1w, FLAIR, a dataset's own) that scans' names end in: those of the names with no
    label's suffix, a pool's scans or the maps predict names after them. A word after ``sub-01_`` in a label's
    name says which scan it is of only where some scan is named so; ``brain`` of ``sub-01_brain_mask`` is no
    scan's where none is named ``sub-01_brain``."""
    sources = (_read_name(name)[2].lower() for name in names if not _is_label_name(name))
    return frozenset(source.rpartition("_")[2] for source in sources if source)


def _index(image_names: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Image names by the case name and by the :func:`name_key` of each name they pair by (:func:`_names_of`)."""
    exact: dict[str, list[str]] = {}
    keyed: dict[str, list[str]] = {}
    for image in image_names:
        for name in _names_of(image):
            exact.setdefault(case_id(name).lower(), []).append(image)
            keyed.setdefault(name_key(name)[0], []).append(image)
    return exact, keyed


def _source(name: str, suffixes: Collection[str]) -> str:
    """The source scan a BIDS name says (``sub-01_t1w`` of ``sub-01_T1w_desc-x_dseg`` and of ``sub-01_T1w``,
    lower-case) where its suffix is one of ``suffixes`` (:func:`_suffixes`); "" where not: ``sub-01_brain_mask``
    and ``sub-01_lesion_seg`` are named by a free word, not by the scan they segment."""
    source = _read_name(name)[2].lower()
    return source if source.rpartition("_")[2] in suffixes else ""


def pair_names(label_names: list[str], image_names: list[str], suffixes: Collection[str] | None = None) -> Pairing:
    """Pair label file names with image names; ambiguous pairs are refused, never guessed.

    A label pairs with the image of the same case name, else with the one image of the same
    :func:`name_key`; an image in a sub-folder of a recursive pool (``PT0/ST0/SE0``, a DICOM export's series)
    also goes by its whole name with ``_`` for ``/`` (``PT0_ST0_SE0``), as its folder's name is often every
    series'. A BIDS label that names its source's suffix (``sub-01_T1w_dseg``) pairs only with the scan of that
    suffix where some scan's name ends in it (``suffixes``, :func:`_suffixes`: of these names, or of all that
    :func:`pair_mirrored` pairs); a free word there (``sub-01_brain_mask``) is no suffix. A label that fits
    several images, or an image that several labels fit (``seg-vert`` and ``seg-subreg`` of one scan), is
    refused with the names involved. An unpaired label's reason names the image name it expected and the
    closest image names (difflib).
    """
    exact, keyed = _index(image_names)
    suffixes = _suffixes([*label_names, *image_names]) if suffixes is None else suffixes
    sources = {image: _source(image, suffixes) for image in image_names}  # by the file's name
    result = Pairing()
    claims: dict[str, list[str]] = {}
    for label in label_names:
        # a nested label (evaluate's maps at a recursive pool's paths) by its whole path first, / as _, then its file
        exact_fits = (exact.get(case_id(name).lower()) for name in reversed(_names_of(label)))
        # BIDS names that both say their source's suffix are of one scan only if it is the same: a derivative
        # sub-01_T1w_desc-brain_dseg is sub-01_T1w's, not sub-01_T2w's (nor a map of the T2w a T1w's reference)
        source = _source(label, suffixes)
        key_fits = (
            [i for i in keyed.get(key, []) if not (source and sources[i]) or sources[i] == source]
            for key in _keys(label)
        )
        candidates = next((c for c in itertools.chain(exact_fits, key_fits) if c), [])
        if len(candidates) == 1:
            claims.setdefault(candidates[0], []).append(label)
        elif candidates:
            result.contested.update(candidates)
            named = sorted(candidates)
            by_path = f", or name it by its scan's path, / as _ ({case_id(named[0])})" if _nested(named[0]) else ""
            result.problems[label] = (
                f"fits several images ({', '.join(named)}); import it alone with --from FILE --cases IMAGE{by_path}"
            )
        else:
            others = list(dict.fromkeys(i for key in _keys(label) for i in keyed.get(key, [])))
            if others:  # scans of its case, of another suffix than the one its name says
                suffix = _read_name(label)[2].rpartition("_")[2]
                result.problems[label] = (
                    f"{NO_IMAGE} (expected {_expected_image(label, source=True)}: its name says its scan's suffix "
                    f"{suffix}; {', '.join(sorted(others))} {'is' if len(others) == 1 else 'are'} of another)"
                )
                continue
            key = name_key(label)[0]
            # a scan named by more than the label names (sub-1_ses-1 for sub-1_ses-1_T1w_fatsat) comes first
            longer = [k for k in keyed if k.startswith(key + "_") or key.startswith(k + "_")]
            close = longer[:3] or difflib.get_close_matches(key, list(keyed), n=3, cutoff=0.5)
            nearest = list(dict.fromkeys(keyed[k][0] for k in close))
            closest = (
                f"closest: {', '.join(nearest)}" if nearest else f"no similar name among {len(image_names)} images"
            )
            if any(_nested(image) for image in nearest):
                closest += f" (a scan in a sub-folder pairs with its path, / as _: {case_id(nearest[0])})"
            result.problems[label] = f"{NO_IMAGE} (expected {_expected_image(label)}; {closest})"
    _settle(claims, result)
    return result


def _settle(claims: dict[str, list[str]], result: Pairing) -> None:
    """Each image's one label into ``result.pairs``; an image several labels claim is refused, each label naming
    the others (by file name, and a nested one by its path under its folder: two folders may hold the same)."""
    for image, labels in claims.items():
        if len(labels) == 1:
            result.pairs[image] = labels[0]
            continue
        result.contested.add(image)
        for label in labels:
            others = ", ".join(other if _nested(other) else Path(other).name for other in labels if other != label)
            result.problems[label] = (
                f"several label files fit image {image} (also {others}); keep one in the folder or "
                "import one with --from FILE"
            )


def _folder(name: str) -> str:
    """The sub-folder part of a name under its folder: ``site1`` of ``site1/a.nii.gz``, "" at the top."""
    return name.rpartition("/")[0] if _nested(name) else ""


def pair_mirrored(label_names: list[str], image_names: list[str]) -> Pairing:
    """:func:`pair_names` where the labels' sub-folders mirror the images' (a recursive pool's, the maps
    ``asfda predict --recursive`` writes, a BIDS ``derivatives/<pipeline>`` tree): a label in a sub-folder pairs
    with the images of the same sub-folder (``site1/a_seg`` with ``site1/a``, never ``site2/a``; a BIDS
    ``sub-01/anat/sub-01_T1w_desc-brain_dseg`` with ``sub-01/anat/sub-01_T1w``), one at the top with any image.
    A label whose sub-folder holds no image of its case pairs with the one image of its case at the pool's top, as
    a label anywhere does with a pool all at the top (an image there has no folder to mirror); two such images
    are refused as always. Images all at the top: every label pairs by name wherever it lies. Two labels of one
    image from different folders are refused like two from one. A label left unpaired in its sub-folder says so
    in one line, naming the folder and the closest images of the whole pool."""
    if not any(_nested(image) for image in image_names):
        return pair_names(label_names, image_names)
    suffixes = _suffixes([*label_names, *image_names])  # all: sub-02's T2w says a T2w map is not sub-01's T1w's
    top = [image for image in image_names if not _nested(image)]
    groups: dict[str, list[str]] = {}
    for label in label_names:
        groups.setdefault(_folder(label), []).append(label)
    result = Pairing()
    claims: dict[str, list[str]] = {}
    keyed: dict[str, list[str]] = {}  # the whole pool's, for an unpaired label's closest names
    for folder, labels in sorted(groups.items()):
        images = image_names if not folder else [i for i in image_names if _folder(i) == folder]
        part = pair_names(labels, images, suffixes)
        # of no image of its case in its sub-folder (not one of its case with another suffix than its name says)
        here = _index(images)[1] if folder else {}
        lost = [
            label
            for label, why in part.problems.items()
            if folder and why.startswith(NO_IMAGE) and not any(key in here for key in _keys(label))
        ]
        if lost and top:  # none of its case in its sub-folder: the one at the top, as where the pool is flat
            above = pair_names(lost, top, suffixes)
            for label in lost:
                del part.problems[label]
            part.pairs |= above.pairs
            part.problems |= above.problems
            part.contested |= above.contested
        for label in lost:
            if part.problems.get(label, "").startswith(NO_IMAGE):
                keyed = keyed or _index(image_names)[1]
                part.problems[label] = _unmirrored(label, folder, keyed)
        result.problems |= part.problems
        result.contested |= part.contested
        for image, label in part.pairs.items():
            claims.setdefault(image, []).append(label)
    _settle(claims, result)
    return result


def _unmirrored(label: str, folder: str, keyed: dict[str, list[str]]) -> str:
    """Why a label in ``folder`` pairs with no image, in one line: the pool's ``folder`` holds none of its case
    (or the pool has no such folder) and a sub-folder's label pairs with its own folder's images; the closest
    images of the whole pool (``keyed``, :func:`_index`), those of its very case name first, wherever they lie."""
    names = _names_of(label)  # its file name, then its path with / as _ (case01_seg of case01/seg.nii.gz)
    keys = [name_key(name)[0] for name in names]
    tries = itertools.chain(
        ([key for name in names for key in _keys(name) if key in keyed],),  # its very case, in other folders
        ([k for k in keyed if k.startswith(key + "_") or key.startswith(k + "_")] for key in keys),
        (difflib.get_close_matches(key, list(keyed), n=3, cutoff=0.5) for key in keys),
    )
    close = next((c for c in tries if c), [])[:3]
    nearest = list(dict.fromkeys(image for k in close for image in keyed[k]))[:3]
    closest = f"closest in the whole pool: {', '.join(nearest)}" if nearest else "no similar name in the pool"
    folders = sorted({_folder(image) for images in keyed.values() for image in images} - {""})
    rule = "a label in a sub-folder pairs with the scans of the same sub-folder or of the pool's top"
    if folder in folders:
        return f"{NO_IMAGE} in the pool's sub-folder {folder}/, and {rule}; {closest}"
    within = max((f for f in folders if folder.endswith("/" + f)), key=len, default="")
    if within:  # a folder above the one that mirrors the pool: derivatives/ for derivatives/manual
        return (
            f"{NO_IMAGE}: its sub-folder {folder}/ does not mirror the pool's sub-folders but ends in the pool's "
            f"{within}/: give its folder {folder[: -len(within)]} (under the one given) instead, as {rule}; {closest}"
        )
    shown = ", ".join(f + "/" for f in folders[:3]) + (", …" if len(folders) > 3 else "")
    return (
        f"{NO_IMAGE}: its sub-folder {folder}/ does not mirror the pool's sub-folders ({shown}), and {rule}; {closest}"
    )


def label_example(image: str, folder: Path | str, label_names: Collection[str]) -> str:
    """How the label of ``image`` (a pool's name) is named in ``folder`` to pair with it, for the line saying it has
    none there (``label_names``: the folder's files by their path under it). A scan of a recursive BIDS pool (a
    BIDS name in a sub-folder, ``sub-02/anat/sub-02_T2w.nii.gz``) by its path in a ``derivatives/<pipeline>``
    folder that mirrors the pool, named as ASFDA pairs it: the scan's name plus ``_dseg``
    (``sub-02/anat/sub-02_T2w_dseg.nii.gz``; BIDS' own segmentation name drops the scan's suffix, which would not
    tell it from sub-02's T1w), and by that file name at the folder's top only where its labels lie flat; any other
    scan by its case name (a nested one's path, / as _)."""
    case = case_id(image)
    if not (_nested(image) and name_key(Path(image).name)[1]):
        return f"a label is named by its scan's case name: e.g. {case}.nii.gz, {case}_seg.nii.gz or {case}.seg.nrrd"
    label = f"{case_id(Path(image).name)}_dseg.nii.gz"
    said = (
        "a label lies at its scan's path in the labels folder, named as the scan plus _dseg: e.g. "
        f"{Path(folder) / _folder(image) / label}"
    )
    if label_names and not any(_nested(name) for name in label_names):  # a flat folder pairs by the file's name
        said += f", or at the folder's top as its labels lie, {label}"
    return said


def match_labels(label_paths: list[Path], image_names: list[str]) -> dict[str, Path]:
    """Pair label files with images by case name (see :func:`pair_names`); unpaired files are left out."""
    by_name = {str(p): p for p in label_paths}
    return {image: by_name[label] for image, label in pair_names(list(by_name), image_names).pairs.items()}


@dataclass
class ImportReport:
    """What ``labels import`` did: every label file is imported, skipped or refused, with the reason."""

    imported: dict[str, Path] = field(default_factory=dict)  # image name -> stored label file
    sources: dict[str, Path] = field(default_factory=dict)  # image name -> the file it came from
    notes: dict[str, list[str]] = field(default_factory=dict)  # image name -> what was changed (reoriented)
    unchanged: dict[str, Path] = field(default_factory=dict)  # image name -> its current version, same content
    skipped: list[str] = field(default_factory=list)  # valid labels of volumes that were not asked for
    refused: list[str] = field(default_factory=list)  # files that cannot be used, with the fix
    failed: list[str] = field(default_factory=list)  # asked-for images whose label file was refused
    missing: list[str] = field(default_factory=list)  # asked-for volumes with no label file in the source
    # labels of the picks a rank stopped before recording: asked for by the user, if not yet by the session
    unrecorded_picks: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)
    unlabeled: int = 0  # readable volumes of the pool without a label afterwards: the pseudo-label pool
    unreadable: int = 0  # files of the pool ranking could not read: in no pool
    pool: int = 0
    classes: dict[int, str] = field(default_factory=dict)  # the classes the imported labels hold, by index
    mapped: bool = False  # whether a --map turned the files' values into class indices
    by_name: bool = False  # whether a Slicer segmentation was read by its segments' names
    passed_over: str = ""  # where a queried volume has no label file: the source's files of other types, if any
    example: str = ""  # how the first of ``missing`` would be named to pair (label_example)
    source: str = ""  # the file or folder the labels were imported from

    @property
    def nothing_left(self) -> bool:
        """Every asked-for volume was labelled before this import, which found nothing new for any of them (nor
        labels of picks a stopped rank showed, which the user meant to import: rank again first)."""
        done = self.imported or self.unchanged or self.missing or self.failed or self.unrecorded_picks
        return bool(self.asked) and not done

    def lines(self, queried_only: bool = True) -> list[str]:
        """The report as the user reads it: one line per file, then what is left for pseudo-labels."""
        out = []
        for name, stored in self.imported.items():
            notes = f" ({'; '.join(self.notes[name])})" if name in self.notes else ""
            out.append(f"imported {name} <- {self.sources[name]}{notes} as {stored.parent.name}/{stored.name}")
        out += [
            f"unchanged {name}: the same as its current version {stored.parent.name}/{stored.name}"
            for name, stored in self.unchanged.items()
        ]
        out += [f"skipped {reason}" for reason in self.skipped]
        out += [f"refused {reason}" for reason in self.refused]
        if self.missing:
            where = f" in {self.source}" if self.source else ""
            out.append(f"no label file for {', '.join(self.missing)}{where} ({self.example})")
            out += [self.passed_over] if self.passed_over else []
        if not self.asked:
            out.append("no volume has been queried yet: run 'asfda rank' first, or import with --all")
        elif self.nothing_left:
            asked = "queried" if queried_only else "asked-for"
            count = len(self.asked)
            out.append(f"every {asked} volume ({count}) is labelled already: none of theirs is left to import")
        if self.imported and self.classes:  # what the numbers were read as: a label numbered otherwise shows here
            read = ", ".join(f"{i}={name}" for i, name in sorted(self.classes.items()))
            how = (
                "after --map"
                if self.mapped
                else "Slicer segmentations by their segments' names; give --map if other files number them otherwise"
                if self.by_name
                else "give --map if the files number them otherwise"
            )
            out.append(f"label values read as the model's classes: {read} ({how})")
        left = (
            f"{self.unlabeled} of {self.pool} volumes stay unlabeled for pseudo-labels"
            if self.unlabeled
            else "No unlabeled volume is left for pseudo-labels; 'asfda finetune' will train on the labels only"
        )
        if self.unreadable:
            left += f" ({self.unreadable} unreadable left out: see 'asfda rank')"
        asked = "queried volumes" if queried_only else "asked-for volumes"
        out.append(
            f"Imported {len(self.imported)} of {len(self.asked)} {asked}"
            + (f" ({len(self.unchanged)} unchanged: already in the session)" if self.unchanged else "")
            + (" (each labelled already)" if self.nothing_left else "")
            + f"; skipped {len(self.skipped)} (not asked for, or of no image), refused {len(self.refused)}. {left}."
        )
        return out


def resolve_cases(session: Session, cases: list[str]) -> list[str]:
    """Image names of the pool for names given by the user (file name, case name or BIDS-style case)."""
    names = session.image_names()
    out = []
    for given in cases:
        hits = [n for n in names if given in (n, Path(n).name)] or [
            n for n in names if case_id(Path(n).name).lower() == case_id(Path(given).name).lower()
        ]
        if len(hits) != 1:
            hits = [n for n in names if name_key(n)[0] == name_key(given)[0]]
        if len(hits) != 1:
            close = difflib.get_close_matches(given, names, n=3, cutoff=0.4)
            what = f"fits {len(hits)} images" if hits else "is not an image of the session"
            raise ASFDAError(
                f"--cases {given!r} {what}; give the file name"
                + (
                    f" (closest: {', '.join(close)})"
                    if close
                    else f" ('asfda labels {as_arg(session.root)}' lists them)"
                )
            )
        out += [n for n in hits if n not in out]
    return out


def _mapping_record(mapping: LabelMap | dict[int, int] | None) -> dict | None:
    """What session.json keeps of a ``--map``: file value -> class index, and the default for the rest."""
    if not mapping:
        return None
    if isinstance(mapping, LabelMap):
        values, default = mapping.values, mapping.default
    else:
        values, default = mapping, None
    return {"values": {str(k): int(v) for k, v in sorted(values.items())}, "default": default}


def mapping_text(record: dict) -> str:
    """A recorded map (:func:`_mapping_record`) as a ``--map`` text again: {3: 0, 4: 0, 7: 1} -> '3-4=0,7=1'."""
    by_target: dict[int, list[int]] = {}
    for value, target in record["values"].items():
        by_target.setdefault(int(target), []).append(int(value))
    terms = [f"{value_ranges(values)}={target}" for target, values in sorted(by_target.items())]
    if record.get("default") is not None:
        terms.append(f"*={record['default']}")
    return ",".join(terms)


def _same_label(stored: Path, label: np.ndarray, affine: np.ndarray) -> bool:
    """Whether the session's stored label file holds exactly these voxels on this grid."""
    try:
        current = read_volume(stored, allow_constant=True)
    except VolumeError:
        return False
    return bool(
        current.array.shape == label.shape
        and np.allclose(current.affine, affine, atol=1e-5)
        and np.array_equal(current.array, label)
    )


def _label_files(session: Session, source: Path) -> dict[str, Path]:
    """A label folder's files by the name each pairs by (:func:`pair_mirrored`): their path under ``source``,
    where the session's pool is recursive also those in sub-folders (a folder that mirrors the pool, as
    ``asfda predict --recursive`` writes its maps or a BIDS ``derivatives/<pipeline>`` holds its labels)."""
    recursive = bool((session.data.get("images") or {}).get("recursive"))
    files = discover_volumes(source, recursive, exclude=[session.root])
    return {relative_name(p, source): p for p in files}


def import_labels(
    session: Session,
    source: Path,
    class_names: list[str] | None = None,
    mapping: LabelMap | dict[int, int] | None = None,
    cases: Collection[str] | None = None,
) -> ImportReport:
    """Validate label files against their images and copy the asked-for ones into ``labels/`` as new versions,
    recorded in session.json (saved here, under the session's lock: taken for the call unless held).

    ``class_names``: the classes a label's values are checked against (default: the session model's card's).
    ``cases`` are the image names asked for; None means the volumes queried so far (every round), so that a
    folder holding labels of the whole pool does not silently empty the pseudo-label pool. Labels of other
    volumes are still checked (a broken file's problem is reported either way) and listed as skipped. With a single
    label file and a single case, the two are paired whatever their names. Nothing already in the session
    is overwritten.
    """
    with session.held():
        if class_names is None:
            if not session.data.get("model"):
                raise ASFDAError(
                    f"{session.root}: no model is recorded, so no classes to check labels against; rank a pool "
                    f"into it first: 'asfda rank --images SCANS --out {as_arg(session.root)}'"
                )
            class_names = list(session.data["model"]["card"]["class_names"])
        report = _import_labels(session, Path(source), class_names, mapping, cases)
        if report.imported:
            session.save()
        return report


def _import_labels(
    session: Session,
    source: Path,
    class_names: list[str],
    mapping: LabelMap | dict[int, int] | None,
    cases: Collection[str] | None,
) -> ImportReport:
    if not session.image_root.is_dir():  # every label would be refused as if its scan were corrupt
        raise VolumeError(
            session.image_root,
            "the session's pool folder is gone (moved, or another machine)",
            f"rank the pool where it is now once, 'asfda rank --out {as_arg(session.root)} --images NEW_FOLDER', "
            "then import again",
        )
    files = {source.name: source} if source.is_file() else _label_files(session, source)
    asked = list(session.queried() if cases is None else cases)
    report = ImportReport(asked=asked, pool=len(session.image_names()), mapped=bool(mapping), source=str(source))
    if source.is_file() and len(asked) == 1 and cases is not None:
        pairing = Pairing({asked[0]: str(source)})
    else:
        pairing = pair_mirrored(list(files), session.image_names())
        # a label went by its name under the folder: named by its whole path again in what is said
        pairing.pairs = {name: str(files[label]) for name, label in pairing.pairs.items()}
        pairing.problems = {str(files[label]): reason for label, reason in pairing.problems.items()}
    for label, reason in pairing.problems.items():  # a file of no image in the pool is skipped, not an error
        (report.skipped if reason.startswith(NO_IMAGE) else report.refused).append(f"{label}: {reason}")
    predicted = unchanged_predictions(Path(p) for p in pairing.pairs.values())  # one manifest read a folder
    stored = session.labelled()  # each image pairs with one file: its current version does not move below
    drawn_on = session.labelled_images()  # once, not per file: a pool may hold thousands
    stopped = unrecorded_query(session.root, session) or []  # no round's until its rank is run again
    for name, label_name in sorted(pairing.pairs.items()):
        label_path = Path(label_name)
        notes: list[str] = []
        flaw = ""
        try:
            if label_path in predicted:  # the model's own map would teach it its own errors
                raise VolumeError(
                    label_path,
                    "is a map asfda predict wrote, unchanged since: the model's own prediction, not a label",
                    "correct it first, or import a clinician's label",
                )
            label, affine = validate_label(label_path, session.image_path(name), class_names, mapping, notes)
        except VolumeError as exc:
            if name in asked:
                report.refused.append(str(exc))
                report.failed.append(name)
                continue
            flaw = f"; as it is, it would be refused: {exc.reason}"  # checked all the same, so it is fixed in time
        if name not in asked:
            why, fix = (
                (
                    "a rank stopped before session.json recorded its query, which ranking.json shows",
                    f"run that 'asfda rank --out {as_arg(session.root)}' again, or import it with --cases",
                )
                if cases is None and name in stopped
                else ("no round has queried it", "import it with --cases")
                if cases is None
                else ("not among --cases", "add it to --cases")
            )
            report.skipped.append(f"{label_path}: image {name} was not asked for ({why}); {fix}{flaw}")
            if cases is None and name in stopped:
                report.unrecorded_picks.append(name)
            continue
        current = stored.get(name)
        image = content_record(session.image_path(name))
        # the same voxels on the same image add no version; on an image that changed, they record what it is now
        same_image = drawn_on.get(name, {}).get("sha256") in (None, image["sha256"])
        if current is not None and same_image and _same_label(current, label, affine):
            report.unchanged[name] = current  # a second import of the same file adds no version
            continue
        data = nifti_bytes(label, affine)
        written = hashlib.sha256(data).hexdigest()
        # label files no version records: an import stopped before its save of session.json left them, or a
        # session.json restored from its .bak forgot them. The one that holds this very label is recorded as it
        # is; the others are kept (a label someone may still need), never written over, and named.
        unrecorded = session.unrecorded_labels(name)
        same = next((p for p in unrecorded if content_hash(p) == written), None)
        if same is not None:
            target = same
            notes.append(f"{target.name}, on disk and recorded by no version, holds this very label: recorded as it is")
        else:
            target = session.next_label_path(name)
            atomic_write_bytes(target, data)
            notes.extend(
                f"{p.name} is on disk and recorded by no version (an import stopped before its record, or a "
                f"session.json restored from its .bak); kept beside this label"
                for p in unrecorded
            )
        session.record_label(
            name,
            target,
            written,
            f"import:{label_path}",
            _mapping_record(mapping),
            source_sha256=content_hash(label_path),
            image_sha256=image["sha256"],
            image_stamp=image["stamp"],
        )
        report.imported[name], report.sources[name] = target, label_path
        report.by_name |= any(n.startswith("segments read by name") for n in notes)
        report.classes |= {int(v): class_names[int(v)] for v in np.unique(label) if 0 < int(v) < len(class_names)}
        if notes:
            report.notes[name] = notes
    report.failed = sorted({*report.failed, *(n for n in asked if n in pairing.contested)})
    labelled = session.labelled()
    report.missing = [n for n in asked if n not in labelled and n not in pairing.pairs]
    if report.missing:
        report.example = label_example(report.missing[0], source if source.is_dir() else source.parent, list(files))
    if report.missing and source.is_dir() and (others := passed_over(source)):  # a label saved as .mgz, say
        report.passed_over = passed_over_line(source, others, "import")
    unreadable = session.unreadable_images()
    report.unlabeled = sum(1 for n in session.image_names() if n not in labelled and n not in unreadable)
    report.unreadable = len(unreadable - set(labelled))
    return report
