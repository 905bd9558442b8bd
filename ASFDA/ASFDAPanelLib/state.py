"""The panel's state conversions: parameter-node values <-> workflow settings, and results-table updates.

Slicer binds ctkPathLineEdit only to ``pathlib.Path`` fields, whose empty value is ``Path()`` == ``Path(".")``;
the workflow keeps paths as strings, empty meaning "not chosen". These functions are the one place that
translates between the two, so "." never reaches the engine as a folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePath
from typing import Any, Optional

PATH_FIELDS = ("model", "card", "images", "session")
# Fields the parameter node and PanelSettings share (pseudo_iterations and workers are set by the panel).
FIELDS = (
    "model",
    "card",
    "trust",
    "images",
    "session",
    "device",
    "budget",
    "alpha",
    "strategy",
    "iterations",
    "pseudo",
    "pseudo_gate",
)
COLUMNS = ("rank", "case", "pick_score", "knowledge_gap", "diversity", "asd", "status")
SELECTED = len(COLUMNS)  # the "selected" flag rides after the visible columns


def path_text(value: Any) -> str:
    """A Path field as the workflow's string: ``Path()`` (an empty ctkPathLineEdit) is ``""``."""
    if value is None:
        return ""
    text = str(value)
    return "" if text in ("", ".") else text


def text_path(text: Optional[str]) -> Path:
    return Path(text) if text else Path()


def settings_values(parameters: Any) -> dict[str, Any]:
    """Keyword arguments for ``PanelSettings`` from the parameter node (any object with the fields)."""
    values = {name: getattr(parameters, name) for name in FIELDS}
    for name in PATH_FIELDS:
        values[name] = path_text(values[name])
    values["pseudo_iterations"] = values["iterations"]
    # Inside Slicer, DataLoader worker processes would be forked from a non-main thread of a multi-threaded
    # GUI process (CUDA may be initialised): that can deadlock, so the panel loads data in the worker thread.
    values["workers"] = 0
    return values


def parameter_values(settings: Any) -> dict[str, Any]:
    """The parameter-node values for workflow settings (after a session is reopened they hold its choices)."""
    values = {name: getattr(settings, name) for name in FIELDS}
    for name in PATH_FIELDS:
        values[name] = text_path(values[name]) if not isinstance(values[name], PurePath) else values[name]
    return values


def row_cells(row: Any) -> tuple:
    return (*(getattr(row, c) for c in COLUMNS), bool(getattr(row, "selected", False)))


def table_plan(shown: dict[str, tuple], rows: Iterable[Any]) -> Optional[list[tuple[str, int, Any]]]:
    """How to bring the table from ``shown`` (case -> cells) to ``rows``.

    None when the set of cases changed (a new ranking: rebuild the table); otherwise the
    ``(case, column, value)`` cells that differ, to update in place so the user's selection and sort
    order survive the 200 ms refresh. An empty list means nothing to do.
    """
    cells_of_rows = [row_cells(row) for row in rows]
    wanted = {cells[1]: cells for cells in cells_of_rows}
    if len(wanted) != len(cells_of_rows) or set(wanted) != set(shown):
        return None
    changes = []
    for case, cells in wanted.items():
        for column, (old, new) in enumerate(zip(shown[case], cells)):
            if old != new:
                changes.append((case, column, new))
    return changes


def display_value(column: int, value: Any) -> Any:
    """Numbers sort as numbers (rank, score, gap, diversity, ASD); anything else, e.g. "—", stays text."""
    if column in (0, 2, 3, 4, 5) and value not in (None, ""):
        try:
            return float(value)
        except (TypeError, ValueError):
            return value
    return value
