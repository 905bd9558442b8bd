"""Error types that carry the offending file and the fix, so every message a user sees names both."""

from __future__ import annotations

import os
import shlex
from pathlib import Path


def brief(exc: BaseException | str, limit: int = 200) -> str:
    """Another library's error in a line of ours: its first line, cut at a word before ``limit`` characters."""
    text = (str(exc).strip().splitlines() or [""])[0] or (type(exc).__name__ if isinstance(exc, BaseException) else "")
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"


def as_arg(value: Path | str) -> str:
    """A path as a command in a message must give it to be copied and run: as it is where no shell would read
    anything in it, else in double quotes (as cmd and PowerShell read them; messages set commands in single
    quotes), or on Unix, where a double-quoted $, `, \\ or ! would still be read, in single quotes."""
    text = str(value)
    if text and not any(c.isspace() or c in "\"'$`&|;<>()*?[]{}!#~%^" for c in text):
        return text
    if os.name == "nt" or not any(c in text for c in '"$`\\!'):  # double quotes read nothing else in it
        return '"' + text.replace('"', '\\"') + '"'
    return shlex.quote(text)


class ASFDAError(Exception):
    """Base class: a problem the user can act on (bad input, missing trust, wrong card)."""


class ValueOutOfRange(ASFDAError, ValueError):
    """A value a script passed that the command line's own checks would refuse (a config's field, an array's
    shape): an ASFDAError like every refusal, and a ValueError as Python's own checks raise."""


class VolumeError(ASFDAError):
    """A volume that cannot be read or scored; ranking skips it and reports ``reason``."""

    def __init__(self, path: Path | str, reason: str, fix: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        self.fix = fix
        message = f"{self.path}: {reason}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class ModelError(ASFDAError):
    """The model, its card or its weights cannot be used together."""


class TrustRequiredError(ModelError):
    """Loading this file would execute code from it; the user must say they trust it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM raised where the program stands, so it takes every Ctrl-C path (recorded as interrupted, resumable)
    and still exits as terminated: shells, ``timeout`` and batch schedulers read 143, not Ctrl-C's 130."""


def interrupted_exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process the signal stopped."""
    return 143 if isinstance(exc, Terminated) else 130
