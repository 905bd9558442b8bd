"""A DICOM folder to the one scan it holds: a series of slice files, or an enhanced multi-frame file.

pydicom reads the headers (which files are a scan, which series, where each slice or frame lies); SimpleITK's
GDCM decodes the pixels (uncompressed, RLE, JPEG lossless and lossy, JPEG-LS, JPEG 2000). The geometry is
the headers': slices ordered along their normal, refused where they are uneven, tilted or disagree, so an
image is never stacked with a geometry it does not have. Objects that are no scan (RT structures, SEG, SR,
presentation states, RT dose and plans, colour screen captures) are left out of the series.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from ASFDALib.errors import VolumeError

DICOMDIR = "dicomdir"  # a CD/PACS export's index of its series (Part 10 file name), not a slice
# Objects a study holds beside its scans: contours, segmentations, reports, display states, dose grids, plans
NOT_SCANS = frozenset({"RTSTRUCT", "SEG", "SR", "PR", "KO", "REG", "RTDOSE", "RTPLAN", "RTRECORD", "RTIMAGE", "DOC"})
_STRAY_SLICE = 0.5  # slices drifting more than this fraction of a pixel across their plane are tilted


@dataclass(frozen=True)
class Frame:
    """Where one slice (a file, or a frame of a multi-frame file) lies, in LPS mm, and how its values scale."""

    name: str  # the file's name, or "file frame N"
    position: np.ndarray  # ImagePositionPatient
    orientation: np.ndarray  # ImageOrientationPatient: row direction, column direction
    spacing: np.ndarray  # PixelSpacing: between rows, between columns
    size: tuple[int, int]  # Rows, Columns
    rescale: tuple[float, float]  # RescaleSlope, RescaleIntercept


def is_dicom_file(path: Path) -> bool:
    """A DICOM file by name (``.dcm``) or by its Part 10 preamble, other than a DICOMDIR."""
    if path.name.lower() == DICOMDIR:
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_series(folder: Path, files: list[Path]) -> sitk.Image:
    """The one scan among a DICOM folder's ``files``, as a SimpleITK image in LPS with the headers' geometry.

    Files that are no DICOM are left aside, as are objects that are no scan (:data:`NOT_SCANS`, no pixels, colour
    captures); more than one image series is refused naming each, with its files.
    """
    headers = [(path, ds) for path in files if (ds := _header(path)) is not None]
    scans = [(path, ds) for path, ds in headers if _kind(ds) == "scan"]
    if not scans:
        found = Counter(_kind(ds) for _, ds in headers)
        held = f": only {', '.join(f'{kind} ({n})' for kind, n in sorted(found.items()))}" if found else ""
        raise VolumeError(folder, f"no DICOM image series in this folder{held}", "give the folder of a scan's slices")
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path, ds in scans:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if len(series) > 1:
        described = "; ".join(_describe(members) for members in series.values())
        raise VolumeError(
            folder,
            f"{len(series)} image series in one folder: {described}",
            "move each series' files into a folder of its own, or remove the ones not to score (a localizer, say)",
        )
    (members,) = series.values()
    if len(members) == 1 and int(members[0][1].get("NumberOfFrames", 1) or 1) > 1:
        return _read_multiframe(*members[0])
    multiframe = [path.name for path, ds in members if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multiframe:
        raise VolumeError(
            folder,
            f"{len(multiframe)} multi-frame files in one series ({', '.join(multiframe[:3])})",
            "give each multi-frame file a folder of its own",
        )
    if len(members) < 2:
        raise VolumeError(folder, "DICOM series has a single slice", "ASFDA needs a 3D series")
    return _read_slices(folder, members)


def _header(path: Path) -> pydicom.Dataset | None:
    """A file's DICOM header without its pixels; None for a file that is no DICOM (a CD's README, say)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=path.suffix.lower() == ".dcm")
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on a file that is no DICOM
        return None


def _kind(ds: pydicom.Dataset) -> str:
    """``scan``, or what else the file is: its modality (RTSTRUCT, SEG, ...), or a colour capture (a screenshot of
    a dose report, a photograph: several samples per pixel)."""
    modality = str(ds.get("Modality", "") or "no modality").upper()
    if "Rows" not in ds or modality in NOT_SCANS:
        return modality
    return "scan" if int(ds.get("SamplesPerPixel", 1) or 1) == 1 else "colour screen capture or photo"


def _describe(members: list[tuple[Path, pydicom.Dataset]]) -> str:
    """``series 2 'AX T2' (20 files: IM0000 ... IM0019)``: a series as a user can find its files."""
    ds = members[0][1]
    names = sorted(path.name for path, _ in members)
    files = f"{len(names)} file{'s' * (len(names) != 1)}: " + (
        names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}"
    )
    title = f" '{ds.SeriesDescription}'" if ds.get("SeriesDescription") else ""
    return f"series {ds.get('SeriesNumber', '?')}{title} ({files})"


def _frame(where: Path, name: str, *groups: pydicom.Dataset) -> Frame:
    """The :class:`Frame` ``name``, each tag from the first of ``groups`` (datasets, functional-group items) to
    hold it; refused where it has no geometry (a screen capture), which no stacking could make up."""

    def tag(keyword: str, default=None):
        value = next((g.get(keyword) for g in groups if g.get(keyword) is not None), default)
        if value is None:
            raise VolumeError(where, f"no {keyword} on {name}", "give the scan's original series, with its geometry")
        return value

    return Frame(
        name=name,
        position=np.asarray(tag("ImagePositionPatient"), dtype=np.float64),
        orientation=np.asarray(tag("ImageOrientationPatient"), dtype=np.float64),
        spacing=np.asarray(tag("PixelSpacing"), dtype=np.float64),
        size=(int(tag("Rows")), int(tag("Columns"))),
        rescale=(float(tag("RescaleSlope", 1.0)), float(tag("RescaleIntercept", 0.0))),
    )


def _read_slices(folder: Path, members: list[tuple[Path, pydicom.Dataset]]) -> sitk.Image:
    """A series of single-frame files: checked, ordered along the slices' normal, rescaled slice by slice."""
    frames = [_frame(folder, path.name, ds) for path, ds in members]
    order = _stack_order(folder, frames, "slice")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(members[i][0]) for i in order])
    if len({f.rescale for f in frames}) > 1:  # GDCM would cast every slice to the first one's type: fractions lost
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError:
        raise _undecodable(folder, members) from None
    return _with_geometry(image, [frames[i] for i in order])


def _undecodable(folder: Path, members: list[tuple[Path, pydicom.Dataset]]) -> VolumeError:
    """The refusal of a series GDCM could not decode, naming the first file it cannot read alone and its encoding
    (looked for only once the series failed: every slice is read twice)."""
    for path, ds in members:
        try:
            sitk.ReadImage(str(path))
        except RuntimeError:
            return _undecodable_file(folder, path, ds)
    return VolumeError(folder, "GDCM could not read the series' slices together", "re-export the series")


def _undecodable_file(where: Path, path: Path, ds: pydicom.Dataset) -> VolumeError:
    """A file GDCM could not decode: damaged, or (compressed) in an encoding this install's GDCM lacks."""
    syntax = getattr(ds, "file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return VolumeError(where, f"{path.name} could not be decoded: damaged or cut short", "copy it again")
    return VolumeError(
        where,
        f"{path.name} could not be decoded ({syntax.name}, {syntax}): damaged, or an encoding this install's "
        "SimpleITK (GDCM) does not read",
        "copy it again; else re-export the series uncompressed (e.g. 'gdcmconv --raw IN OUT')",
    )


def _read_multiframe(path: Path, ds: pydicom.Dataset) -> sitk.Image:
    """An enhanced multi-frame file (one file, one frame per slice), its frames placed by their own positions."""
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if not per_frame:
        raise VolumeError(
            path,
            f"a multi-frame file ({ds.NumberOfFrames} frames) without per-frame positions: a cine loop or a capture",
            "give an enhanced CT/MR file or a series of slices",
        )
    shared = (ds.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]
    frames = [_enhanced_frame(path, k, item, shared, ds) for k, item in enumerate(per_frame)]
    order = _stack_order(path, frames, "frame")
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError:
        raise _undecodable_file(path, path, ds) from None
    # (frame, row, column), each frame rescaled by the first frame's slope and intercept
    if array.ndim != 3 or array.shape[0] != len(frames):
        raise VolumeError(path, f"{len(frames)} frames in the header, {array.shape} decoded", "re-export the file")
    if len({f.rescale for f in frames}) > 1:  # GDCM applies the first frame's slope and intercept to all
        slope, intercept = frames[0].rescale
        stored = (array.astype(np.float64) - intercept) / slope
        array = np.stack([stored[k] * frames[k].rescale[0] + frames[k].rescale[1] for k in range(len(frames))])
        array = array.astype(np.float32)
    return _with_geometry(sitk.GetImageFromArray(np.ascontiguousarray(array[order])), [frames[i] for i in order])


def _enhanced_frame(
    path: Path, index: int, item: pydicom.Dataset, shared: pydicom.Dataset, ds: pydicom.Dataset
) -> Frame:
    """Frame ``index`` of an enhanced file: its functional groups (per frame before shared), then the file's tags."""
    groups = [
        group[sequence][0]
        for sequence in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence")
        + ("PixelValueTransformationSequence", "CTPixelValueTransformationSequence")
        for group in (item, shared)
        if group.get(sequence)
    ]
    return _frame(path, f"{path.name} frame {index + 1}", *groups, ds)


def _stack_order(where: Path, frames: list[Frame], noun: str) -> list[int]:
    """The frames' order along their normal, after refusing those that disagree in pixel spacing, orientation or
    matrix size, lie unevenly (a missing, duplicated or mixed-thickness slice) or drift across their plane (a
    gantry tilt): SimpleITK would take the first frame's geometry for all of them."""
    first = frames[0]
    for what, value in (
        ("pixel spacing", lambda f: f.spacing),
        (f"{noun} orientation", lambda f: f.orientation),
        ("matrix size", lambda f: np.asarray(f.size, dtype=np.float64)),
    ):
        for frame in frames[1:]:
            if not np.allclose(value(frame), value(first), rtol=1e-3, atol=1e-4):
                raise VolumeError(
                    where,
                    f"inconsistent {what} across {noun}s ({first.name}: {_numbers(value(first))}, "
                    f"{frame.name}: {_numbers(value(frame))}): two series mixed in one folder?",
                    "re-export the series, or put each acquisition in its own folder",
                )
    normal = _axes(first)[:, 2]
    depth = np.array([normal @ f.position for f in frames])
    order = [int(i) for i in np.argsort(depth, kind="stable")]
    steps = np.diff(depth[order])
    reference = _usual_step(steps)
    worst = int(np.argmax(np.abs(steps - reference)))
    if steps.min() <= 1e-3 or steps.max() - steps.min() > 0.01 * max(steps.max(), 1e-6):
        kind = (
            f"a duplicated {noun} (or several echoes or time points in one series)"
            if steps.min() <= 1e-3
            else f"a missing {noun} or mixed slice thickness"
        )
        raise VolumeError(
            where,
            f"uneven {noun} spacing ({steps.min():.2f} to {steps.max():.2f} mm; between "
            f"{frames[order[worst]].name} and {frames[order[worst + 1]].name}): {kind}?",
            "re-export the complete series",
        )
    _refuse_tilt(where, [frames[i] for i in order], normal)
    return order


def _usual_step(steps: np.ndarray) -> float:
    """The step most slices are apart (to 0.01 mm; the smaller of equally common ones), so the odd one out is the
    pair whose step differs from it: the pair around a missing slice, even where only two steps were measured."""
    counts = Counter(np.round(steps, 2).tolist())
    return min(counts, key=lambda s: (-counts[s], s))


def _refuse_tilt(where: Path, frames: list[Frame], normal: np.ndarray) -> None:
    """Refuse slices whose positions drift across their own plane (a CT gantry tilt): stacking them square to
    the plane would shift the anatomy by that drift, which no orthogonal grid can hold."""
    span = frames[-1].position - frames[0].position
    drift = float(np.linalg.norm(span - (span @ normal) * normal))
    if drift > _STRAY_SLICE * float(frames[0].spacing.min()):
        angle = float(np.degrees(np.arctan2(drift, abs(span @ normal))))
        raise VolumeError(
            where,
            f"slices tilted by {angle:.1f} degrees (gantry tilt: {frames[-1].name} lies {drift:.1f} mm across the "
            f"slices' plane from {frames[0].name}); ASFDA reads slices stacked square to their plane",
            "resample it first: 3D Slicer does when loading it with Application Settings > DICOM > Acquisition "
            "geometry regularization set to harden; then save it as NIfTI",
        )


def _with_geometry(image: sitk.Image, frames: list[Frame]) -> sitk.Image:
    """``image`` (its slices in ``frames``' order) with the frames' geometry: origin at the first, columns along
    the row direction, rows along the column direction, slices along the normal."""
    first = frames[0]
    axes = _axes(first)
    step = float(axes[:, 2] @ (frames[1].position - first.position))
    image.SetOrigin([float(v) for v in first.position])
    image.SetSpacing([float(first.spacing[1]), float(first.spacing[0]), step])
    image.SetDirection([float(v) for v in axes.ravel()])
    return image


def _axes(frame: Frame) -> np.ndarray:
    """The frame's row direction, column direction and normal as orthonormal columns (headers round them)."""
    row = frame.orientation[:3] / np.linalg.norm(frame.orientation[:3])
    column = frame.orientation[3:] - (frame.orientation[3:] @ row) * row
    column /= np.linalg.norm(column)
    return np.column_stack([row, column, np.cross(row, column)])


def _numbers(values) -> str:
    """A vector as a reader writes it: (1, 0, 0), not numpy's (np.float64(1.0), ...)."""
    return "(" + ", ".join(f"{float(v):.4g}" for v in np.asarray(values, dtype=np.float64).ravel()) + ")"
