"""What every benchmark script does with its report: print it, and write it atomically where asked."""

from __future__ import annotations

import json
from pathlib import Path

from ASFDALib.atomic import atomic_write_text


def emit(report: dict, path: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        atomic_write_text(path, text + "\n")
