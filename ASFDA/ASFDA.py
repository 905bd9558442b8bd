"""ASFDA: rank unlabeled volumes by DKD/ASD, label the query in the Segment Editor, fine-tune in-process.

This file only binds Qt widgets: the panel's behaviour is ``ASFDALib.app.workflow.Workflow`` and all MRML
conversion is ``ASFDALib.app.mrml``; both are tested outside Slicer. torch, MONAI and nibabel are imported
only inside functions, after the dependency check.
"""

import importlib
import os
import pathlib
import sys
from typing import Annotated

import qt
import slicer
import vtk

# The panel's own pure helpers: a package beside this file (Slicer puts a module's folder on sys.path).
from ASFDAPanelLib import state
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4

    def _(text):
        return text


_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)  # a source checkout: ASFDALib and Resources sit beside ASFDA/
if not os.path.isdir(os.path.join(_HERE, "ASFDALib")) and _ROOT not in sys.path:
    sys.path.append(_ROOT)

# The combo boxes' items: Slicer's QComboBox connector refills the widget from Choice([...]), in this order.
# Spelled out here (ASFDALib is imported only after the dependency check); a test checks STRATEGIES against
# ASFDALib.query.selection.STRATEGIES, GATES against the engine's, and all against the .ui's combo boxes.
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("asfda", "dkd", "asd", "fg-random", "random", "entropy", "epistemic", "coreset", "typiclust", "clasp-pe")
# What makes a pseudo-label reliable: ASFDALib.adaptation.recipe.RELIABILITY, the default first (a test checks).
GATES = ("rounds", "confidence", "flips")
# What Export writes: ASFDALib.models.formats.FORMATS, asfda export's --format (a test checks); the file dialog's
# name filter for each single-file format
EXPORT_FORMATS = ("bundle", "pt2", "torchscript")
EXPORT_FILTERS = {"pt2": "torch.export program (*.pt2)", "torchscript": "TorchScript (*.ts)"}


class ASFDA(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ASFDA")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["ASFDA developers"]
        self.parent.helpText = _(
            "Adapt a pre-trained segmentation foundation model to your scans with few labels: rank the "
            "unlabeled volumes (DKD + ASD), label the suggested ones starting from the model's prediction, "
            "then fine-tune with selective pseudo-labels. Everything is kept in the session folder."
        )
        self.parent.acknowledgementText = _(
            "Method: Yang, Marcus and Sotiras, arXiv 2509.10784. Built on MONAI, PyTorch and 3D Slicer."
        )


@parameterNodeWrapper
class ASFDAParameterNode:
    """The Setup and Fine-tune settings: the one source of truth, bound to the widgets by SlicerParameterName.

    Each field's type is what Slicer's GUI connector for its widget accepts
    (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py): ctkPathLineEdit <-> pathlib.Path (empty is
    Path(), read as "" by ASFDAPanelLib.state), QComboBox <-> Annotated[str, Choice], ctkSliderWidget <->
    float bounded by WithinRange, QSpinBox <-> int (its range comes from WithinRange, not from the .ui),
    QCheckBox <-> bool.
    """

    model: pathlib.Path
    card: pathlib.Path
    trust: bool = False
    images: pathlib.Path
    session: pathlib.Path
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    budget: Annotated[int, WithinRange(1, 500)] = 4
    alpha: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    strategy: Annotated[str, Choice(list(STRATEGIES))] = "asfda"
    iterations: Annotated[int, WithinRange(10, 100000)] = 200
    pseudo: bool = True
    pseudo_gate: Annotated[str, Choice(list(GATES))] = GATES[0]
    # not a session setting (ASFDAPanelLib.state.FIELDS): the panel offers the format that carries the session's model
    export_format: Annotated[str, Choice(list(EXPORT_FORMATS))] = EXPORT_FORMATS[0]


class ASFDAWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.effectFactory = None
        self._parameterNode = None
        self._guiTag = None  # connectGui's tag, for disconnectGui
        self._boundNode = None  # the MRML node the widgets are bound to (never bound twice)
        self._session = None  # the session path last acted on, to notice a change in the parameter node
        self._carried = None  # settings kept across File -> Close Scene: the session lives on disk
        self._reopened = None  # (settings before, settings after) reopening a session, until the path leaves it
        self._trustBeforeImport = False  # whether the user trusted the model file before a scene was imported
        self._shownRows = {}  # case -> cells now in the results table
        self._shownLog = None
        self._progressKind = None  # the kind of the job whose progress the panel shows
        self._exportOffered = None  # (session, format) last offered for Export: what the user picks after stays
        self.timer = qt.QTimer()
        self.timer.setInterval(200)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(_resource("UI/ASFDA.ui", self.resourcePath))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.logic = ASFDALogic()
        # The editor node first, so the selections made when the scene is set are kept (as Segment Editor does).
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.timer.connect("timeout()", self.onPoll)
        self.ui.rankButton.connect("clicked()", self.onRank)
        self.ui.nextCaseButton.connect("clicked()", self.onNextCase)
        self.ui.saveLabelButton.connect("clicked()", self.onSaveLabel)
        self.ui.finetuneButton.connect("clicked()", self.onFinetune)
        self.ui.finetuneAgainButton.connect("clicked()", self.onFinetuneAgain)
        self.ui.applyButton.connect("clicked()", self.onApply)
        self.ui.nextRoundButton.connect("clicked()", self.onNextRound)
        self.ui.exportButton.connect("clicked()", self.onExport)
        self.ui.installButton.connect("clicked()", self.onInstall)
        self.ui.resultsTable.connect("cellDoubleClicked(int,int)", self.onRowActivated)
        # As the Segment Editor module does: effects registered after this editor was made (ASFDA as the
        # startup module, an extension's effects) are added to its list.
        self.effectFactory = slicer.qSlicerSegmentEditorEffectFactory.instance()
        self.effectFactory.connect("effectRegistered(QString)", self.onEffectRegistered)
        # No handler on the session widget's currentPathChanged: the parameter node is the one source of
        # truth, and its ModifiedEvent (observed in setParameterNode) comes after the binding wrote the path.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartImportEvent, self.onSceneStartImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.initializeParameterNode()
        self.ui.dependencyLabel.text = self.logic.dependencyReport(install=False)
        self.refresh()

    def onEffectRegistered(self, name):
        self.ui.segmentEditorWidget.updateEffectList()

    def cleanup(self):
        self.timer.stop()
        self.removeObservers()
        if getattr(self, "effectFactory", None) is not None:  # a reloaded panel's editor takes its place
            self.effectFactory.disconnect("effectRegistered(QString)", self.onEffectRegistered)
            self.effectFactory = None
        # Reload or quitting Slicer: a job left running would hold the session's lock (a reloaded panel would
        # find the session in use by its own process) or be killed inside torch. Cancel it; what it
        # finished is kept, as with the Cancel button. An export has no Cancel: it is waited for, and were it
        # stopped anyway, it leaves nothing half-written under the chosen name (Workflow.start_export).
        flow = self.logic.flow if self.logic is not None else None
        if flow is not None and flow.busy:
            flow.cancel()
            flow.wait(timeout=60.0)

    def enter(self):
        self.initializeParameterNode()
        self.ui.segmentEditorWidget.installKeyboardShortcuts()

    def exit(self):
        # As the Segment Editor module does: no effect stays active and no shortcut stays installed while
        # another module is shown (they would act on views the user no longer sees as ours).
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()
        self._unbindGui()

    def onSceneStartClose(self, caller, event):
        if self._parameterNode is not None:
            self._carried = {name: getattr(self._parameterNode, name) for name in state.FIELDS}
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)
        editor.setSegmentationNode(None)
        editor.removeViewObservations()
        self.logic.forgetCases()  # their volume and segmentation nodes are being deleted
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        # The scene took the singleton editor node and our parameter node with it: make them again, and
        # carry the settings over so the session (and any running job) goes on in the new scene.
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.ui.segmentEditorWidget.updateWidgetFromMRML()
        self.initializeParameterNode(bind=self.parent.isEntered)
        self.refresh()

    def onSceneStartImport(self, caller, event):
        self._trustBeforeImport = self._parameterNode is not None and self._parameterNode.trust

    def onSceneEndImport(self, caller, event):
        # A scene saves the parameter node with it: a shared .mrb must not bring "trust this file" with it,
        # or pressing Rank would run the pickled or TorchScript code of a model the user never chose to trust.
        # What the user ticked themselves before the import stays.
        if self._parameterNode is not None and self._parameterNode.trust and not self._trustBeforeImport:
            self._parameterNode.trust = False
            if self.logic.flow is not None:
                self.logic.flow.message(
                    "the loaded scene asked to trust its model file: turned off; tick it again if you trust it"
                )

    def initializeParameterNode(self, bind=True):
        node = self.logic.getParameterNode()
        if self._parameterNode is None or self._parameterNode.parameterNode is not node:
            self.setParameterNode(ASFDAParameterNode(node))
            if self._carried is not None:
                self._storeSettings(self._carried)
                self._carried = None
        if bind:
            self._bindGui()
        self.onParameterChanged()  # a parameter node that already names a session (a loaded scene) reopens it

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None:
            self._unbindGui()
            node = self._parameterNode.parameterNode
            self.removeObserver(node, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
        self._parameterNode = parameterNode
        self._exportOffered = None  # a new node (a new scene) is offered the session's format again
        if parameterNode is not None:
            self.addObserver(parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)

    def _bindGui(self):
        node = self._parameterNode.parameterNode
        if self._boundNode is node:
            return
        self._guiTag = self._parameterNode.connectGui(self.ui)
        self._boundNode = node

    def _unbindGui(self):
        if self._parameterNode is not None and self._guiTag is not None:
            self._parameterNode.disconnectGui(self._guiTag)
            self._guiTag = None
            self._boundNode = None

    def _storeSettings(self, values):
        """Write settings into the parameter node (the widgets follow); a value it refuses is logged, not fatal."""
        p = self._parameterNode
        with slicer.util.NodeModify(p.parameterNode):
            for name, value in values.items():
                if getattr(p, name) == value:
                    continue
                try:
                    setattr(p, name, value)
                except (TypeError, ValueError) as exc:
                    if self.logic.flow is not None:
                        self.logic.flow.message(f"kept {name} = {getattr(p, name)!r}: the session's {value!r} {exc}")

    def onParameterChanged(self, caller=None, event=None):
        if self._parameterNode is None:
            return
        session = state.path_text(self._parameterNode.session)
        if session != self._session:
            self._session = session
            self.onSessionChanged()
        else:
            self.refresh()  # e.g. choosing the images folder enables Rank

    # --- actions: each defers to the workflow -------------------------------------------------------
    def _settings(self):
        from ASFDALib.app.workflow import PanelSettings

        return PanelSettings(**state.settings_values(self._parameterNode))

    def onSessionChanged(self):
        """A new session folder: if it holds a session, restore its settings into the parameter node; if it
        holds none and the last folder was a reopened session, put back the settings from before that.

        The path field reports every keystroke (ctkPathLineEdit emits currentPathChanged as the text is
        edited), so typing D:/s/liver2 passes through D:/s/liver: were that a session, its images folder
        and choices would otherwise stay for the new session, which would rank the wrong scans."""
        flow = self.logic.workflow(self._settings())
        if flow.busy:
            self.refresh()
            return
        p = self._parameterNode
        own = {name: getattr(p, name) for name in state.FIELDS if name != "session"}
        if flow.reopen():
            before = self._reopened[0] if self._reopened is not None else own
            self._storeSettings(state.parameter_values(flow.settings))
            self._reopened = (before, {name: getattr(p, name) for name in before})
        elif self._reopened is not None:
            # what the user changed since is theirs and stays; what the session set goes back
            before, applied = self._reopened
            self._reopened = None
            self._storeSettings({n: v for n, v in before.items() if getattr(p, n) == applied[n]})
        self.refresh()

    def onRank(self):
        if self.logic.flow is not None and self.logic.flow.busy:
            self.logic.flow.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Ranking could not start"), waitCursor=True):
            self.logic.ensureDependencies()
            self.logic.workflow(self._settings()).start_rank()
            self.timer.start()
        self.refresh()

    def onNextCase(self):
        with slicer.util.tryWithErrorDisplay(_("Could not open the next case")):
            name = self.logic.flow.next_case()
            if name is None:
                self.ui.labelStatusLabel.text = self.logic.flow.log[-1]
            else:
                self._open(name)
        self.refresh()

    def onRowActivated(self, row, column):
        with slicer.util.tryWithErrorDisplay(_("Could not open the case")):
            self._open(self.ui.resultsTable.item(row, 1).text())
        self.refresh()

    def _open(self, name):
        """A case already in the scene is shown as it is (edits kept); otherwise the worker reads it and its
        starting label (saved label, prediction file or a fresh prediction) and onPoll loads it."""
        loaded = self.logic.loadedCase(name)
        if loaded is not None:
            self._show(name, *loaded, _("its open segmentation, edits kept"))
            return
        self.logic.workflow(self._settings()).start_open(name)
        self.ui.labelStatusLabel.text = _("Opening {name}…").format(name=name)
        self.timer.start()

    def _show(self, name, volume, segmentation, source):
        self.ui.segmentEditorWidget.setSegmentationNode(segmentation)
        self.ui.segmentEditorWidget.setSourceVolumeNode(volume)
        self.ui.labelStatusLabel.text = _("Labelling {name} (from {source}): correct it, then Save label.").format(
            name=name, source=source
        )

    def onSaveLabel(self):
        with slicer.util.tryWithErrorDisplay(_("The label could not be saved"), waitCursor=True):
            nifti, seg = self.logic.saveCurrentLabel(self.ui.segmentEditorWidget.segmentationNode())
            self.ui.labelStatusLabel.text = _("Saved {a} and {b}").format(a=nifti.name, b=seg.name)
        self.refresh()

    def onFinetune(self):
        """Fine-tune, or when this round has a run, continue it (resume if interrupted, extend if finished)."""
        if self.logic.flow is not None and self.logic.flow.busy:
            self.logic.flow.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning could not start")):
            flow = self.logic.workflow(self._settings())
            flow.start_finetune(flow.finetune_mode())
            self.timer.start()
        self.refresh()

    def onFinetuneAgain(self):
        """Train this round again from its start; the engine keeps the earlier run aside."""
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning could not start")):
            flow = self.logic.workflow(self._settings())
            flow.start_finetune(flow.finetune_mode(again=True))
            self.timer.start()
        self.refresh()

    def onApply(self):
        """Predict the remaining volumes into the session's predictions folder, in the worker."""
        if self.logic.flow is not None and self.logic.flow.busy:
            self.logic.flow.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Prediction could not start")):
            self.logic.workflow(self._settings()).start_apply()
            self.timer.start()
        self.refresh()

    def onNextRound(self):
        with slicer.util.tryWithErrorDisplay(_("Next round could not start")):
            self.logic.workflow(self._settings()).start_next_round()
            self.timer.start()
        self.refresh()

    def onExport(self):
        """Export in the format chosen beside the button: a bundle into a new or empty folder, a program (.pt2,
        TorchScript) to a new file. It runs in the worker (tracing a large network takes minutes) and onPoll shows
        what it wrote, or what asfda export would refuse, which the workflow refuses before the model loads."""
        with slicer.util.tryWithErrorDisplay(_("Export could not start")):
            flow = self.logic.workflow(self._settings())
            fmt = self._parameterNode.export_format
            start = str(flow.export_suggestion(fmt))
            if fmt == "bundle":
                caption = _("Export the adapted model as a MONAI bundle: choose a new or empty folder")
                target = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), caption, start)
            else:
                caption = _("Export the adapted model as {format}").format(format=EXPORT_FILTERS[fmt])
                target = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), caption, start, EXPORT_FILTERS[fmt])
            if target:
                flow.start_export(target, fmt)
                self.timer.start()
        self.refresh()

    def onInstall(self):
        with slicer.util.tryWithErrorDisplay(_("Dependencies could not be installed"), waitCursor=True):
            self.ui.dependencyLabel.text = self.logic.dependencyReport(install=True)
        self.refresh()

    # --- reflecting the workflow --------------------------------------------------------------------
    def onPoll(self):
        flow = self.logic.flow
        if flow is None:
            self.timer.stop()
            return
        flow.poll()
        opened = flow.take_opened()
        if opened is not None:
            with slicer.util.tryWithErrorDisplay(_("Could not load the case")):
                volume, segmentation = self.logic.showCase(opened)
                self._show(opened.name, volume, segmentation, opened.source)
        if not flow.busy:
            self.timer.stop()
        self.refresh()
        ended = flow.take_export()  # shown last: the message box's own event loop runs the timer meanwhile
        if ended is not None:
            exported, error = ended
            if exported is not None:
                slicer.util.infoDisplay(exported.message, windowTitle=_("Model exported"))
            else:
                slicer.util.errorDisplay(error, windowTitle=_("Export failed"))

    def refresh(self):
        from ASFDALib.app.workflow import BUTTON_ACTIONS

        if self._parameterNode is None:  # between scene close and its re-creation
            return
        flow = self.logic.workflow(self._settings())
        # Export offers the format that carries the session's model (pt2 for an nnU-Net residual encoder, which no
        # bundle carries), once per session and model: a format the user picks after that stays
        offered = (self._session, flow.export_format())
        if offered != self._exportOffered:
            self._exportOffered = offered
            self._parameterNode.export_format = offered[1]
        for name, action in BUTTON_ACTIONS.items():
            enabled, why = flow.check(action)
            getattr(self.ui, name).enabled = enabled
            getattr(self.ui, name).toolTip = why
        ranking = flow.busy and flow.job.kind == "ranking"
        training = flow.busy and flow.job.kind == "fine-tuning"
        predicting = flow.busy and flow.job.kind == "predicting"
        exporting = flow.busy and flow.job.kind == "exporting"
        self.ui.rankButton.enabled = True if ranking else self.ui.rankButton.enabled
        self.ui.rankButton.text = _("Cancel") if ranking else _("Rank volumes")
        self.ui.applyButton.enabled = True if predicting else self.ui.applyButton.enabled
        self.ui.applyButton.text = _("Cancel") if predicting else _("Predict remaining")
        self.ui.exportButton.text = _("Exporting…") if exporting else _("Export model")  # no Cancel: see start_export
        # With a run in this round the two choices are explicit: continue it, or train again from the start.
        run = flow.finetune_run()
        self.ui.finetuneButton.enabled = True if training else self.ui.finetuneButton.enabled
        self.ui.finetuneButton.text = (
            _("Cancel") if training else _("Fine-tune") if run is None else _("Continue the last run")
        )
        self.ui.finetuneAgainButton.visible = run is not None
        self.ui.pseudoGateComboBox.enabled = self._parameterNode.pseudo  # the gate only matters with pseudo-labels
        self.ui.finetuneRunLabel.text = flow.run_text()
        if flow.busy:  # progress goes to the section of the job that runs, and stays there when it ends
            self._progressKind = flow.job.kind
        bar, label = (
            (self.ui.finetuneProgressBar, self.ui.finetuneLabel)
            if self._progressKind == "fine-tuning"
            else (self.ui.progressBar, self.ui.progressLabel)
        )
        bar.maximum = 0 if exporting else 100  # a busy bar: an export has no steps to count
        bar.value = int(100 * flow.progress)
        label.text = flow.progress_text
        log = "\n".join(flow.log[-200:])
        if log != self._shownLog:  # setting it again would reset the user's scroll position
            self._shownLog = log
            self.ui.logTextEdit.setPlainText(log)
        self._fillTable(flow.rows)

    def _fillTable(self, rows):
        """Update the cells that changed in place (selection and sort order stay); rebuild for a new ranking."""
        table = self.ui.resultsTable
        changes = state.table_plan(self._shownRows, rows)
        if changes is None:
            table.setSortingEnabled(False)
            table.clearContents()
            table.setRowCount(len(rows))
            for r, row in enumerate(rows):
                cells = state.row_cells(row)
                for c in range(len(state.COLUMNS)):
                    item = qt.QTableWidgetItem()
                    item.setData(qt.Qt.DisplayRole, state.display_value(c, cells[c]))
                    if cells[state.SELECTED]:
                        item.setBackground(qt.QColor(255, 236, 200))
                    table.setItem(r, c, item)
            table.setSortingEnabled(True)
            self._shownRows = {cells[1]: cells for cells in map(state.row_cells, rows)}
            return
        if not changes:
            return
        # Rows may have been sorted by the user: find each case's current row by its Case cell.
        where = {table.item(r, 1).text(): r for r in range(table.rowCount) if table.item(r, 1) is not None}
        table.setSortingEnabled(False)  # a sorted table would move rows while we write them
        for case, column, value in changes:
            r = where[case]
            if column == state.SELECTED:
                color = qt.QBrush(qt.QColor(255, 236, 200)) if value else qt.QBrush()
                for c in range(len(state.COLUMNS)):
                    table.item(r, c).setBackground(color)
            else:
                table.item(r, column).setData(qt.Qt.DisplayRole, state.display_value(column, value))
        table.setSortingEnabled(True)  # re-applies the user's sort column and order
        self._shownRows = {cells[1]: cells for cells in map(state.row_cells, rows)}


class ASFDALogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue: dependencies, MRML nodes for the current case; the rest is the workflow."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.flow = None
        self.current = None  # (case name, volume node, segmentation node) being labelled
        self.loaded = {}  # case name -> (volume node, segmentation node): only the cases the user opened

    def getParameterNode(self):
        return ScriptedLoadableModuleLogic.getParameterNode(self)

    def workflow(self, settings):
        from ASFDALib.app.workflow import Workflow

        if self.flow is not None and self.flow.busy:
            return self.flow  # a running job keeps its session and settings until it ends
        if self.flow is None or self.flow.settings.session != settings.session:
            self.flow = Workflow(settings)
        else:
            self.flow.settings = settings
        return self.flow

    def segmentEditorNode(self):
        node = slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("SegmentEditor")
            node = slicer.mrmlScene.AddNode(node)
        return node

    # --- dependencies: torch through the PyTorch extension, the rest with one confirmation ----------
    def dependencyReport(self, install=False):
        from ASFDAPanelLib import dependencies

        if install:
            self.ensureDependencies()
        text = dependencies.report()
        if dependencies.torch_problem(dependencies.installed_version("torch")) is not None:
            return text
        try:
            import torch

            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
        except Exception as exc:  # noqa: BLE001 - a broken torch on Windows raises OSError (a DLL), not ImportError
            device = f"torch not importable ({type(exc).__name__}: {exc}); press Check / install"
        return text + f" — {device}"

    def ensureDependencies(self):
        """torch >= the floor from the PyTorch extension; the rest checked by version, installed with torch pinned."""
        import tempfile

        from ASFDAPanelLib import dependencies

        torchVersion = dependencies.installed_version("torch")
        if torchVersion is None:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(dependencies.torch_problem(None)) from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=True, torchVersionRequirement=dependencies.TORCH_REQUIREMENT
            )
            if torch is None:
                raise RuntimeError(_("PyTorch is required."))
            importlib.invalidate_caches()
            torchVersion = dependencies.installed_version("torch")
        problem = dependencies.torch_problem(torchVersion)
        if problem:
            raise RuntimeError(problem)
        missing = dependencies.unmet()
        if not missing:
            return
        # pip must never move the PyTorch extension's torch build: it is pinned in a constraints file.
        constraints = dependencies.write_constraints(tempfile.mkdtemp(prefix="asfda-pip-"), torchVersion)
        try:
            from slicer.packaging import pip_ensure  # Slicer >= 5.12: checks versions and asks once
        except ImportError:
            pip_ensure = None
        if pip_ensure is not None:
            pip_ensure(list(dependencies.REQUIREMENTS), constraints=str(constraints), requester="ASFDA")
        elif slicer.app.testingEnabled() or slicer.util.confirmOkCancelDisplay(
            _("ASFDA needs: {p}. Install them now?").format(p=", ".join(missing))
        ):
            slicer.util.pip_install(dependencies.pip_arguments(missing, constraints))
        else:
            raise RuntimeError(_("ASFDA needs: {p}.").format(p=", ".join(missing)))
        importlib.invalidate_caches()
        still = dependencies.unmet()
        if still:
            raise RuntimeError(
                _("Still missing or too old after installing: {p}. Restart Slicer and press Check / install.").format(
                    p=", ".join(still)
                )
            )

    # --- cases ---------------------------------------------------------------------------------------
    def showCase(self, opened):
        """Nodes for a case the worker prepared (workflow.OpenedCase): MRML work only, on the GUI thread."""
        from ASFDALib.app import mrml

        volumeNode = mrml.volume_to_node(slicer.mrmlScene, opened.array, opened.affine, opened.name)
        segmentation = mrml.labelmap_to_segmentation(
            slicer.mrmlScene, opened.label, opened.affine, self.flow.class_names(), volumeNode, f"{opened.name} label"
        )
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        self.loaded[opened.name] = (volumeNode, segmentation)
        self.current = (opened.name, volumeNode, segmentation)
        return volumeNode, segmentation

    def loadedCase(self, name):
        """The nodes of a case opened before and still in the scene (the user's edits in them), else None."""
        nodes = self.loaded.get(name)
        if nodes is None or any(n.GetScene() is None for n in nodes):  # deleted by the user or a scene close
            self.loaded.pop(name, None)
            return None
        self.current = (name, *nodes)
        return nodes

    def forgetCases(self):
        self.current = None
        self.loaded = {}

    def saveCurrentLabel(self, shown=None):
        """Save the case whose segmentation the Segment Editor shows (``shown``; the last opened one when not
        given): the user may have picked another of our cases, or none, in the editor's own selectors."""
        from ASFDALib.app import mrml

        if shown is not None:
            name = next((n for n, (_v, s) in self.loaded.items() if s is shown), None)
            if name is None:
                raise RuntimeError(
                    _(
                        "The Segment Editor shows {seg}, which is no case of this session: open one with Next case"
                    ).format(seg=shown.GetName())
                )
            self.current = (name, *self.loaded[name])
        if self.current is None:
            raise RuntimeError(_("Open a case first (Next case)"))
        name, volumeNode, segmentation = self.current
        if volumeNode.GetScene() is None or segmentation.GetScene() is None:
            self.loaded.pop(name, None)
            self.current = None
            raise RuntimeError(
                _("{name}'s volume or segmentation was deleted: open the case again (double-click its row)").format(
                    name=name
                )
            )
        label = mrml.segmentation_to_labelmap(segmentation, volumeNode, self.flow.class_names())
        affine = mrml.volume_affine(volumeNode)
        return self.flow.save_label(name, label, affine, lambda path: mrml.save_segmentation(segmentation, path))


def _missingDependencies():
    """Why ASFDA's engine cannot run in this Slicer (torch, MONAI, ...), in a line; "" when it can."""
    from ASFDAPanelLib import dependencies

    problem = dependencies.torch_problem(dependencies.installed_version("torch"))
    if problem:
        return problem
    missing = dependencies.unmet()
    return f"ASFDA needs {', '.join(missing)}: press Check / install in the ASFDA module" if missing else ""


def _resource(relative, resourcePath):
    """Installed modules keep Resources beside the module; a source checkout keeps it at the top level."""
    path = resourcePath(relative)
    return path if os.path.exists(path) else os.path.join(_ROOT, "Resources", relative)


class ASFDATest(ScriptedLoadableModuleTest):
    """Synthetic volumes only, no network: rank, open a case, save a label, a short fine-tune, predict the
    remaining volumes and open one of them, all through the workflow's worker (under a minute)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        missing = _missingDependencies()
        if missing:
            # Slicer's pip_ensure installs nothing under --testing, and the PyTorch extension installs torch only
            # when asked: without them the test cannot run, so it says why instead of failing in the worker.
            self.delayDisplay(f"ASFDA self-test skipped: {missing}")
            if not slicer.app.testingEnabled():  # Reload and Test: shown, not raised as a failure
                slicer.util.warningDisplay(f"ASFDA self-test skipped: {missing}")
                return
            self.skipTest(missing)
        self.test_rank_label_finetune_apply()

    def test_rank_label_finetune_apply(self):
        import tempfile

        import numpy as np

        from ASFDALib.app.workflow import PanelSettings
        from ASFDALib.bench.phantoms import domain_config, make_phantom

        self.delayDisplay("Creating synthetic target volumes")
        work = tempfile.mkdtemp(prefix="asfda_selftest_")
        images = os.path.join(work, "images")
        os.makedirs(images)
        truths = {}
        for i in range(4):
            image, label, affine = make_phantom(900 + i, domain_config("mri"))
            node = slicer.util.addVolumeFromArray(image.transpose(2, 1, 0).copy(), name=f"synthetic_{i}")
            node.SetSpacing(*np.diag(affine)[:3])
            node.SetOrigin(*affine[:3, 3])
            slicer.util.saveNode(node, os.path.join(images, f"synthetic_{i}.nii.gz"))
            truths[f"synthetic_{i}.nii.gz"] = label
        logic = ASFDALogic()
        flow = logic.workflow(
            PanelSettings(
                images=images,
                session=os.path.join(work, "session"),
                budget=1,
                iterations=10,
                pseudo_iterations=5,
                device="cpu",
                workers=0,  # as the panel: no DataLoader processes forked inside Slicer
            )
        )
        self.delayDisplay("Ranking")
        flow.start_rank()
        flow.wait()
        self.assertEqual(len(flow.query), 1, flow.log[-5:])  # the worker's errors are in its log
        name = flow.next_case()
        flow.start_open(name)  # the prediction runs in the worker; only showing it touches the scene
        flow.wait()
        volumeNode, segmentation = logic.showCase(flow.take_opened())
        self.assertGreater(segmentation.GetSegmentation().GetNumberOfSegments(), 0, flow.log[-5:])
        self.delayDisplay("Saving a label")
        nifti, seg = logic.saveCurrentLabel()
        self.assertTrue(os.path.exists(nifti) and os.path.exists(seg))
        self.delayDisplay("Fine-tuning")
        flow.start_finetune(flow.finetune_mode())
        flow.wait()
        self.assertTrue(flow.check("apply")[0], flow.log[-5:])
        self.assertTrue(flow.last_run.startswith("round 1 trained"), flow.last_run)
        self.delayDisplay("Predicting the remaining volumes into the session")
        volumes = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
        flow.start_apply()
        flow.wait()
        predicted = flow.predictions()
        self.assertEqual(len(predicted), 3, flow.log[-5:])
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), volumes)
        other = sorted(predicted)[0]
        flow.start_open(other)
        flow.wait()
        opened = flow.take_opened()
        self.assertEqual(opened.source, f"prediction {predicted[other].name}")
        logic.showCase(opened)
        self.delayDisplay("Test passed")
