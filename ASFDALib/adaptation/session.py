"""The session folder: the unit users keep for one adaptation project.

``session.json`` (schema-versioned, written atomically) records the model, the image pool with content
hashes, the strategy, every round's query, the label files and checkpoints. Labels live under
``labels/`` as versioned NIfTI and are never overwritten. Paths stored in the file are relative to the
session folder and are resolved so that none can escape it (``..``, absolute paths, symlinks). A lock
file keeps two processes from writing one session.

The lock is :mod:`filelock`'s, so the module loads where ``fcntl`` does not exist (Windows): an OS lock
(``flock`` on Unix, ``msvcrt.locking`` on Windows) that the OS releases when its holder dies, so a killed
writer's lock is reclaimed by the next one. Where neither exists filelock falls back to a lock file that
records the holder's pid and host and is reclaimed when that pid is gone on the same host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from filelock import FileLock, Timeout

from ASFDALib.atomic import atomic_write_json, atomic_write_text
from ASFDALib.errors import ASFDAError, as_arg
from ASFDALib.outputs import SESSION_FILE, is_session_folder, path_inside

SCHEMA_VERSION = 1
LOCK_FILE = ".asfda.lock"
# Who holds the lock, beside the lock file: a Windows lock makes the locked file unreadable to others, and
# the soft-lock fallback owns the lock file's content.
HOLDER_FILE = ".asfda.lock.holder"


# what a rank writes at the top of the session folder, in the order it writes them: ranking.json first, so a rank
# stopped before it finished them leaves a ranking.json of its own whenever any of them is new
RANKING_FILES = ("ranking.json", "ranking.csv", "ranking.png")


# a label version's file as next_label_path names it: <case stem>.v<N>.nii.gz
LABEL_VERSION = re.compile(r"(.+)\.v\d+\.nii\.gz")


class SessionError(ASFDAError):
    """The session folder or its file cannot be used as it is."""


def _restore_hint(path: Path) -> str:
    """The fix for a session file that cannot be read: the version before its last change, where one is kept."""
    backup = path.with_name(SESSION_FILE + ".bak")
    if backup.is_file():
        try:  # when that version was saved: work recorded after it (a fine-tune's end) is not in it
            saved = f", saved {json.loads(backup.read_text(encoding='utf-8'))['updated']}"
        except (OSError, ValueError, KeyError, TypeError):
            saved = ""
        return f"restore it from {backup.name} (the version before its last change{saved})"
    return "no earlier version is kept (session.json.bak); rank the pool into a new session (asfda rank --out NEW)"


def _how_to_make(root: Path) -> str:
    """The fix for a folder that is no session: a folder of scans (or a dataset's, with images/) is ranked into
    one; otherwise a session is the folder 'asfda rank --out' made."""
    from ASFDALib.data.volumes import discover_volumes, holds_label_maps

    if (root / "configs").is_dir() and (root / "models").is_dir():
        return "it is a MONAI bundle (a model), not a session: give the folder 'asfda rank --out' made"
    scans = next((f for f in (root / "images", root) if f.is_dir() and discover_volumes(f)), None)
    if scans is not None:
        if holds_label_maps(discover_volumes(scans)):  # a clinician's labels are no scans to rank
            return (
                "it holds label maps: give the session folder ('asfda rank --out' made it); labels come in with "
                f"'asfda labels import SESSION --from {as_arg(scans)}'"
            )
        return f"it holds scans: rank them into a session first, 'asfda rank --images {as_arg(scans)} --out SESSION'"
    return f"give the folder 'asfda rank --out' made, or make one: 'asfda rank --images SCANS --out {as_arg(root)}'"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _posix_names(data: dict[str, Any]) -> dict[str, Any]:
    """A session whose recursive pool was ranked on Windows before names were recorded with ``/``
    (``site1\\a.nii.gz``): its pool's names, wherever the session records them (labels, queries, rounds), as
    every system names them now (``site1/a.nii.gz``). Only strings that are such a name change."""
    images = data.get("images") or {}
    names = {f.get("name") for f in images.get("files", []) if isinstance(f, dict)} | set(data.get("labels") or {})
    old = {n for n in names if isinstance(n, str) and "\\" in n}
    if not old or not images.get("recursive"):
        return data

    def posix(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("\\", "/") if value in old else value
        if isinstance(value, list):
            return [posix(v) for v in value]
        if isinstance(value, dict):
            return {posix(k): posix(v) for k, v in value.items()}
        return value

    return posix(data)


def safe_path(root: Path, relative: str) -> Path:
    """``root / relative``, refusing absolute paths and anything that resolves outside ``root``. A session
    records its paths with ``/``; one written on Windows before that (``labels\\a_v1.nii.gz``) is read with its
    backslashes as separators where no file has that very name: a clinician's session trains on a Linux server."""
    try:
        return path_inside(root, relative, root / SESSION_FILE, "the session folder")
    except ASFDAError as exc:
        raise SessionError(str(exc)) from None


def _without_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_id(name: str) -> str:
    """A file-system-safe identifier for an image (its name without image suffixes): letters of any script
    (composed, as macOS's decomposed "Mu\u0308ller" is the same name as "Müller"), digits and ``._-`` kept,
    anything else (spaces, a recursive pool's folder separators) as ``_``. Used to pair files by name;
    :func:`storage_stems` are what stored files are named by."""
    stem = unicodedata.normalize("NFC", _without_suffix(name))
    return re.sub(r"[^\w.-]+", "_", stem).strip("._") or "case"


def ascii_case_id(name: str) -> str:
    """The case id of sessions before 2026-12-06 (ASCII letters only: "Müller" was "M_ller"), by which
    their stored pseudo-labels are still found."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", _without_suffix(name)).strip("._") or "case"


def storage_stems(names: Iterable[str]) -> dict[str, str]:
    """The stem each image's stored files (labels, pseudo-labels, predictions) are named by: its
    :func:`case_id`, with a short hash of the name added where another image of ``names`` (the pool) has the
    same case id ("a b" and "a_b", "PAT08/scan" and "PAT08_scan"), so two images never share a stored file,
    nor look like two versions of one case."""
    ids = {name: case_id(name) for name in names}
    taken = Counter(ids.values())
    return {
        name: stem if taken[stem] == 1 else f"{stem}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"
        for name, stem in ids.items()
    }


@dataclass
class Session:
    """An open session folder; use :meth:`open` (and ``with`` to hold the write lock)."""

    root: Path
    data: dict[str, Any] = field(default_factory=dict)
    _lock_handle: Any = None

    # --- opening and locking -----------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path | str, create: bool = False) -> Session:
        """The session in ``root`` as its file holds it now (a new, unsaved one with ``create``). Reading
        needs no lock; to write, hold it (``with session:``), which reads the file again once it is held, so
        nothing another process saved in between is lost (and a change made to ``data`` before is replaced:
        take the lock first, then change and save)."""
        root = Path(root)
        path = root / SESSION_FILE
        if not path.is_file():
            stripped = root.with_name(root.name.strip()) if root.name.strip() else root
            if not create and stripped != root and is_session_folder(stripped):  # a path pasted with a space
                raise SessionError(f"{as_arg(root)}: not an ASFDA session, but {as_arg(stripped)} is: give that")
            if not create:
                raise SessionError(f"{root}: not an ASFDA session (no {SESSION_FILE}); {_how_to_make(root)}")
            root.mkdir(parents=True, exist_ok=True)
            return cls(root, cls._new_data())
        return cls(root, cls._read(path))

    @classmethod
    def _read(cls, path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SessionError(f"{path}: unreadable session file ({exc}); {_restore_hint(path)}") from None
        cls._validate(data, path)
        return _posix_names(data)

    @staticmethod
    def _new_data() -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "created": now(),
            "updated": now(),
            "model": None,
            "images": None,
            "strategy": None,
            "rounds": [],
            "labels": {},
        }

    @staticmethod
    def _validate(data: Any, path: Path) -> None:
        if not isinstance(data, dict):
            raise SessionError(f"{path}: the session file must hold a JSON object; {_restore_hint(path)}")
        schema = data.get("schema")
        if schema is None:
            raise SessionError(f"{path}: no 'schema' version (edited by hand?); {_restore_hint(path)}")
        if schema != SCHEMA_VERSION:
            raise SessionError(
                f"{path}: schema version {schema!r}, this ASFDA reads version {SCHEMA_VERSION}; use the ASFDA "
                "version that wrote it"
            )
        expected = {"rounds": list, "labels": dict}
        for key, kind in expected.items():
            if not isinstance(data.get(key), kind):
                raise SessionError(f"{path}: '{key}' must be a {kind.__name__}; {_restore_hint(path)}")
        # the model and pool a rank records, whole: a part missing would fail later as a KeyError
        for key, fields in {"model": ("path", "digest", "card"), "images": ("root", "files")}.items():
            entry = data.get(key)
            lost = [f for f in fields if f not in entry] if isinstance(entry, dict) else []
            if lost:
                raise SessionError(f"{path}: '{key}.{lost[0]}' is missing (edited by hand?); {_restore_hint(path)}")
        for round_ in data["rounds"]:
            if not isinstance(round_, dict) or "index" not in round_ or not isinstance(round_.get("query"), list):
                raise SessionError(
                    f"{path}: a round without its 'index' or its 'query' list (edited by hand?); {_restore_hint(path)}"
                )
        # a session that has ranked without its model or pool record: a command would fail on it, or rank the
        # built-in model or the sample pool and record it as the session's
        lost = [key for key in ("model", "images") if data["rounds"] and not data.get(key)]
        if lost:
            raise SessionError(f"{path}: '{lost[0]}' is missing (edited by hand?); {_restore_hint(path)}")
        for name, versions in data["labels"].items():
            if not isinstance(versions, list) or not all(isinstance(v, dict) and "file" in v for v in versions):
                raise SessionError(
                    f"{path}: labels of {name!r} must be a list of {{'file': ...}} entries; {_restore_hint(path)}"
                )

    def lock(self) -> Session:
        """Take the write lock (waiting at most a second); a clear error when another process holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        # thread_local=False: the panel may take the lock on one thread and release it on another.
        # a second's grace: a status command's probe (in_use) holds the lock for an instant, never longer
        handle = FileLock(str(self.root / LOCK_FILE), timeout=1.0, thread_local=False)
        try:
            handle.acquire()
        except Timeout:
            holder = self._lock_holder()
            if holder.startswith(f"pid {os.getpid()} on {socket.gethostname()} "):  # a notebook's earlier cell
                raise SessionError(
                    f"{self.root}: session is held by another Session object of this very process ({holder}): "
                    "an earlier notebook cell's (leave its 'with' block, or call its unlock(), first) or a job of "
                    "this program still running (wait for it)"
                ) from None
            raise SessionError(
                f"{self.root}: session is in use by {holder}; wait for it to finish or stop it"
            ) from None
        try:
            atomic_write_text(self.root / HOLDER_FILE, f"pid {os.getpid()} on {socket.gethostname()} since {now()}")
        except BaseException:
            handle.release()
            raise
        self._lock_handle = handle
        try:
            if is_session_folder(self.root):  # what another writer saved since this object read it
                self.data = self._read(self.root / SESSION_FILE)
        except BaseException:
            self.unlock()
            raise
        self._clear_scratch()
        return self

    @contextmanager
    def held(self) -> Iterator[Session]:
        """The write lock for a block of work: taken here unless this object holds it already, or this is a
        torchrun worker other than rank 0 (rank 0 holds it for the job, and only rank 0 writes)."""
        if self._lock_handle is not None or os.environ.get("RANK", "0") != "0":
            yield self
            return
        with self:
            yield self

    def in_use(self) -> str:
        """Who holds the session's write lock ("pid N on HOST since T"), or "" when nobody else does: a probe
        that takes and drops the lock, so a holder that died (the OS released its lock) counts as nobody."""
        # a torchrun worker other than rank 0 does not probe: rank 0 holds the lock for the job, or probes it
        if self._lock_handle is not None or os.environ.get("RANK", "0") != "0":
            return ""
        probe = FileLock(str(self.root / LOCK_FILE), timeout=0, thread_local=False)
        try:
            probe.acquire()
        except Timeout:
            holder = self._lock_holder()
            ours = f"pid {os.getpid()} on {socket.gethostname()} "
            return "" if holder.startswith(ours) else holder  # another Session object of this process
        except OSError:  # a folder this user cannot write: nobody can train in it either
            return ""
        probe.release()
        return ""

    def _lock_holder(self) -> str:
        try:
            return (self.root / HOLDER_FILE).read_text(encoding="utf-8").strip() or "another process"
        except OSError:  # not written yet, or being replaced (Windows)
            return "another process"

    def _clear_scratch(self) -> None:
        """Remove scratch files of writers killed mid-write. With the lock held nobody else writes the
        session, its labels or checkpoints; the score cache may be shared with other ranks of a torchrun
        job, so there only scratch files older than an hour go (a live write takes milliseconds)."""
        for pattern in (".*.tmp", "labels/.*.tmp", "checkpoints/**/.*.tmp"):
            for scratch in self.root.glob(pattern):
                scratch.unlink(missing_ok=True)
        stale = time.time() - 3600
        for scratch in self.root.glob("cache/.*.tmp"):
            try:
                if scratch.stat().st_mtime < stale:
                    scratch.unlink()
            except FileNotFoundError:
                pass

    def unlock(self) -> None:
        if self._lock_handle is not None:
            # The holder record goes first, while the lock still keeps the next writer from writing its own.
            (self.root / HOLDER_FILE).unlink(missing_ok=True)
            self._lock_handle.release()
            self._lock_handle = None

    def __enter__(self) -> Session:
        return self.lock()

    def __exit__(self, *exc) -> None:
        self.unlock()

    # --- saving ------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write session.json atomically, keeping the previous version as session.json.bak."""
        self.data["updated"] = now()
        path = self.root / SESSION_FILE
        if path.is_file():
            atomic_write_json(self.root / (SESSION_FILE + ".bak"), json.loads(path.read_text(encoding="utf-8")))
        return atomic_write_json(path, self.data)

    def path(self, relative: str) -> Path:
        return safe_path(self.root, relative)

    def relative(self, path: Path) -> str:
        # with / on every system: the session opens on another (labelled on Windows, trained on Linux)
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    # --- model, images, rounds ---------------------------------------------------------------------
    def set_model(
        self, path: Path, digest: str, kind: str, card: dict[str, Any], trust: bool, extra: dict[str, Any] | None = None
    ) -> None:
        """``extra``: more of what rebuilds the model (network, class map) and what its loading reported."""
        self.data["model"] = {
            "path": str(Path(path).resolve()),
            "digest": digest,
            "kind": kind,
            "card": card,
            "trust": trust,
            **(extra or {}),
        }

    def set_images(self, root: Path, files: dict[str, str], recursive: bool, unreadable: Iterable[str] = ()) -> None:
        """The pool: every file found (``files``: name -> SHA-256) and those of them ranking could not read."""
        self.data["images"] = {
            "recursive": recursive,
            "files": [{"name": n, "sha256": h} for n, h in sorted(files.items())],
            "unreadable": sorted(unreadable),
        }
        self.move_images(root)

    def move_images(self, root: Path) -> None:
        """Record where the pool is: its absolute path, and where it lies inside the session folder (sample_data,
        the built-in pool) that path relative to it, which the session keeps when the folder is moved or copied."""
        root = Path(root).resolve()
        self.data["images"]["root"] = str(root)
        self.data["images"].pop("in_session", None)
        if root.is_relative_to(self.root.resolve()):
            self.data["images"]["in_session"] = root.relative_to(self.root.resolve()).as_posix()

    def unreadable_images(self) -> set[str]:
        """The pool's files its last ranking could not read (empty, 4D, corrupt): no pseudo-label can come of them."""
        return set((self.data.get("images") or {}).get("unreadable", []))

    @property
    def image_root(self) -> Path:
        if not self.data.get("images"):
            raise SessionError(
                f"{self.root}: no image folder recorded; run 'asfda rank --images DIR --out {as_arg(self.root)}'"
            )
        inside = self.data["images"].get("in_session")
        return self.path(inside) if inside is not None else Path(self.data["images"]["root"])

    def image_path(self, name: str) -> Path:
        """An image of the pool by its recorded name; it must stay inside the recorded image folder."""
        return safe_path(self.image_root, name)

    def image_names(self) -> list[str]:
        return [f["name"] for f in (self.data.get("images") or {}).get("files", [])]

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.data["rounds"]

    def add_round(self, query: list[str], strategy: dict[str, Any], model_digest: str) -> dict[str, Any]:
        entry = {
            "index": len(self.rounds) + 1,
            "created": now(),
            "query": list(query),
            "strategy": strategy,
            "model_digest": model_digest,
            "checkpoint": None,
            "metrics": {},
        }
        self.rounds.append(entry)
        return entry

    def queried(self) -> list[str]:
        names: list[str] = []
        for entry in self.rounds:
            names += [n for n in entry["query"] if n not in names]
        return names

    def adapted_round(self) -> dict[str, Any] | None:
        """The newest round whose fine-tuned weights are on disk, if any."""
        for entry in reversed(self.rounds):
            if entry.get("checkpoint") and self.path(entry["checkpoint"]).is_file():
                return entry
        return None

    def adapted_checkpoint(self) -> Path | None:
        """The newest fine-tuned weights, if any round has them."""
        entry = self.adapted_round()
        return self.path(entry["checkpoint"]) if entry else None

    # --- labels ------------------------------------------------------------------------------------
    def missing_label_files(self) -> dict[str, Path]:
        """Image name -> its newest recorded label file, where that file is gone from disk (deleted or moved
        by hand): training without it, or on an older version, would not be what the session records."""
        out = {}
        for name, versions in self.data["labels"].items():
            if versions and not self.path(versions[-1]["file"]).is_file():
                out[name] = self.path(versions[-1]["file"])
        return out

    def refuse_missing_labels(self) -> None:
        """Refuse, naming the first, newest label files the session records that are gone from disk."""
        missing = self.missing_label_files()
        if missing:
            name, path = next(iter(sorted(missing.items())))
            raise SessionError(
                f"{path}: {name}'s label, recorded in {SESSION_FILE}, is missing ({len(missing)} such file(s)); "
                f"restore it, or import the label again: 'asfda labels import {as_arg(self.root)} --from DIR "
                f"--cases {as_arg(name)}'"
            )

    def labelled(self) -> dict[str, Path]:
        """Image name -> newest label file, for every image that has one on disk."""
        return {name: self.path(entry["file"]) for name, entry in self.label_versions().items()}

    def label_versions(self) -> dict[str, dict]:
        """Image name -> the session.json entry (file, sha256, source) of its newest label file on disk."""
        out = {}
        for name, versions in self.data["labels"].items():
            for entry in reversed(versions):
                if self.path(entry["file"]).is_file():
                    out[name] = entry
                    break
        return out

    def labelled_images(self) -> dict[str, dict]:
        """Image name -> what is known of the image its newest label was drawn on: ``sha256`` (recorded with the
        label, or, for labels recorded before that was kept, the pool's at its last rank) and, where recorded,
        its ``stamp`` (volumes.content_stamp) then."""
        pool = {f["name"]: f["sha256"] for f in (self.data.get("images") or {}).get("files", [])}
        return {
            name: {"sha256": entry.get("image_sha256") or pool.get(name), "stamp": entry.get("image_stamp")}
            for name, entry in self.label_versions().items()
        }

    def image_changes(self) -> dict[str, bool]:
        """The labelled volumes whose image no longer holds what was labelled, each True where it is gone (the pool
        moved, or the scan left it), False where it changed (by its hash, read again only where its size or
        modification time moved). A label drawn on other voxels than the image now holds would teach the wrong
        anatomy."""
        from ASFDALib.data.volumes import content_changed

        changes = {}
        for name, known in sorted(self.labelled_images().items()):
            path = self.image_path(name)
            if not path.exists():
                changes[name] = True
            elif known["sha256"] and content_changed(path, known["sha256"], known["stamp"]):
                changes[name] = False
        return changes

    def describe_image_changes(self, changes: dict[str, bool]) -> str:
        """``image_changes`` as one clause a message can hold."""
        return "; ".join(
            f"{name} is gone from {self.image_root}"
            if gone
            else f"{name} in {self.image_root} changed since it was labelled"
            for name, gone in changes.items()
        )

    def refuse_image_changes(self) -> None:
        """Refuse, in one line naming the volumes and the fixes, where a labelled volume's image changed."""
        if not (changes := self.image_changes()):
            return
        said = self.describe_image_changes(changes)
        if any(changes.values()):  # the pool moved, or scans left it
            raise SessionError(
                f"{self.root}: {said}; move the pool back to {self.image_root}, or name where it is now with "
                "--images NEW_FOLDER (asfda finetune and asfda rank take it)"
            )
        raise SessionError(
            f"{self.root}: {said}; put the scan back as it was labelled, import a label drawn on it as it is now "
            f"('asfda labels import {as_arg(self.root)} --from FILE --cases NAME'), or rank the pool as it is now "
            "into a new session (--out NEW)"
        )

    def _label_files(self) -> tuple[set[str], set[str]]:
        """The names of the label files session.json records (every image's: a version recorded under an older stem
        scheme keeps its name; ``\\`` as written on Windows) and those in labels/."""
        folder = self.root / "labels"
        recorded = {PurePosixPath(v["file"].replace("\\", "/")).name for vs in self.data["labels"].values() for v in vs}
        return recorded, {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def next_label_path(self, name: str, suffix: str = ".nii.gz") -> Path:
        """labels/<case>.v<N><suffix> with N one past every version on disk or recorded: never overwrites (a file
        no version records may be a label someone still needs: a session.json restored from its .bak forgets the
        versions saved after it)."""
        (self.root / "labels").mkdir(parents=True, exist_ok=True)
        stem = storage_stems({*self.image_names(), name})[name]
        taken = set().union(*self._label_files())
        version = 1
        while any(t.startswith(f"{stem}.v{version}.") for t in taken):  # a .seg.nrrd companion takes its number
            version += 1
        return self.root / "labels" / f"{stem}.v{version}{suffix}"

    def unrecorded_labels(self, name: str | None = None) -> list[Path]:
        """The label files in labels/ that no version records, of case ``name`` or of every case: what a label write
        stopped before its record left (Ctrl-C or a kill between an import's label files and its one save of
        session.json), or versions a session.json restored from its .bak forgets. Kept, never written over."""
        stems = storage_stems({*self.image_names(), *([name] if name else [])})
        wanted = {stems[name]} if name else set(stems.values())
        recorded, on_disk = self._label_files()
        versions = (LABEL_VERSION.fullmatch(n) for n in sorted(on_disk - recorded))
        return [self.root / "labels" / m[0] for m in versions if m and m[1] in wanted]

    def record_label(
        self,
        name: str,
        path: Path,
        sha256: str,
        source: str,
        mapping: dict | None = None,
        source_sha256: str | None = None,
        image_sha256: str | None = None,
        image_stamp: list[int] | None = None,
    ) -> None:
        """Add a label version; ``mapping`` is how the source file's values became class indices, when not 1:1;
        ``source_sha256`` the hash of the file it was imported from, by which evaluate knows that file again;
        ``image_sha256`` the hash of the image it was drawn on and ``image_stamp`` its size and time then
        (``image_changes`` compares with them)."""
        entry = {"file": self.relative(path), "sha256": sha256, "created": now(), "source": source}
        if image_sha256:
            entry["image_sha256"] = image_sha256
        if image_stamp:
            entry["image_stamp"] = image_stamp
        if mapping:
            entry["map"] = mapping
        if source_sha256:
            entry["source_sha256"] = source_sha256
        self.data["labels"].setdefault(name, []).append(entry)


def unrecorded_query(root: Path | str, session: Session | None = None) -> list[str] | None:
    """The query shown by the ranking files at the top of session folder ``root`` where session.json does not record
    it, or None where they are the session's own (or there are none). A rank writes them just before it saves
    session.json, so one stopped in between (Ctrl-C, a kill) leaves them ahead of the session: the same rank command
    goes on from them and records their query; until then it is no round's. A first rank's are known by the
    session's lock file beside them (only a rank into this very folder makes it; [] where no ranking.json names the
    picks); a later one's by a ranking.json whose picks the session's last round does not end with (a round records
    a rank's picks after what a re-rank kept of its query, labelled already). ``session``: the one open on ``root``,
    read from its file where not given; a session file that cannot be read has no query to compare with (None):
    the commands refuse it themselves."""
    root = Path(root)
    if not any((root / name).is_file() for name in RANKING_FILES):
        return None
    try:
        shown = json.loads((root / "ranking.json").read_text(encoding="utf-8"))["selected"]
    except (OSError, ValueError, KeyError, TypeError):
        shown = None
    shown = shown if isinstance(shown, list) and all(isinstance(n, str) for n in shown) else None
    if not is_session_folder(root):
        return (shown or []) if (root / LOCK_FILE).is_file() else None
    if shown is None:  # no ranking.json to compare (an unreadable one, or ranking files of a version before it)
        return None
    try:
        session = session or Session.open(root)
    except SessionError:
        return None
    if (session.data.get("images") or {}).get("recursive"):  # as _posix_names reads the session's own names
        shown = [n.replace("\\", "/") for n in shown]
    recorded = session.rounds[-1]["query"] if session.rounds else []
    ends_with = len(shown) <= len(recorded) and recorded[len(recorded) - len(shown) :] == shown
    return None if ends_with else shown
