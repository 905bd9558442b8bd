"""Error types that carry the offending file and the fix, so every message a user sees names both."""

from __future__ import annotations

from pathlib import Path


def as_arg(value: Path | str) -> str:
    """A path as a command in a message must give it to be copied and run: in double quotes where it holds a
    space or a character a shell would read (the same on Windows' cmd and PowerShell as on a Unix shell)."""
    text = str(value)
    if text and not any(c.isspace() or c in "\"'$`&|;<>()*?[]{}!#~" for c in text):
        return text
    return '"' + text.replace('"', '\\"') + '"'


class ASFDAError(Exception):
    """Base class: a problem the user can act on (bad input, missing trust, wrong card)."""


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
