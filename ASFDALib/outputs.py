"""Where a command may write: never over one of its inputs, and never over a file a session references.

Every command that writes checks its targets here before any long work starts, so a wrong ``--out``
costs one line of error, not a folder of scans.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ASFDALib.atomic import atomic_write_json, remove_scratch
from ASFDALib.errors import ASFDAError

PREDICTIONS_MANIFEST = "asfda_predictions.json"  # the label maps asfda predict wrote into a folder
SESSION_FILE = "session.json"  # what makes a folder an ASFDA session (ASFDALib.adaptation.session writes it)


def _resolved(path: Path | str) -> Path:
    """The path with its links followed; a link that loops (no file to write over) as it is named."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError):  # a symlink loop: RuntimeError up to Python 3.12, OSError from 3.13
        return Path(path).expanduser().absolute()


def path_inside(root: Path, relative: str, record: Path, folder: str, fix: str = "refused") -> Path:
    """``root / relative``, resolved, refusing an absolute path and one that resolves outside ``root`` (``..``, a
    sub-folder linked elsewhere); ``record`` names the file the name came from and ``folder`` what ``root`` is,
    for the refusal. A name written on Windows (``site1\\a.nii.gz``) is read with its backslashes as separators
    where no file has that very name: a folder written there is read on a Linux server."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute() or "\x00" in relative:
        raise ASFDAError(f"{record}: path {relative!r} must be relative to {folder}")
    if "\\" in relative and not (root / relative).exists():
        relative = relative.replace("\\", "/")
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ASFDAError(f"{record}: path {relative!r} points outside {folder}; {fix}")
    return resolved


def session_files(session) -> set[Path]:
    """Every file ``session`` (an :class:`ASFDALib.adaptation.session.Session`) refers to: its pool of
    images, the model it was started with, its label versions and its round checkpoints."""
    files: set[Path] = set()
    data = session.data
    if data.get("images"):
        root = session.image_root
        files |= {_resolved(root / f["name"]) for f in data["images"].get("files", [])}
    if data.get("model"):
        files.add(_resolved(data["model"]["path"]))
    files |= {_resolved(session.root / v["file"]) for versions in data.get("labels", {}).values() for v in versions}
    files |= {_resolved(session.root / r["checkpoint"]) for r in data.get("rounds", []) if r.get("checkpoint")}
    return files


def refuse_overwrite(targets: Iterable[Path], protected: Iterable[Path], what: str, fix: str) -> None:
    """Raise a one-line error naming the first target that is, or holds, a protected file.

    ``what`` names the protected kind ("the input scan", "a file the session references"); ``fix`` says
    what to do instead. A target folder is refused when a protected file lies inside it and the command
    would write a file of the same name there (callers pass the files they will write).
    """
    guarded = {_resolved(p) for p in protected}
    for target in targets:
        resolved = _resolved(target)
        if resolved in guarded:
            raise ASFDAError(f"{target}: would write over {what} {resolved}; {fix}")


def refuse_same_folder(out: Path, inputs: Path, what: str, fix: str) -> None:
    """Refuse an output folder that is the input folder itself (its files would mix with the inputs)."""
    if _resolved(out) == _resolved(inputs):
        raise ASFDAError(f"{out}: is the {what} folder itself; {fix}")


def refuse_folder_holding(folder: Path, protected: Iterable[Path], what: str, fix: str) -> None:
    """Refuse an output folder that holds a protected file (a command that fills a folder with files of
    its own naming, such as a bundle export, could otherwise write over it)."""
    root = _resolved(folder)
    for path in sorted(_resolved(p) for p in protected):
        if path == root or root in path.parents:
            raise ASFDAError(f"{folder}: holds {what} {path}; {fix}")


def is_session_folder(folder: Path | str) -> bool:
    """Whether ``folder`` is an ASFDA session: it holds the session file."""
    return (Path(folder) / SESSION_FILE).is_file()


def session_folder_of(path: Path) -> Path | None:
    """The session folder ``path`` lies in (:func:`is_session_folder`, ``path`` itself or above it)."""
    resolved = _resolved(path)
    return next((folder for folder in (resolved, *resolved.parents) if is_session_folder(folder)), None)


def refuse_inside_session(target: Path, fix: str) -> None:
    """Refuse writing ``target`` into a session folder: every file there is the session's own record."""
    folder = session_folder_of(target if target.is_dir() else target.parent)
    if folder is not None:
        raise ASFDAError(f"{target}: is inside the session folder {folder}, whose files the session keeps; {fix}")


def refuse_folder_as_file(out: Path, example: Path) -> None:
    """Refuse a folder given where a file is written (it could only fail at the end, after the long work)."""
    if Path(out).is_dir():
        raise ASFDAError(f"{out}: is a folder; give --out a file name, e.g. {example}")


def refuse_existing(target: Path, what: str, fix: str) -> None:
    """Refuse an output that already exists (a file, or a folder with files in it): never replace it."""
    path = Path(target)
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise ASFDAError(f"{target}: {what} already exists; {fix}")


PREDICT_LOCK = ".asfda_predict.lock"


def hold_predictions(out: Path):
    """Hold ``out`` for one prediction run, from its claim to its last map (the returned lock: ``release()``
    it): a second run into the same folder (another model's, say) is refused rather than interleaving its maps
    and manifest updates with the first's. An OS lock, released by the OS when its holder ends however it ends."""
    from filelock import FileLock, Timeout

    Path(out).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(Path(out) / PREDICT_LOCK), timeout=0.5, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise ASFDAError(
            f"{out}: another asfda predict is writing into this folder; wait for it to end, or give another --out"
        ) from None
    return lock


def claim_predictions(out: Path, targets: list[Path], fix: str, check_only: bool = False) -> list[Path]:
    """Refuse, naming the first, label maps about to be written over that ``asfda predict`` did not write as
    they are now: a file it never wrote (a folder of reference labels given as ``--out``; a name an earlier run
    claimed but skipped), or one changed since it wrote it (a map corrected in place). Then record the targets
    as predict's own before any is written, so a rerun or a resumed run replaces them. Returns the targets an
    earlier run wrote. Maps are named by their path under ``out`` (``site1/a.nii.gz`` for a recursive pool's)."""
    from ASFDALib.data.volumes import content_hash, discover_volumes, relative_name

    out = Path(out)
    manifest = out / PREDICTIONS_MANIFEST
    try:
        data = json.loads(manifest.read_text()) if manifest.is_file() else {}
        ours = set(data.get("files", []))
        maps = data.get("maps")  # name -> SHA-256 of the map as written; manifests before 2026-12-06 hold none
    except (ValueError, AttributeError, TypeError):
        data, ours, maps = {}, set(), None  # unreadable: nothing there counts as predict's own
    inside = f"the predictions folder {out}"
    for name in sorted(ours | set(maps or {}), key=str):  # no name predict writes leaves the folder (an edited one)
        path_inside(out, name, manifest, inside, f"remove that name from it, or {fix}")
    if maps is None:  # a manifest from before maps were hashed: its files, as they are, count as written so
        maps = {n: content_hash(out / n) for n in ours if (out / n).is_file()}
    names = {relative_name(t, out): t for t in targets}
    # volumes of other names it did not write (a folder of reference labels named case_seg): the maps would mix
    # with them, and evaluate and labels import could no longer tell which is which; in its sub-folders too
    # where maps go there (a recursive pool's)
    nested = any("/" in n for n in (*names, *ours))
    found = discover_volumes(out, recursive=nested) if out.is_dir() else []
    others = sorted(n for n in (relative_name(p, out) for p in found) if n not in ours and n not in names)
    if others:
        before = "" if manifest.is_file() else " (maps an older asfda predict wrote, without a manifest, count too)"
        raise ASFDAError(
            f"{out}: holds {len(others)} volume file(s) asfda predict did not write ({others[0]}, ...){before}, with "
            f"which the maps would mix; {fix}"
        )
    existing = {n: t for n, t in names.items() if t.exists()}
    # the map a run was stopped writing, before its hash was recorded (mark_writing): predict's own, either way
    stopped = data.get("writing")
    foreign = [t for n, t in existing.items() if n != stopped and (n not in ours or n not in maps)]
    if foreign:
        raise ASFDAError(
            f"{foreign[0]}: exists and was not written by asfda predict ({len(foreign)} such file(s) in {out}); {fix}"
        )
    changed = [t for n, t in existing.items() if n != stopped and content_hash(t) != maps[n]]
    if changed:
        raise ASFDAError(
            f"{changed[0]}: was changed since asfda predict wrote it (a corrected map?; {len(changed)} such file(s) "
            f"in {out}); {fix}, or move the changed maps away first"
        )
    if check_only:  # the refusals alone, writing nothing (not even the folder)
        return list(existing.values())
    out.mkdir(parents=True, exist_ok=True)
    for target in (*targets, manifest):  # what a run killed mid-write left (the lock makes them this run's alone)
        remove_scratch(target)
    # the earlier runs' record of which model made their maps stays; record_predictions updates it
    atomic_write_json(manifest, {**data, "files": sorted(ours | set(names)), "maps": maps})
    return list(existing.values())


def mark_writing(out: Path, name: str) -> None:
    """Record in ``out``'s manifest the map about to be written (``name``: its path under ``out``) until
    :func:`record_predictions` records it: a run stopped in between (SIGKILL, a power cut) leaves a map of that
    name, old or new, that the manifest holds no hash of, and a rerun replaces it as predict's own instead of
    refusing it as another's file."""
    manifest = Path(out) / PREDICTIONS_MANIFEST
    data = json.loads(manifest.read_text()) if manifest.is_file() else {}
    atomic_write_json(manifest, data | {"writing": name})


def record_predictions(out: Path, written: Iterable[Path], made_by: dict, made_from: dict[str, str]) -> None:
    """Record in the folder's manifest which model wrote each map of ``written`` (``made_by``: the session,
    source or adapted, the round and the checkpoint's digest), so a folder says what made it after restarts;
    the SHA-256 of each map as written (``maps``), by which a map changed since is never written over; and the
    SHA-256 of the image each map segments (``made_from``, by map name), so that evaluate knows a session's
    training image by its content whatever the file is called. A map's name is its path under ``out``. The
    manifest is made where there is none yet (the panel's Predict remaining writes into a folder of its own,
    without :func:`claim_predictions`)."""
    from ASFDALib.data.volumes import content_hash, relative_name

    manifest = Path(out) / PREDICTIONS_MANIFEST
    data = json.loads(manifest.read_text()) if manifest.is_file() else {}
    names = {relative_name(p, out): Path(p) for p in written}
    data["files"] = sorted({*data.get("files", []), *names})
    data.setdefault("made_by", {}).update(dict.fromkeys(names, made_by))
    data.setdefault("maps", {}).update({n: content_hash(p) for n, p in names.items()})
    data.setdefault("made_from", {}).update(made_from)
    data.pop("writing", None)  # recorded now (mark_writing)
    atomic_write_json(manifest, data)


def unchanged_predictions(paths: Iterable[Path]) -> set[Path]:
    """Those of ``paths`` that are maps ``asfda predict`` wrote, unchanged since: the manifest of the predictions
    folder they lie in (their own folder's, or for a recursive pool's maps one above it) records each map's hash.
    Each manifest is read once, and only the files it names are hashed."""
    from ASFDALib.data.volumes import content_hash, relative_name

    paths = {Path(p): Path(p).absolute() for p in paths}  # each as given (the caller's key), and where it is
    homes = {folder: _predictions_home(folder) for folder in {p.parent for p in paths.values()}}
    maps = {home: _manifest_record(home, "maps") for home in set(homes.values()) if home is not None}
    unchanged = set()
    for given, path in paths.items():
        home = homes[path.parent]
        recorded = maps[home].get(relative_name(path, home)) if home is not None else None
        if recorded and path.is_file() and content_hash(path) == recorded:
            unchanged.add(given)
    return unchanged


def _predictions_home(folder: Path) -> Path | None:
    """The nearest of ``folder`` and the folders above it that holds a predictions manifest, if any."""
    return next((f for f in (folder, *folder.parents) if (f / PREDICTIONS_MANIFEST).is_file()), None)


def nested_predictions(folder: Path) -> bool:
    """Whether a predictions folder's manifest records maps in its sub-folders (``asfda predict --recursive``
    wrote them): evaluate then looks for maps, and their references, in sub-folders too."""
    return any("/" in name for name in _manifest_record(folder, "maps"))


def _manifest_record(folder: Path, key: str) -> dict:
    """One record of a predictions folder's manifest; empty when the folder has no (readable) record of it,
    e.g. maps from another tool or an older asfda."""
    try:
        record = json.loads((Path(folder) / PREDICTIONS_MANIFEST).read_text()).get(key, {})
    except (OSError, ValueError, AttributeError):
        return {}
    return record if isinstance(record, dict) else {}


def predictions_made_by(folder: Path) -> dict[str, dict]:
    """Which model made each map of a predictions folder, as ``record_predictions`` wrote it."""
    return _manifest_record(folder, "made_by")


def predictions_made_from(folder: Path) -> dict[str, str]:
    """Map name -> SHA-256 of the image it segments, as ``record_predictions`` wrote it."""
    return _manifest_record(folder, "made_from")
