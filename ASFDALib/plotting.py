"""Figures for the engine's outputs, drawn so that a plot can never cost a result.

Every figure is a :class:`matplotlib.figure.Figure` on its own Agg canvas, never matplotlib's state
machine, so no global figure registry and no backend switch inside a host application (3D Slicer has
its own Qt backend and runs our jobs on worker threads). :func:`draw_or_explain` runs a drawing and turns any failure —
matplotlib not installed in Slicer's Python, a font or disk problem — into one line for the user, so
the caller keeps the files that matter and says why the picture is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ASFDALib.atomic import atomic_write

INSTALL_HINT = "pip install matplotlib (in Slicer: slicer.util.pip_install('matplotlib'))"


def new_figure(width: float, height: float, dpi: int = 120) -> tuple[Any, Any]:
    """A figure of ``width`` x ``height`` inches on an Agg canvas, and its one axes."""
    import matplotlib  # noqa: F401  # the package first: a blocked or missing matplotlib fails here
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas
    return figure, figure.add_subplot()


def save_figure(figure: Any, path: Path) -> Path:
    """Write the figure as PNG atomically (a reader never sees half a picture)."""
    figure.tight_layout()
    return atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png"))


def draw_or_explain(path: Path, draw: Callable[[Path], Path | None]) -> tuple[Path | None, str | None]:
    """``draw(path)``; on any failure ``(None, one line naming the file, the cause and the fix)``."""
    try:
        return draw(Path(path)), None
    except ImportError as exc:
        return None, f"{path}: not drawn, matplotlib cannot be imported ({_one_line(exc)}); to get it: {INSTALL_HINT}"
    except Exception as exc:  # noqa: BLE001  # a picture is optional: whatever broke it must not cost the result
        return None, f"{path}: not drawn ({type(exc).__name__}: {_one_line(exc)}); the other outputs are written"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or "no message"
