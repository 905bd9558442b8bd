"""Atomic file writes: write to a temporary file beside the target, fsync, then rename over it.

A reader (or a resumed run after a kill) therefore sees either the old file or the new one, never a
half-written file.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ASFDALib.errors import ASFDAError

REPLACE_TRIES = 20  # x 50 ms: a reader's open handle or a virus scanner's is gone well within a second


def _replace(tmp: Path, path: Path, tries: int = REPLACE_TRIES, pause_s: float = 0.05) -> None:
    """``os.replace``, tried again for a moment where Windows refuses it (PermissionError): there a file
    another process or thread holds open (the panel polling a run's progress file, a virus scanner) cannot
    be replaced until it is closed, which is a matter of milliseconds."""
    for attempt in range(tries):
        try:
            os.replace(tmp, path)
            return
        except PermissionError:
            if attempt == tries - 1:
                raise
            time.sleep(pause_s)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; session files are meant to be shared
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        _replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ASFDAError(
                f"{path}: the disk is full ({exc.strerror}); nothing was changed, the previous version is intact. "
                "Free some space and run the same command again."
            ) from None
        raise
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def remove_scratch(path: Path) -> None:
    """Remove what writes of ``path`` killed mid-write (SIGKILL, a power cut) left beside it: :func:`atomic_write`'s
    ``.<name>.*.tmp``, the suffixed ``.<name>.*.tmp.<ext>`` a writer that picks its format by suffix makes from it
    (SimpleITK's NRRD, MetaImage), and :func:`atomic_folder`'s scratch folder. Only for a caller that alone writes
    ``path`` now (it holds the lock guarding it, or the path is its own output)."""
    path = Path(path)
    for scratch in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        if not (scratch.name.endswith(".tmp") or ".tmp." in scratch.name):
            continue
        if scratch.is_dir() and not scratch.is_symlink():
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            scratch.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A folder written whole or not at all: the block fills a scratch folder beside ``path`` (hidden), which then
    takes its place (``path`` absent or empty); a block stopped part-way leaves no ``path`` to be taken for the
    whole (a SIGKILL leaves the scratch folder, named ``.<name>.*.tmp``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(stage, 0o755)  # mkdtemp makes 0700 folders; an export is meant to be shared
        yield stage
        if path.is_dir() and not any(path.iterdir()):  # an empty folder made for it: taken over
            path.rmdir()
        os.rename(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def atomic_write_npz(path: Path, arrays: dict[str, Any], compressed: bool = False) -> Path:
    """Arrays as ``.npz`` (no pickles, so ``np.load(allow_pickle=False)`` reads it back), atomically."""
    import numpy as np  # here: the command line's parser imports this module and must not load numpy

    save = np.savez_compressed if compressed else np.savez

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.savez would append ".npz" to a path
            save(handle, **arrays)

    return atomic_write(path, write)
