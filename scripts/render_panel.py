"""Render the Slicer panel (Resources/UI/ASFDA.ui) offscreen to a PNG, filled from a real ranking.

    pip install PySide6-Essentials && python scripts/render_panel.py [--session DIR] [--out PNG]

Slicer's own widgets (ctk*, qMRML*) are not available outside Slicer; each is replaced by the Qt class
it derives from or looks like, so the layout, texts and table read as they do in Slicer. The table's cells,
the buttons' states and the format Export offers come from the panel's own helpers (ASFDAPanelLib.state,
the workflow), so the picture cannot drift from the panel.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PySide6.QtWidgets import QWidget

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ASFDA"))  # the panel's pure helpers (ASFDAPanelLib), as Slicer finds them
STAND_INS = {
    "qMRMLWidget": "QWidget",
    "ctkCollapsibleButton": "QGroupBox",
    "ctkPathLineEdit": "QLineEdit",
    "ctkSliderWidget": "QDoubleSpinBox",
    "qMRMLSegmentEditorWidget": "QLabel",
}
DROP = {"filters", "collapsed"}


def qt_ui(source: Path) -> str:
    root = ET.parse(source).getroot()
    for widget in root.iter("widget"):
        cls = widget.get("class")
        if cls == "ctkCollapsibleButton":
            for prop in widget.findall("property"):
                if prop.get("name") == "text":
                    prop.set("name", "title")
        if cls == "qMRMLSegmentEditorWidget":
            text = ET.SubElement(widget, "property", name="text")
            ET.SubElement(text, "string").text = "Segment Editor (embedded, bound to Slicer's singleton editor node)"
            frame = ET.SubElement(widget, "property", name="frameShape")
            ET.SubElement(frame, "enum").text = "QFrame::StyledPanel"
            height = ET.SubElement(widget, "property", name="minimumSize")
            size = ET.SubElement(height, "size")
            ET.SubElement(size, "width").text = "0"
            ET.SubElement(size, "height").text = "90"
        if cls in STAND_INS:
            widget.set("class", STAND_INS[cls])
        for prop in list(widget.findall("property")):
            if prop.get("name") in DROP:
                widget.remove(prop)
    for tag in ("customwidgets", "connections"):
        for element in root.findall(tag):
            root.remove(element)
    return ET.tostring(root, encoding="unicode")


def sample_session() -> Path:
    from ASFDALib.app.cli import main

    folder = Path(tempfile.mkdtemp()) / "asfda-session"
    main(["rank", "--out", str(folder), "--budget", "3"])
    return folder


def render(session: Path, out: Path) -> QWidget:
    """Draw the panel for the ranked ``session`` into ``out`` (PNG); returns the panel widget."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from ASFDAPanelLib import dependencies, state
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt
    from PySide6.QtGui import QColor
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import (
        QApplication,
        QComboBox,
        QLabel,
        QLineEdit,
        QPlainTextEdit,
        QProgressBar,
        QPushButton,
        QSpinBox,
        QTableWidget,
        QTableWidgetItem,
    )

    from ASFDALib.app.workflow import BUTTON_ACTIONS, PanelSettings, Workflow

    app = QApplication.instance() or QApplication([])
    data = QByteArray(qt_ui(REPO / "Resources" / "UI" / "ASFDA.ui").encode())
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    panel = QUiLoader().load(buffer)
    flow = Workflow(PanelSettings(session=str(session)))
    flow.reopen()
    find = panel.findChild
    find(QLineEdit, "imagesPathLineEdit").setText(flow.settings.images)
    find(QLineEdit, "sessionPathLineEdit").setText(str(session))
    find(QLineEdit, "modelPathLineEdit").setPlaceholderText("built-in small model (or a MONAI bundle / .ts / .pt)")
    find(QSpinBox, "budgetSpinBox").setValue(flow.settings.budget)
    find(QComboBox, "exportFormatComboBox").setCurrentText(flow.export_format())
    find(QPlainTextEdit, "logTextEdit").setPlainText("\n".join(flow.log))
    find(QLabel, "dependencyLabel").setText(f"{dependencies.report()} — CPU only")  # the panel's line, on a CPU
    find(QProgressBar, "progressBar").setValue(100)
    find(QLabel, "progressLabel").setText(f"Ranked {len(flow.rows)} volumes; query: {len(flow.query)}")
    table = find(QTableWidget, "resultsTable")
    table.setRowCount(len(flow.rows))
    for r, row in enumerate(flow.rows):
        cells = state.row_cells(row)
        for c in range(len(state.COLUMNS)):
            item = QTableWidgetItem()
            item.setData(Qt.DisplayRole, state.display_value(c, cells[c]))
            if cells[state.SELECTED]:
                item.setBackground(QColor(255, 236, 200))
            table.setItem(r, c, item)
    table.resizeColumnsToContents()

    for name, action in BUTTON_ACTIONS.items():
        enabled, why = flow.check(action)
        button = find(QPushButton, name)
        button.setEnabled(enabled)
        button.setToolTip(why)
    find(QLabel, "labelStatusLabel").setText(f"Next case: {flow.next_case()} — the model's prediction is pre-filled.")
    panel.resize(640, 1100)
    panel.show()
    app.processEvents()
    # a word-wrapped label in a row of the form gets one line's height offscreen: give it the lines it wraps to
    for label in panel.findChildren(QLabel):
        if label.wordWrap():
            label.setMinimumHeight(label.heightForWidth(label.width()))
    app.processEvents()
    out.parent.mkdir(parents=True, exist_ok=True)
    panel.grab().save(str(out))
    return panel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--session", type=Path, help="a ranked session to show (default: rank the sample pool)")
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots" / "panel.png")
    args = parser.parse_args()
    render(args.session or sample_session(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
