"""The Slicer panel's own code (ASFDA/ASFDA.py) run in a real Qt event loop, driven through its buttons.

Qt is PySide6 on the offscreen platform, MRML is slicer-core's, ``slicer.util`` is Slicer's own (shipped
in slicer-core); only what the Slicer application alone provides is stood in (Testing/Python/
slicer_standins: PythonQt's ``qt``, CTK and MRML widgets, ``slicer.app``, the scripted-module base
classes, and a parameterNodeWrapper that binds by Slicer's connector rules). Jobs run in the workflow's
worker thread and reach the panel through its 200 ms QTimer, as in Slicer.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("PySide6", reason="PySide6 (pip install PySide6-Essentials) runs the panel's Qt code")
slicer = pytest.importorskip("slicer", reason="slicer-core gives the panel real MRML")

import slicer_standins  # noqa: E402

from ASFDALib.adaptation.runs import PANEL_RESTART, PANEL_RESUME  # noqa: E402

STATUS = 6  # the results table's Status column (ASFDAPanelLib.state.COLUMNS)
CAUGHT: list[BaseException] = []  # exceptions raised in the panel's slots, for failure messages


@pytest.fixture(scope="module")
def standins():
    installed = slicer_standins.install()
    yield installed
    installed.uninstall()


@pytest.fixture
def errors(monkeypatch):
    """Exceptions raised in the panel's slots: Qt would only print them (Slicer shows them in its log)."""
    CAUGHT.clear()
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: CAUGHT.append(value))
    return CAUGHT


def run_until(condition, timeout: float = 180.0) -> None:
    """Run a Qt event loop (the panel's QTimer polls the worker in it) until ``condition()`` holds."""
    from PySide6 import QtCore

    loop = QtCore.QEventLoop()
    check = QtCore.QTimer()
    check.timeout.connect(lambda: loop.quit() if condition() else None)
    check.start(20)
    QtCore.QTimer.singleShot(int(timeout * 1000), loop.quit)
    loop.exec()
    check.stop()
    assert condition(), f"not reached within {timeout} s; errors in the panel's slots: {CAUGHT}"


def _idle(widget):
    return lambda: widget.logic.flow is not None and not widget.logic.flow.busy and not widget.timer.isActive()


def _open_panel(module):
    widget = module.ASFDAWidget()
    widget.setup()
    widget.parent.show()
    widget.parent.enter()
    return widget


def _rows(table) -> dict[str, str]:
    return {table.item(r, 1).text(): table.item(r, STATUS).text() for r in range(table.rowCount)}


def _double_click(table, case: str) -> None:
    from PySide6 import QtCore, QtTest

    row = next(r for r in range(table.rowCount) if table.item(r, 1).text() == case)
    table.scrollToItem(table.item(row, 1))
    center = table.visualItemRect(table.item(row, 1)).center()
    # A user's double click is a click, then a double-click event (Qt 6's QTest.mouseDClick sends only the second).
    QtTest.QTest.mouseClick(table.viewport(), QtCore.Qt.LeftButton, QtCore.Qt.NoModifier, center)
    QtTest.QTest.mouseDClick(table.viewport(), QtCore.Qt.LeftButton, QtCore.Qt.NoModifier, center)


def _volume_nodes() -> int:
    return slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")


def test_one_session_through_the_panel_buttons(standins, errors, tmp_path, monkeypatch):
    from PySide6 import QtCore

    from ASFDALib.app import mrml
    from ASFDALib.bench.phantoms import write_phantoms
    from ASFDALib.data.volumes import read_volume

    write_phantoms(tmp_path / "pool", 4, "mri", seed=7)
    images, session = tmp_path / "pool" / "images", tmp_path / "session"
    module = slicer_standins.load_panel()
    widget = _open_panel(module)
    ui, node = widget.ui, widget._parameterNode

    # --- setup: every field through its widget, into the parameter node --------------------------------
    assert [ui.deviceComboBox.itemText(i) for i in range(ui.deviceComboBox.count)] == ["auto", "cpu", "cuda"]
    assert (ui.iterationsSpinBox.minimum, ui.iterationsSpinBox.maximum) == (10, 100000)
    gates = [ui.pseudoGateComboBox.itemText(i) for i in range(ui.pseudoGateComboBox.count)]
    assert gates == ["rounds", "confidence", "flips"] and ui.pseudoGateComboBox.currentText == node.pseudo_gate
    assert not ui.rankButton.enabled and ui.rankButton.toolTip == "choose a session folder"
    assert ui.dependencyLabel.text.startswith("torch ")
    ui.sessionPathLineEdit.currentPath = str(session)
    assert node.session == session and ui.rankButton.toolTip == "choose the folder of target volumes"
    ui.imagesPathLineEdit.currentPath = str(images)
    ui.deviceComboBox.currentIndex = ui.deviceComboBox.findText("cpu")
    ui.budgetSpinBox.value = 1
    ui.iterationsSpinBox.value = 10
    ui.pseudoCheckBox.checked = False
    ui.pseudoGateComboBox.currentIndex = ui.pseudoGateComboBox.findText("flips")
    assert (node.images, node.device, node.budget, node.iterations, node.pseudo) == (images, "cpu", 1, 10, False)
    assert node.pseudo_gate == "flips" and not ui.pseudoGateComboBox.enabled  # no pseudo-labels: no gate
    assert ui.rankButton.enabled and str(node.model) == "."  # the built-in model

    # --- rank: a worker thread, polled by the panel's timer ----------------------------------------------
    ui.rankButton.click()
    assert widget.logic.flow.busy and widget.timer.isActive() and ui.rankButton.text == "Cancel"
    run_until(_idle(widget))
    assert ui.rankButton.text == "Rank volumes" and ui.progressLabel.text.startswith("Ranked 4 volumes; query: 1")
    assert ui.resultsTable.rowCount == 4 and set(_rows(ui.resultsTable).values()) == {"unlabelled"}
    # each pick explained by its score, knowledge gap, diversity and ASD, as numbers the table sorts by
    assert all(0.0 <= float(ui.resultsTable.item(r, c).text()) for r in range(4) for c in (2, 3, 4, 5))
    (case,) = widget.logic.flow.query
    assert ui.nextCaseButton.enabled and not ui.finetuneButton.enabled

    # --- open a case: predicted in the worker, loaded into the scene only now -----------------------------
    ui.nextCaseButton.click()
    assert ui.labelStatusLabel.text == f"Opening {case}…" and _volume_nodes() == 0
    run_until(lambda: widget.logic.current is not None and _idle(widget)())
    assert _volume_nodes() == 1
    name, volume, segmentation = widget.logic.current
    editor = ui.segmentEditorWidget.mrmlSegmentEditorNode()
    assert name == case and editor.GetSegmentationNode() is segmentation and editor.GetSourceVolumeNode() is volume
    assert ui.labelStatusLabel.text.startswith(f"Labelling {case} (from model prediction)")

    # --- save a label: what the segmentation holds, written into the session ------------------------------
    truth = read_volume(tmp_path / "pool" / "labels" / case)
    mrml.labelmap_to_segmentation(
        slicer.mrmlScene,
        truth.array,
        truth.affine,
        widget.logic.flow.class_names(),
        volume,
        segmentation_node=segmentation,
    )
    ui.saveLabelButton.click()
    saved = session / "labels" / f"{case.removesuffix('.nii.gz')}.v1.nii.gz"
    np.testing.assert_array_equal(read_volume(saved).array, truth.array)
    assert saved.with_name(saved.name.replace(".nii.gz", ".seg.nrrd")).is_file()
    assert ui.labelStatusLabel.text.startswith("Saved ") and _rows(ui.resultsTable)[case] == "labelled"

    # --- fine-tune: the round's first run ----------------------------------------------------------------
    assert ui.finetuneButton.text == "Fine-tune" and not ui.finetuneAgainButton.visible
    ui.finetuneButton.click()
    assert ui.finetuneButton.text == "Cancel"
    run_until(_idle(widget))
    assert ui.finetuneLabel.text == "round 1 trained: stage 1 10 iterations", widget.logic.flow.log[-3:]
    assert ui.finetuneButton.text == "Continue the last run" and ui.finetuneAgainButton.visible
    # the buttons the engine's messages name when they are shown in the panel
    assert (ui.finetuneButton.text, ui.finetuneAgainButton.text) == (PANEL_RESUME, PANEL_RESTART)
    assert ui.finetuneRunLabel.text.endswith("Round 1 has a finished run (stage 1: 10 iterations, stage 2: 0).")
    assert not ui.finetuneButton.enabled and "set the iterations above 10" in ui.finetuneButton.toolTip

    # --- cancel: continue the finished run to many more iterations, then Cancel ---------------------------
    ui.iterationsSpinBox.value = 100000
    assert ui.finetuneButton.enabled
    ui.finetuneButton.click()
    run_until(lambda: ui.finetuneLabel.text.startswith("Fine-tuning stage 1 (labels): "))
    assert ui.finetuneButton.text == "Cancel"
    ui.finetuneButton.click()
    run_until(_idle(widget))
    assert "fine-tuning cancelled; finished work is kept" in widget.logic.flow.log
    assert ui.applyButton.enabled  # the finished run's weights are still the round's

    # --- train again from the round's start: the other explicit choice ------------------------------------
    ui.iterationsSpinBox.value = 12
    ui.finetuneAgainButton.click()
    run_until(_idle(widget))
    assert ui.finetuneLabel.text == "round 1 trained again: stage 1 12 iterations"
    assert (session / "checkpoints" / "round1-replaced-1").is_dir()

    # --- apply: predictions to files in the session, listed; none loaded until opened ---------------------
    table = ui.resultsTable
    table.sortItems(2, QtCore.Qt.DescendingOrder)  # the user sorts by priority and selects a row
    order = [table.item(r, 1).text() for r in range(table.rowCount)]
    table.selectRow(2)
    ui.applyButton.click()
    assert ui.applyButton.text == "Cancel"
    run_until(_idle(widget))
    # The statuses changed in place: the user's sort order and selection survived every refresh.
    assert [table.item(r, 1).text() for r in range(table.rowCount)] == order
    assert {item.row() for item in table.selectedItems()} == {2}
    rest = sorted(set(_rows(ui.resultsTable)) - {case})
    assert {c: _rows(ui.resultsTable)[c] for c in rest} == dict.fromkeys(rest, "predicted")
    files = sorted(p.name for p in (session / "predictions").glob("round1-*/*.nii.gz"))
    assert files == sorted(rest) and _volume_nodes() == 1
    assert not ui.applyButton.enabled and ui.applyButton.text == "Predict remaining"
    _double_click(ui.resultsTable, rest[0])
    run_until(lambda: widget.logic.current[0] == rest[0] and _idle(widget)())
    assert ui.labelStatusLabel.text.startswith(f"Labelling {rest[0]} (from prediction {rest[0]})")
    assert _volume_nodes() == 2
    _double_click(ui.resultsTable, case)  # already in the scene: shown as it is, no job, no second copy
    assert widget.logic.current[0] == case and not widget.logic.flow.busy and _volume_nodes() == 2
    assert ui.labelStatusLabel.text.startswith(f"Labelling {case} (from its open segmentation, edits kept)")
    assert ui.segmentEditorWidget.mrmlSegmentEditorNode().GetSegmentationNode() is segmentation

    # --- export: in the format offered for the session's model, or another picked, where the dialog says ------
    import threading

    import qt

    from ASFDALib.app.workflow import BUTTON_ACTIONS
    from ASFDALib.models import export

    assert [ui.exportFormatComboBox.itemText(i) for i in range(ui.exportFormatComboBox.count)] == [
        "bundle",
        "pt2",
        "torchscript",
    ]
    assert ui.exportFormatComboBox.currentText == "bundle" and ui.exportButton.enabled  # a MONAI network: a bundle
    asked, shown = [], []

    def folder_dialog(parent, caption, start):  # PythonQt's getExistingDirectory: the folder, "" if cancelled
        asked.append((caption, start))
        (tmp_path / "bundle").mkdir()  # made in the dialog, with its New Folder button
        return str(tmp_path / "bundle")

    def save_dialog(parent, caption, start, name_filter):  # PythonQt's getSaveFileName: the file name alone
        asked.append((name_filter, start))
        return str(tmp_path / "adapted")  # typed without a suffix

    monkeypatch.setattr(qt.QFileDialog, "getExistingDirectory", staticmethod(folder_dialog))
    monkeypatch.setattr(qt.QFileDialog, "getSaveFileName", staticmethod(save_dialog))
    monkeypatch.setattr(slicer.util, "infoDisplay", lambda text, **kwargs: shown.append(" ".join(text.split())))
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: shown.append(f"error: {text}"))
    # the export held in the worker until released, as a long torch.export trace holds it: Slicer's loop goes on
    release, exporting = threading.Event(), export.export_session_model

    def held(*args, **kwargs):
        release.wait(60)
        return exporting(*args, **kwargs)

    monkeypatch.setattr(export, "export_session_model", held)
    ui.exportButton.click()
    assert asked.pop() == ("Export the adapted model as a MONAI bundle: choose a new or empty folder", str(tmp_path))
    assert ui.exportButton.text == "Exporting…" and ui.progressLabel.text == "Exporting bundle to bundle…"
    polls: list[int] = []
    polled = widget.logic.flow.poll

    def counted() -> int:
        polls.append(1)
        return polled()

    monkeypatch.setattr(widget.logic.flow, "poll", counted)
    run_until(lambda: len(polls) >= 3)  # the panel's timer polls the running export: the GUI thread is free
    assert not any(getattr(ui, b).enabled for b in BUTTON_ACTIONS) and ui.progressBar.maximum == 0  # a busy bar
    assert ui.exportButton.toolTip == "wait for exporting to finish"  # no Cancel: see Workflow.start_export
    release.set()
    run_until(_idle(widget))
    assert (tmp_path / "bundle" / "configs" / "inference.json").is_file()
    assert shown.pop().startswith(f"Exported bundle to {tmp_path / 'bundle'}: round 1's fine-tuned model")
    assert ui.exportButton.text == "Export model" and ui.exportButton.enabled and ui.progressBar.maximum == 100
    assert ui.progressLabel.text == "Exported bundle to bundle"
    ui.exportFormatComboBox.currentIndex = ui.exportFormatComboBox.findText("torchscript")
    assert node.export_format == "torchscript"
    ui.exportButton.click()  # a save dialog beside the session, named after it; the name typed gets the suffix
    assert asked.pop() == ("TorchScript (*.ts)", str(tmp_path / "session.ts"))
    run_until(_idle(widget))
    assert (tmp_path / "adapted.ts").is_file() and (tmp_path / "adapted.card.json").is_file()
    said = shown.pop()
    assert said.startswith(f"Exported torchscript to {tmp_path / 'adapted.ts'}, its card to ")
    assert "model with Trust this file ticked (it runs code stored in the file). Its source statistics stay" in said
    written = (tmp_path / "adapted.ts").read_bytes()
    ui.exportButton.click()  # the same name again: refused as asfda export refuses it, shown when the job ends
    run_until(_idle(widget))
    assert shown == [f"error: {tmp_path / 'adapted.ts'}: the file already exists; choose a new file name"]
    assert ui.progressLabel.text == "Export failed: see the message" and errors == []
    assert (tmp_path / "adapted.ts").read_bytes() == written
    assert node.export_format == "torchscript"  # the user's pick stays

    # --- next round: re-rank the rest with the adapted model ----------------------------------------------
    ui.nextRoundButton.click()
    run_until(_idle(widget))
    (second,) = widget.logic.flow.query
    assert second != case and _rows(ui.resultsTable)[case] == "labelled"
    assert ui.finetuneButton.text == "Fine-tune" and not ui.finetuneAgainButton.visible  # round 2 has no run
    # and waits for a label of its query, as asfda finetune does
    assert not ui.finetuneButton.enabled and ui.finetuneButton.toolTip.startswith("label a case of this round's query")

    # --- File -> Close Scene: settings carried, the editor keeps working ----------------------------------
    slicer.mrmlScene.Clear(0)
    assert _volume_nodes() == 0 and widget.logic.current is None
    node = widget._parameterNode
    assert node.session == session and node.budget == 1 and node.device == "cpu"
    assert ui.sessionPathLineEdit.currentPath == str(session) and ui.budgetSpinBox.value == 1
    ui.nextCaseButton.click()
    run_until(lambda: widget.logic.current is not None and _idle(widget)())
    assert widget.logic.current[0] == second
    assert ui.segmentEditorWidget.mrmlSegmentEditorNode().GetSegmentationNode() is widget.logic.current[2]

    # --- leaving the module: no active effect, no shortcuts ------------------------------------------------
    ui.segmentEditorWidget.setActiveEffect("Paint")
    widget.parent.exit()
    assert ui.segmentEditorWidget.activeEffect is None and not ui.segmentEditorWidget.shortcutsInstalled
    widget.cleanup()

    # --- reopen the session in a fresh panel and scene (as after restarting Slicer) -----------------------
    slicer.mrmlScene.Clear(0)
    again = _open_panel(module)
    again.ui.sessionPathLineEdit.currentPath = str(session)
    restored = again._parameterNode
    assert (restored.images, restored.budget, restored.strategy) == (images, 1, "asfda")
    assert again.ui.imagesPathLineEdit.currentPath == str(images) and again.ui.budgetSpinBox.value == 1
    rows = _rows(again.ui.resultsTable)
    assert len(rows) == 4 and rows[case] == "labelled" and again.logic.flow.query == [second]
    assert again.ui.nextCaseButton.enabled
    again.parent.exit()
    again.cleanup()
    assert errors == []


@pytest.mark.parametrize(
    ("field", "wrong", "message"),
    [
        ("    alpha: Annotated[float, WithinRange(0.0, 1.0)] = 0.5\n", "    alpha: float = 0.5\n", "unbounded"),
        ("    session: pathlib.Path\n", '    session: str = ""\n', "Unable to create GUI connector"),
        (
            '    device: Annotated[str, Choice(list(DEVICES))] = "auto"\n',
            '    device: str = "auto"\n',
            "requires the Choice annotation",
        ),
    ],
)
def test_a_binding_slicer_refuses_fails_the_panel_setup_here_too(standins, field, wrong, message):
    source = slicer_standins.MODULE.read_text(encoding="utf-8")
    assert field in source
    module = slicer_standins.load_panel(source.replace(field, wrong))
    slicer.mrmlScene.Clear(0)
    widget = module.ASFDAWidget()
    with pytest.raises(RuntimeError, match=message):
        widget.setup()
    widget.cleanup()
    slicer.mrmlScene.Clear(0)


def test_a_signal_the_widget_lacks_is_refused_as_pythonqt_would(standins):
    import qt

    timer = qt.QTimer()
    assert timer.connect("timeout()", lambda: None)
    with pytest.raises(AttributeError, match="QTimer has no signal timeout\\(int\\)"):
        timer.connect("timeout(int)", lambda: None)
    table = qt.QTableWidget()
    seen = []
    table.connect("cellDoubleClicked(int,int)", lambda row, column: seen.append((row, column)))
    table.cellDoubleClicked.emit(2, 3)
    assert seen == [(2, 3)]
    label = qt.QLabel()
    label.text = "attribute-style"
    label.enabled = False
    assert (label.text, label.enabled) == ("attribute-style", False)


def test_the_module_self_test_runs_with_the_panel_logic(standins):
    """ASFDATest (Reload and Test in Slicer) on the same stand-ins: its code paths are the panel's."""
    import unittest

    module = slicer_standins.load_panel()
    result = unittest.TextTestRunner(verbosity=0).run(module.ASFDATest("runTest"))
    assert result.wasSuccessful(), result.errors + result.failures
    slicer.mrmlScene.Clear(0)


def _session_on(folder, images, trust: bool = False, network: str | None = None):
    """A session folder as a first rank leaves it, as far as reopening it reads: its model (built by ``network``'s
    name, if given) and images."""
    from ASFDALib.adaptation.session import Session

    extra = {"network": {"name": network, "args": {}}} if network else None
    with Session.open(folder, create=True) as session:
        session.set_images(images, {}, False)
        session.set_model(images.parent / "model.pt", "digest", "state_dict", {}, trust, extra)
        session.save()
    return folder


def test_export_offers_the_format_that_carries_the_sessions_model_and_keeps_the_one_picked(standins, errors, tmp_path):
    """No MONAI bundle carries nnU-Net's residual encoder: its session is offered pt2, a UNet's a bundle."""
    images = tmp_path / "images"
    images.mkdir()
    _session_on(tmp_path / "resenc", images, network="ResidualEncoderUNet")
    _session_on(tmp_path / "unet", images, network="UNet")
    widget = _open_panel(slicer_standins.load_panel())
    ui = widget.ui
    ui.sessionPathLineEdit.currentPath = str(tmp_path / "resenc")
    assert widget._parameterNode.export_format == "pt2" and ui.exportFormatComboBox.currentText == "pt2"
    ui.exportFormatComboBox.currentIndex = ui.exportFormatComboBox.findText("torchscript")
    widget.refresh()
    assert widget._parameterNode.export_format == "torchscript"  # picked: it stays
    slicer.mrmlScene.Clear(0)  # File -> Close Scene: a new parameter node, offered the session's format again
    assert widget._parameterNode.export_format == "pt2" and ui.exportFormatComboBox.currentText == "pt2"
    ui.sessionPathLineEdit.currentPath = str(tmp_path / "unet")
    assert widget._parameterNode.export_format == "bundle" and ui.exportFormatComboBox.currentText == "bundle"
    widget.cleanup()
    slicer.mrmlScene.Clear(0)  # the next panel is not to reopen these sessions from the scene's parameter node
    assert errors == []


def test_typing_a_new_session_path_past_an_existing_session_keeps_the_users_settings(standins, errors, tmp_path):
    """Typing D:/s/liver2 passes through D:/s/liver (the field reports every keystroke): were that a session,
    its images folder would stay for the new session, which would rank the wrong scans."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    _session_on(tmp_path / "s" / "liver", theirs)
    widget = _open_panel(slicer_standins.load_panel())
    ui, node = widget.ui, widget._parameterNode
    ui.imagesPathLineEdit.currentPath = str(ours)
    ui.budgetSpinBox.value = 3
    ui.sessionPathLineEdit.typePath(str(tmp_path / "s" / "liver2"))
    assert node.session == tmp_path / "s" / "liver2"
    assert node.images == ours and ui.imagesPathLineEdit.currentPath == str(ours) and node.budget == 3
    # what the user changes while a session is open stays theirs when the path moves on
    ui.sessionPathLineEdit.currentPath = str(tmp_path / "s" / "liver")
    assert node.images == theirs
    ui.budgetSpinBox.value = 2
    ui.sessionPathLineEdit.typePath("3", append=True)
    assert (node.images, node.budget) == (ours, 2)
    widget.cleanup()
    assert errors == []


def test_a_loaded_scene_does_not_bring_trust_in_its_model_file(standins, errors, tmp_path):
    """A shared .mrb saves the parameter node: its "trust" would let Rank run a pickled or TorchScript model
    the user never chose to trust."""
    widget = _open_panel(slicer_standins.load_panel())
    node = widget._parameterNode
    slicer.mrmlScene.StartState(slicer.mrmlScene.ImportState)  # File -> Load Scene: the saved node comes in
    node.trust = True  # what the scene's parameter node held
    slicer.mrmlScene.EndState(slicer.mrmlScene.ImportState)
    assert node.trust is False and not widget.ui.trustCheckBox.checked
    # what the user ticked themselves stays through an import that does not touch it (Add Data of a scene)
    widget.ui.trustCheckBox.checked = True
    slicer.mrmlScene.StartState(slicer.mrmlScene.ImportState)
    slicer.mrmlScene.EndState(slicer.mrmlScene.ImportState)
    assert node.trust is True
    widget.cleanup()
    assert errors == []


def test_effects_registered_after_the_panel_are_listed_in_its_editor(standins, errors):
    """ASFDA as the startup module: an extension's effects register after its Segment Editor was made."""
    widget = _open_panel(slicer_standins.load_panel())
    factory = slicer.qSlicerSegmentEditorEffectFactory.instance()
    factory.registerEffect("Local Threshold")
    assert "Local Threshold" in widget.ui.segmentEditorWidget.effects
    widget.cleanup()
    factory.registerEffect("Smoothing")  # a closed (reloaded) panel's editor is no longer told
    assert "Smoothing" not in widget.ui.segmentEditorWidget.effects
    assert errors == []


def _panel_on_a_new_pool(tmp_path, count: int):
    """A fresh panel set to rank ``count`` MRI phantoms into a new session, on the CPU."""
    from ASFDALib.bench.phantoms import write_phantoms

    write_phantoms(tmp_path / "pool", count, "mri", seed=count)
    widget = _open_panel(slicer_standins.load_panel())
    widget.ui.sessionPathLineEdit.currentPath = str(tmp_path / "session")
    widget.ui.imagesPathLineEdit.currentPath = str(tmp_path / "pool" / "images")
    widget.ui.deviceComboBox.currentIndex = widget.ui.deviceComboBox.findText("cpu")
    return widget


def test_save_label_saves_the_case_the_editor_shows_and_refuses_one_of_no_case(standins, errors, tmp_path):
    """The embedded editor's own selectors can show another case, or a segmentation of the user's: Save must
    write what is shown, never the case opened last."""
    from ASFDALib.data.volumes import read_volume

    widget = _panel_on_a_new_pool(tmp_path, 3)
    ui = widget.ui
    ui.budgetSpinBox.value = 2
    ui.rankButton.click()
    run_until(_idle(widget))
    first, second = widget.logic.flow.query
    for case in (first, second):
        ui.nextCaseButton.click() if case == first else _double_click(ui.resultsTable, case)
        run_until(lambda case=case: widget.logic.current is not None and widget.logic.current[0] == case)
        run_until(_idle(widget))
    first_segmentation = widget.logic.loaded[first][1]
    ui.segmentEditorWidget.setSegmentationNode(first_segmentation)  # back to the first, in the editor itself
    ui.saveLabelButton.click()
    labels = tmp_path / "session" / "labels"
    assert sorted(p.name for p in labels.glob("*.nii.gz")) == [f"{first.removesuffix('.nii.gz')}.v1.nii.gz"]
    assert read_volume(next(labels.glob("*.nii.gz"))).array.any()
    mine = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my notes")
    ui.segmentEditorWidget.setSegmentationNode(mine)
    ui.saveLabelButton.click()  # Slicer shows the error (under --testing, raises it to the event loop)
    assert [str(e) for e in errors] == [
        "The Segment Editor shows my notes, which is no case of this session: open one with Next case"
    ]
    assert len(list(labels.glob("*.nii.gz"))) == 1
    widget.cleanup()


def test_closing_the_panel_cancels_its_running_job(standins, errors, tmp_path):
    """Reload or quitting Slicer: a job left running would keep the session locked by Slicer's own process."""
    widget = _panel_on_a_new_pool(tmp_path, 6)
    ui = widget.ui
    ui.rankButton.click()
    job = widget.logic.flow.job
    assert widget.logic.flow.busy and job.thread.is_alive()
    widget.cleanup()
    assert not widget.logic.flow.busy and not job.thread.is_alive()
    assert any("cancelled" in line for line in widget.logic.flow.log), widget.logic.flow.log[-3:]
    assert errors == []


def test_the_self_test_says_what_is_missing_instead_of_failing_in_the_worker(standins, monkeypatch):
    """The factory's Slicer has no torch or MONAI until asked (pip_ensure installs nothing under --testing)."""
    import unittest

    module = slicer_standins.load_panel()
    from ASFDAPanelLib import dependencies

    monkeypatch.setattr(dependencies, "unmet", lambda *a, **k: ["monai>=1.3"])
    result = unittest.TextTestRunner(verbosity=0).run(module.ASFDATest("runTest"))
    assert result.wasSuccessful() and len(result.skipped) == 1
    assert "ASFDA needs monai>=1.3: press Check / install" in result.skipped[0][1]
    # Reload and Test (no --testing) calls runTest itself: a SkipTest would show as "Reload and Test failed"
    shown = []
    monkeypatch.setattr(slicer.app, "testingEnabled", lambda: False)
    monkeypatch.setattr(slicer.util, "warningDisplay", lambda text, **kwargs: shown.append(text))
    module.ASFDATest("runTest").runTest()
    assert shown == ["ASFDA self-test skipped: ASFDA needs monai>=1.3: press Check / install in the ASFDA module"]


def test_the_readmes_panel_screenshot_is_drawn_from_the_ui_and_a_real_ranking(tmp_path):
    """scripts/render_panel.py draws Resources/Screenshots/panel.png: the table's cells, the buttons' states and the
    format Export offers come from the panel's own helpers, so a change to the panel cannot leave it broken."""
    import importlib.util

    from PySide6.QtWidgets import QComboBox, QPushButton, QTableWidget

    from ASFDALib.app.cli import main
    from ASFDALib.bench.phantoms import write_phantoms

    write_phantoms(tmp_path / "pool", 2, "mri", seed=3)
    session = tmp_path / "session"
    assert main(["rank", "--images", str(tmp_path / "pool" / "images"), "--out", str(session), "--budget", "1"]) == 0
    script = slicer_standins.REPO / "scripts" / "render_panel.py"
    spec = importlib.util.spec_from_file_location("render_panel", script)
    render_panel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_panel)
    panel = render_panel.render(session, tmp_path / "panel.png")
    table = panel.findChild(QTableWidget, "resultsTable")
    rows = [[table.item(r, c).text() for c in (0, 1, 6)] for r in range(table.rowCount())]
    assert sorted(rank for rank, _, _ in rows) == ["1", "2"]
    cases = {case: status for _, case, status in rows}
    assert cases == {"mri_000.nii.gz": "unlabelled", "mri_001.nii.gz": "unlabelled"}
    assert all(0.0 <= float(table.item(r, c).text()) for r in range(2) for c in (2, 3, 4, 5))
    assert panel.findChild(QComboBox, "exportFormatComboBox").currentText() == "bundle"
    export = panel.findChild(QPushButton, "exportButton")
    assert not export.isEnabled() and export.toolTip() == "fine-tune first"
    assert (tmp_path / "panel.png").read_bytes().startswith(b"\x89PNG")
