"""Render the Slicer panel (Resources/UI/ASFDA.ui) offscreen to a PNG, filled from a real ranking.

    pip install PySide6-Essentials && python scripts/render_panel.py [--session DIR] [--out PNG]

Slicer's own widgets (ctk*, qMRML*) are not available outside Slicer; each is replaced by the Qt class
it derives from or looks like, so the layout, texts and table read as they do in Slicer.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--session", type=Path, help="a ranked session to show (default: rank the sample pool)")
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots" / "panel.png")
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtGui import QColor
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import (
        QApplication,
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
    session = args.session or sample_session()
    flow = Workflow(PanelSettings(session=str(session)))
    flow.reopen()
    find = panel.findChild
    find(QLineEdit, "imagesPathLineEdit").setText(flow.settings.images)
    find(QLineEdit, "sessionPathLineEdit").setText(str(session))
    find(QLineEdit, "modelPathLineEdit").setPlaceholderText("built-in small model (or a MONAI bundle / .ts / .pt)")
    find(QSpinBox, "budgetSpinBox").setValue(flow.settings.budget)
    find(QPlainTextEdit, "logTextEdit").setPlainText("\n".join(flow.log))
    find(QLabel, "deviceInfoLabel").setText("CPU only (no CUDA device)")
    find(QLabel, "dependencyLabel").setText("torch 2.13.0, monai 1.6.1, nibabel 5.4.2")
    find(QProgressBar, "progressBar").setValue(100)
    find(QLabel, "progressLabel").setText(f"Ranked {len(flow.rows)} volumes; query: {len(flow.query)}")
    table = find(QTableWidget, "resultsTable")
    table.setRowCount(len(flow.rows))
    for r, row in enumerate(flow.rows):
        for c, value in enumerate((row.rank, row.case, row.priority, row.dkd, row.asd, row.status)):
            item = QTableWidgetItem(value)
            if row.selected:
                item.setBackground(QColor(255, 236, 200))
            table.setItem(r, c, item)
    table.resizeColumnsToContents()

    for name, action in BUTTON_ACTIONS.items():
        enabled, why = flow.check(action)
        button = find(QPushButton, name)
        button.setEnabled(enabled)
        button.setToolTip(why)
    find(QLabel, "labelStatusLabel").setText(f"Next case: {flow.next_case()} — the model's prediction is pre-filled.")
    panel.resize(460, 1040)
    panel.show()
    app.processEvents()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    panel.grab().save(str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
