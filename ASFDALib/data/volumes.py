"""Finding and reading target volumes: NIfTI, NRRD, MetaImage and DICOM series, to an array + RAS affine.

Every failure becomes a :class:`VolumeError` naming the file, the reason and the fix, so a folder
scan can skip one bad volume and carry on.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ASFDALib.atomic import atomic_write, atomic_write_bytes
from ASFDALib.data.dicom import DICOMDIR, is_dicom_file, read_series
from ASFDALib.errors import ASFDAError, VolumeError
from ASFDALib.outputs import SESSION_FILE, is_session_folder, session_folder_of

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# A volume of a scan pool with at most this many distinct whole values is a label map: one value per structure.
# A scan in integer units has far more (CT in HU thousands, MRI in scanner units hundreds), so none is skipped.
LABEL_MAP_MAX_VALUES = 32
# Where a label map is expected (a label to import, a prediction to score), only more values than this say "an
# intensity image": atlases label over 32 structures (TotalSegmentator 117, FreeSurfer aparc+aseg about 110).
LABEL_FILE_MAX_VALUES = 256
_SAMPLE_VOXELS = 1 << 18  # enough to see a scan's many values; a 512x512x400 CT is 400 times larger
_CHUNK_VOXELS = 1 << 22  # the whole-array confirmation works in chunks of this size: no full-size temporaries
# Sub-folder names datasets give their scans (images, imagesTr, imagesTs of MSD/nnU-Net, scans)
SCAN_FOLDER_NAME = re.compile(r"(images?|scans?)(tr|ts|val)?", re.IGNORECASE)
# How far the no-volumes refusal looks below a folder given without --recursive, only to word its fix (given a
# home folder, a whole-tree walk could take minutes before refusing): folders this deep (a BIDS dataset's
# sub-*/ses-*/anat is 3), at most this many, and no further once volumes are found in more folders than it names
_HINT_DEPTH = 4
_HINT_FOLDERS = 2000
_HINT_NAMED = 3


class NotAScanError(VolumeError):
    """A volume of a scan pool that is a label map (see :func:`looks_like_label_map`); skipped with its reason."""


@dataclass
class Walked:
    """What one walk of a folder found: volumes, the other files it looked at, the ASFDA session folders below
    it that it kept out, and whether it stopped short of the whole tree (``bounded``)."""

    volumes: list[Path]
    others: list[Path]
    sessions: list[Path]
    cut: bool = False


@dataclass
class Volume:
    """A 3D image in voxel order (i, j, k) with the 4x4 voxel-to-RAS (mm) affine it came with."""

    array: np.ndarray
    affine: np.ndarray
    path: Path

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def has_image_suffix(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def _is_dicom_dir(folder: Path, files: list[str]) -> bool:
    return any(is_dicom_file(folder / name) for name in sorted(files)[:3] if not name.startswith("."))


def discover_volumes(folder: Path | str, recursive: bool = False, exclude: Collection[Path] = ()) -> list[Path]:
    """Image files and DICOM series folders under ``folder``, sorted; a DICOM folder counts as one volume.

    Symbolic links to folders are not followed, so a link loop cannot trap the scan. An ASFDA session kept
    below ``folder`` (its label versions and predictions are no scans) is not searched, nor are sub-folders in
    ``exclude`` (the session being made, which holds no session file yet).
    """
    return _walk(folder, recursive, exclude).volumes


def passed_over(folder: Path | str, recursive: bool = False, exclude: Collection[Path] = ()) -> list[Path]:
    """The files :func:`discover_volumes` looks at and takes for no volume (see :func:`discover`)."""
    return discover(folder, recursive, exclude)[1]


def discover(
    folder: Path | str, recursive: bool = False, exclude: Collection[Path] = ()
) -> tuple[list[Path], list[Path]]:
    """In one walk, what :func:`discover_volumes` finds and the files it passes over, each sorted: other types (a
    FreeSurfer .mgz, an Analyze .hdr/.img pair, PNG slices, a zipped series). Not passed over: hidden files and
    those a file browser writes, files of a DICOM folder, the data file a detached header names and a volume's
    sidecars (its name with another type: BIDS .json, .bval, .bvec). An ASFDA session given as the folder itself
    holds no scans, with or without ``recursive`` (its label versions are no scans to rank or segment): nothing is
    found, so the commands' refusal (:func:`no_volumes_message`) names it as a session before any model loads."""
    walked = walk_pool(folder, recursive, exclude)
    return walked.volumes, walked.others


def walk_pool(folder: Path | str, recursive: bool = False, exclude: Collection[Path] = ()) -> Walked:
    """:func:`discover`'s one walk, with the ASFDA sessions below ``folder`` it kept out (``sessions``; a
    recursive walk meets them): a command names them (:func:`kept_out_line`), so a session's files left out of a
    pool are not left out unsaid."""
    if is_session_folder(folder):
        return Walked([], [], [])
    return _discover(folder, recursive, exclude)


def _discover(folder: Path | str, recursive: bool, exclude: Collection[Path], bounded: bool = False) -> Walked:
    """:func:`discover`'s walk with its other files less a volume's sidecars and data files."""
    walked = _walk(folder, recursive, exclude, bounded)
    parts = {data.resolve() for v in walked.volumes for data in _detached_data(v)}
    stems = {(v.parent, _volume_stem(v.name)) for v in walked.volumes}
    walked.others = [
        p for p in walked.others if p.resolve() not in parts and (p.parent, p.name.rsplit(".", 1)[0]) not in stems
    ]
    return walked


def _volume_stem(name: str) -> str:
    return next((name[: -len(s)] for s in IMAGE_SUFFIXES if name.lower().endswith(s)), name)


def relative_name(path: Path | str, root: Path | str) -> str:
    """A file's name under ``root`` as sessions and manifests record it: relative, with ``/`` on every system
    (a recursive pool's ``site1/a.nii.gz``), so that names recorded on one system match on another."""
    return Path(path).relative_to(root).as_posix()


def deeper_series(folder: Path | str, volumes: Collection[Path], exclude: Collection[Path] = ()) -> list[Path]:
    """Direct sub-folders of ``folder`` that hold DICOM series further down, where others among them are series
    themselves (patient folders of a CD export beside series folders): a walk without --recursive finds the
    series one level down only, so these would be left out unsaid. Empty where no sub-folder is a series."""
    root = Path(folder)
    found = {Path(v) for v in volumes}
    if not any(v.is_dir() and v.parent == root for v in found):
        return []
    excluded = {Path(p).resolve() for p in exclude}
    subs = [
        d
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.is_symlink() and not d.name.startswith(".") and d not in found
        if d.resolve() not in excluded and not is_session_folder(d)
    ]
    return [d for d in subs if any(p.is_dir() for p in discover_volumes(d, True, exclude))]


def deeper_series_line(deeper: list[Path], done: str, doing: str) -> str:
    """The line a command says about the series :func:`deeper_series` found it left out (``done``: "ranked",
    "segmented"; ``doing``: "rank", "segment")."""
    named = ", ".join(d.name for d in deeper[:3]) + (f" and {len(deeper) - 3} more" if len(deeper) > 3 else "")
    return f"Not {done}: DICOM series deeper than one sub-folder, in {named}; add --recursive to {doing} them too"


def kept_out_line(folder: Path | str, sessions: list[Path], doing: str) -> str:
    """The line a command says about the ASFDA sessions it met in ``folder`` and left out (``doing``: "rank",
    "segment"): their label versions, predictions and cache are no scans."""
    named = ", ".join(relative_name(s, folder) for s in sessions[:3])
    more = f" and {len(sessions) - 3} more" if len(sessions) > 3 else ""
    return (
        f"Left out {len(sessions)} ASFDA session folder{'s' * (len(sessions) != 1)} in {folder} ({named}{more}): "
        f"their label versions and predictions are no scans to {doing}"
    )


def passed_over_summary(files: list[Path]) -> str:
    """``.mgz 2, .txt 1: e.g. sub1.mgz``: how many files of each type, the most common first, and one of those."""
    by_type: dict[str, list[Path]] = {}
    for path in files:
        suffix = "".join(path.suffixes[-2:]).lower() if path.name.lower().endswith(".gz") else path.suffix.lower()
        by_type.setdefault(suffix or path.name, []).append(path)
    ordered = sorted(by_type.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return ", ".join(f"{s} {len(p)}" for s, p in ordered) + f": e.g. {ordered[0][1][0].name}"


def passed_over_line(folder: Path | str, files: list[Path], doing: str) -> str:
    """The line a command says about the files of ``folder`` it passed over (``doing``: "rank", "import")."""
    return (
        f"Passed over {len(files)} file{'s' * (len(files) != 1)} in {folder} of no volume type "
        f"({passed_over_summary(files)}); to {doing} one of them, convert it to NIfTI, NRRD or MetaImage"
    )


def no_volumes_message(
    folder: Path | str, others: list[Path], recursive: bool, doing: str, exclude: Collection[Path] = ()
) -> str:
    """The one line refusing ``folder`` where :func:`discover` found no volume (``others``: the files it passed
    over; ``doing``: "rank", "segment"): what it looked for, what the folder holds instead, and the fix. An ASFDA
    session, or a dataset folder whose scans are in images/ beside its labels (where --recursive would meet the
    label maps too), is named as such; otherwise the volumes its sub-folders hold where the walk was not
    recursive (a pool of one folder a site, a BIDS dataset's sub-*/anat), and the files of other types."""
    root = Path(folder)
    said = f"{root}: no volumes found (looked for {', '.join(IMAGE_SUFFIXES)} and DICOM folders)"
    if session_folder_of(root) == root.resolve():
        return f"{said}; it is an ASFDA session: give --images the scans' folder"
    if scans := scan_folders(root):
        more = f" (or {', '.join(map(str, scans[1:]))})" if scans[1:] else ""
        return f"{said}; the scans look to be in a sub-folder: give --images {scans[0]}{more}"
    # a short look at the sub-folders (where the command's own walk did not look there, and for the ASFDA
    # sessions a walk keeps out: their label versions and records are no scans to point at), to word the fix
    below = _discover(root, True, exclude, bounded=True)
    others_below = others if recursive else below.others
    sessions = [relative_name(s, root) for s in below.sessions]
    if below.volumes:
        folders = sorted({relative_name(v.parent, root) for v in below.volumes})
        also = f", and files of other types in it ({passed_over_summary(others)})" if others else ""
        if below.cut:  # it stopped at the first few: there may be more than it saw
            where = f"sub-folders such as {', '.join(folders[:_HINT_NAMED])}"
        else:
            more = f" and {len(folders) - _HINT_NAMED} more" if len(folders) > _HINT_NAMED else ""
            where = f"{len(folders)} sub-folder{'s' * (len(folders) != 1)} ({', '.join(folders[:_HINT_NAMED])}{more})"
        return f"{said}; found volumes only in {where}{also}: add --recursive to {doing} them"
    if others_below:  # .mgz, PNG slices: say what was there
        deeper = not recursive and any(p.parent != root for p in others_below)
        return (
            f"{said}; found files of other types only ({passed_over_summary(others_below)}): convert the scans to "
            f"NIfTI, NRRD or MetaImage{' and add --recursive' if deeper else ''}"
        )
    visible = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not visible:
        held = "; it is empty:"
    elif sessions:
        named = ", ".join(sessions[:3]) + (f" and {len(sessions) - 3} more" if len(sessions) > 3 else "")
        held = f"; its sub-folders hold none but ASFDA sessions' files ({named}):"
    elif below.cut and not recursive:  # the short look saw none: the whole walk may yet find some
        held = "; its sub-folders hold none near the top either (add --recursive to search them all), or"
    elif any(p.is_dir() for p in visible):  # --recursive would find nothing there either
        held = "; its sub-folders hold none either:"
    else:  # only what is no file to convert: a BIDS root's metadata, Thumbs.db
        held = ";"
    return f"{said}{held} give --images the folder that holds the scans to {doing}"


def _walk(folder: Path | str, recursive: bool, exclude: Collection[Path], bounded: bool = False) -> Walked:
    """What one walk under ``folder`` finds: the one walk behind :func:`discover`, so what it finds and what it
    passes over cannot disagree on where it looked. ``bounded`` (the no-volumes refusal's look below a folder)
    stops at :data:`_HINT_DEPTH` levels, :data:`_HINT_FOLDERS` folders, or volumes in more than
    :data:`_HINT_NAMED` folders."""
    root = Path(folder)
    if not root.is_dir():
        raise ASFDAError(f"{root}: not a folder (give the folder that holds the volumes)")
    excluded = {Path(p).resolve() for p in exclude}
    walked = Walked([], [], [])
    found, others = walked.volumes, walked.others
    bids = False
    for visited, (current, dirs, files) in enumerate(os.walk(root, followlinks=False)):
        here = Path(current)
        if bounded and (visited == _HINT_FOLDERS or len({v.parent for v in found}) > _HINT_NAMED):
            walked.cut = True
            break
        if here != root and SESSION_FILE in files:  # an ASFDA session kept in the pool: its files are no scans
            walked.sessions.append(here)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in excluded)
        if bounded and dirs and len(here.relative_to(root).parts) == _HINT_DEPTH:
            walked.cut = True
            dirs[:] = []
        if BIDS_DESCRIPTION in files:  # a BIDS dataset: its derived maps (labels), raw sources and code are no scans
            dirs[:] = [d for d in dirs if d not in BIDS_NOT_SCANS]
            bids = True
        if bids:  # its metadata (dataset_description.json, participants.tsv, README) is no scan to convert
            files = [f for f in files if not _bids_metadata(f)]
        if here != root and _is_dicom_dir(here, files):
            found.append(here)
            dirs[:] = []
            continue
        dicom_here = here == root and _is_dicom_dir(here, files)
        for name in sorted(files):
            if name.startswith(".") or name.lower() in OS_FILES or name.lower() == DICOMDIR:
                continue
            if has_image_suffix(here / name):
                found.append(here / name)
            elif not dicom_here:
                others.append(here / name)
        if dicom_here:
            found.append(here)
        if not recursive:
            # Direct sub-folders may still be DICOM series; look only one level down for those.
            for d in dirs:
                sub = here / d
                try:
                    sub_files = [p.name for p in sub.iterdir() if p.is_file()]
                except OSError:
                    continue
                if _is_dicom_dir(sub, sub_files):
                    found.append(sub)
            dirs[:] = []
    walked.volumes, walked.others, walked.sessions = sorted(set(found)), sorted(others), sorted(walked.sessions)
    return walked


def _bids_metadata(name: str) -> bool:
    """A BIDS dataset's metadata file: JSON and TSV tables, its README, CHANGES, LICENSE and CITATION.cff."""
    lower = name.lower()
    return lower.endswith((".json", ".tsv", ".cff")) or lower.split(".")[0] in BIDS_TEXT_FILES


def scan_folders(folder: Path | str, besides: Path | str | None = None) -> list[Path]:
    """Direct sub-folders of ``folder`` named as datasets name their scans (images, imagesTr, imagesTs, ...) that
    hold volumes, other than ``besides``: where to point --images when ``folder`` holds none itself, or holds the
    labels. Unreadable sub-folders are left out: this only words a hint."""
    root, other = Path(folder), Path(besides).resolve() if besides is not None else None
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir() and SCAN_FOLDER_NAME.fullmatch(p.name))
    except OSError:
        return []
    found = []
    for sub in subs:
        try:
            if sub.resolve() != other and discover_volumes(sub):
                found.append(sub)
        except (OSError, ASFDAError):
            continue
    return found


def _distinct_whole(values: np.ndarray, max_values: int) -> np.ndarray | None:
    """The distinct values, or None where one is not a whole number or there are more than ``max_values``."""
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):  # NaN fails too
        return None
    distinct = np.unique(values)
    return distinct if distinct.size <= max_values else None


def looks_like_label_map(array: np.ndarray, max_values: int = LABEL_MAP_MAX_VALUES) -> bool:
    """Whether ``array`` is a label map rather than a scan: whole values only, at most ``max_values`` distinct.

    A constant array is a label map (all background). The rule is decided on a fixed random subsample first, so a
    large CT costs milliseconds: a fractional value or more than ``max_values`` values there settle it. A sample
    that looks like a label map is confirmed over the whole array, a chunk at a time, since a small structure's
    value may be missing from the sample. ``LABEL_MAP_MAX_VALUES`` (32) decides what a scan pool skips;
    ``LABEL_FILE_MAX_VALUES`` (256) what is refused as an intensity image where a label map is expected.
    """
    flat = np.ravel(array, order="K")  # a view for C- or Fortran-ordered arrays (NIfTI reads Fortran-ordered)
    if flat.dtype.kind == "b":
        return True
    if flat.dtype.kind not in "iuf" or flat.size == 0:
        return False
    if flat.size <= _SAMPLE_VOXELS:
        return _distinct_whole(flat, max_values) is not None
    picks = np.random.default_rng(0).integers(0, flat.size, _SAMPLE_VOXELS)
    seen = _distinct_whole(flat[picks], max_values)
    if seen is None:
        return False
    seen = seen.astype(np.int64)  # whole values: integer comparisons are several times faster than float ones
    for start in range(0, flat.size, _CHUNK_VOXELS):
        chunk = flat[start : start + _CHUNK_VOXELS]
        if chunk.dtype.kind == "f":
            if not np.array_equal(chunk, np.round(chunk)):  # NaN fails too
                return False
            chunk = chunk.astype(np.int64)
        new = chunk[~np.isin(chunk, seen)]
        if new.size:
            seen = np.unique(np.concatenate([seen, new]))
            if seen.size > max_values:
                return False
    return True


# A BIDS dataset's root (and a derivative dataset's) holds its description; the folders the BIDS specification
# keeps for what is not its scans: derivatives/<pipeline>/ (segmentations: the labels), sourcedata/ (the DICOM
# converted from), code/
BIDS_DESCRIPTION = "dataset_description.json"
BIDS_NOT_SCANS = frozenset({"derivatives", "sourcedata", "code"})
BIDS_TEXT_FILES = frozenset({"readme", "changes", "license"})
OS_FILES = frozenset({"thumbs.db", "desktop.ini"})  # what Windows Explorer writes into a folder it shows


def _series_files(folder: Path) -> list[Path]:
    """A DICOM folder's files, without the hidden ones and those a file browser writes (.DS_Store, Thumbs.db):
    opening the folder in Finder or Explorer changes no scan."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.lower() not in OS_FILES
    )


def _detached_data(header: Path) -> list[Path]:
    """The data file a detached header (.mhd, .nhdr) names beside it, where it exists: a scan replaced there
    changes its content, not its header."""
    if not header.name.lower().endswith((".mhd", ".nhdr")):
        return []
    try:
        lines = header.read_text(encoding="latin-1", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        key, sep, value = line.partition("=" if header.name.lower().endswith(".mhd") else ":")
        if sep and key.strip().lower().replace(" ", "") in ("elementdatafile", "datafile"):
            data = header.parent / value.strip()
            return [data] if value.strip() and data.is_file() else []
    return []


def content_hash(path: Path | str) -> str:
    """SHA-256 of a file's bytes (with the data file of a detached header), or of every file (name and bytes)
    of a DICOM folder's series."""
    path = Path(path)
    digest = hashlib.sha256()
    files = _series_files(path) if path.is_dir() else [path, *_detached_data(path)]
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def content_stamp(path: Path | str) -> list[int]:
    """Size and modification time of a file (a DICOM folder: its series' file count and newest modification):
    while they hold, its content_hash is taken to hold too, so a check need not read the bytes again."""
    path = Path(path)
    if path.is_dir():
        files = _series_files(path)
        return [len(files), max((f.stat().st_mtime_ns for f in files), default=0)]
    stats = [f.stat() for f in (path, *_detached_data(path))]
    return [sum(st.st_size for st in stats), max(st.st_mtime_ns for st in stats)]


def content_record(path: Path | str) -> dict[str, Any]:
    """What identifies a scan's content later: its hash and its stamp."""
    return {"sha256": content_hash(path), "stamp": content_stamp(path)}


def content_changed(path: Path | str, sha256: str, stamp: list[int] | None) -> bool:
    """Whether ``path`` no longer holds the content recorded as ``sha256`` (at ``stamp``): the bytes are read
    again only where the stamp moved."""
    return stamp != content_stamp(path) and content_hash(path) != sha256


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:

    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)


def _sitk_to_ras(image) -> tuple[np.ndarray, np.ndarray]:

    if image.GetDimension() != 3:
        array = sitk.GetArrayFromImage(image)
        return array.T, np.eye(4)
    array = sitk.GetArrayFromImage(image)  # (k, j, i) [, components]
    array = np.moveaxis(array, (0, 1, 2), (2, 1, 0)) if array.ndim == 3 else array.transpose(2, 1, 0, 3)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.ascontiguousarray(array), _LPS_TO_RAS @ lps


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    return _sitk_to_ras(read_series(folder, _series_files(folder)))


def read_components(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An ITK-readable file's voxels as (i, j, k[, component]) with its RAS affine, components kept (a Slicer
    segmentation's layers); :func:`read_volume` is the checked 3D reader."""
    return _read_itk(Path(path))


def header_fields(path: Path) -> dict[str, str]:
    """An ITK-readable file's header key/value fields (NRRD's ``key:=value`` lines), read without its voxels."""

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:

    return _sitk_to_ras(sitk.ReadImage(str(path)))


def _reader_detail(exc: Exception) -> str:
    """What a reader said went wrong, in one line: ITK's messages start at its source location and end at the
    cause ("... itkNrrdImageIO.cxx:410:" ... "[nrrd] _nrrdReadNrrdParse_sizes: parsed 2 values, but dimension
    is 3"), so theirs is the last line; other readers' the first."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if lines[0].startswith("Exception thrown in") else lines[0]


def validate_array(array: np.ndarray, path: Path, allow_constant: bool = False) -> np.ndarray:
    """Squeeze trailing singleton axes and check the array is a finite 3D volume, non-constant unless
    ``allow_constant`` (an all-background label map is legitimate; a constant image is not)."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.size == 0:
        raise VolumeError(path, "image has no voxels", "re-export the volume")
    if array.ndim < 3 or min(array.shape[:3]) < 2:
        raise VolumeError(path, f"2D image of shape {array.shape}", "ASFDA scores 3D volumes; give the whole series")
    if array.ndim > 3:
        raise VolumeError(
            path,
            f"{array.ndim}D image of shape {array.shape}",
            "split it into 3D volumes (one time point or channel each)",
        )
    if array.dtype.kind not in "biuf":
        raise VolumeError(path, f"unsupported voxel type {array.dtype}", "convert to an integer or float image")
    if array.dtype.kind == "f":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise VolumeError(path, f"{bad} NaN/Inf voxels", "replace them (e.g. with the background value)")
    if not allow_constant and array.min() == array.max():
        raise VolumeError(path, f"constant image (every voxel is {array.min()})", "check the export")
    return array


def holds_label_maps(volumes: list[Path]) -> bool:
    """Whether a folder's volumes (``discover_volumes``) are label maps, judged by its first readable one: a
    clinician's labels folder given where scans or a session go."""
    for path in volumes[:3]:
        try:
            return looks_like_label_map(read_volume(path, allow_constant=True).array)
        except VolumeError:
            continue
    return False


def read_volume(path: Path | str, allow_constant: bool = False) -> Volume:
    """Read one volume to an (i, j, k) array with its RAS affine, or raise :class:`VolumeError`.

    ``allow_constant`` accepts a constant array, as label maps may be.
    """
    path = Path(path)
    try:
        if path.is_dir():
            array, affine = _read_dicom_series(path)
        else:
            if path.stat().st_size == 0:
                raise VolumeError(path, "empty file (0 bytes)", "copy the file again")
            name = path.name.lower()
            if name.endswith((".nii", ".nii.gz")):
                array, affine = _read_nifti(path)
            elif name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
                array, affine = _read_itk(path)
            else:
                raise VolumeError(path, "unknown file type", f"supported: {', '.join(IMAGE_SUFFIXES)}, DICOM folders")
            array = np.asarray(array)
    except VolumeError:
        raise
    except PermissionError:
        raise VolumeError(path, "permission denied", "make the file readable by this user") from None
    except MemoryError:
        raise VolumeError(path, "volume does not fit in memory", "crop or downsample it first") from None
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable file
        detail = _reader_detail(exc)
        raise VolumeError(path, f"unreadable or corrupt ({detail[:160]})", "re-export or re-copy the file") from None
    array = validate_array(array, path, allow_constant)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(path, "invalid geometry (singular or non-finite affine)", "fix the header spacing/direction")
    return Volume(array=array, affine=affine, path=path)


def read_scan(path: Path | str) -> Volume:
    """:func:`read_volume` for a volume of a scan pool (ranking, source statistics, pseudo-labels): a label map
    there is refused with a :class:`NotAScanError`, so a folder scan skips it with its reason like an unreadable
    file, and a run on a labels folder does not rank label maps as scans."""
    volume = read_volume(path)
    if looks_like_label_map(volume.array):
        values = np.unique(volume.array)
        raise NotAScanError(
            path,
            f"looks like a label map, not a scan ({values.size} distinct whole values, {values[0]:g} to "
            f"{values[-1]:g})",
            "give --images the scans' folder, e.g. images/ rather than labels/",
        )
    return volume


def nifti_bytes(array: np.ndarray, affine: np.ndarray, gzipped: bool = True) -> bytes:
    """The bytes :func:`write_nifti` writes: the same array gives the same bytes (gzip without a time stamp), so
    their hash says before any write whether a file already holds them."""
    if array.dtype == np.int64:  # NIfTI readers widely reject int64; label maps fit in int32
        array = array.astype(np.int32)
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    data = image.to_bytes()
    return gzip.compress(data, compresslevel=6, mtime=0) if gzipped else data


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write an (i, j, k) array with a RAS affine as NIfTI (gzipped for ``.nii.gz``), atomically."""
    return atomic_write_bytes(Path(path), nifti_bytes(array, affine, Path(path).name.lower().endswith(".gz")))


def write_volume(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write in the format the name asks for: NIfTI, or NRRD/MetaImage through SimpleITK (LPS on disk)."""
    path = Path(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        return write_nifti(path, array, affine)

    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    suffix = ".nrrd" if path.name.lower().endswith((".nrrd", ".nhdr")) else ".mha"

    def write(tmp: Path) -> None:
        # SimpleITK picks its writer by the suffix, so it writes a name of its own beside atomic_write's, which
        # removes only its own on a failure: this one goes too, whatever stops the write (Ctrl-C, a full disk)
        staged = tmp.with_name(tmp.name + suffix)
        try:
            sitk.WriteImage(image, str(staged), useCompression=True)
            os.replace(staged, tmp)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise

    return atomic_write(path.with_suffix(suffix) if path.suffix.lower() in (".nhdr", ".mhd") else path, write)
