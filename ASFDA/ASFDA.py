"""ASFDA: rank unlabeled volumes by DKD/ASD, label the query in the Segment Editor, fine-tune in-process.

This file only binds Qt widgets: the panel's behaviour is ``ASFDALib.app.workflow.Workflow`` and all MRML
conversion is ``ASFDALib.app.mrml``; both are tested outside Slicer. torch, MONAI and nibabel are imported
only inside functions, after the dependency check.
"""

import importlib.util
import os
import sys

import qt
import slicer
from slicer.parameterNodeWrapper import parameterNodeWrapper
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

REQUIREMENTS = ["monai>=1.4", "nibabel>=5.0", "einops>=0.6", "scipy>=1.10", "pyyaml>=6.0", "rich>=13.0"]


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
    model: str = ""
    card: str = ""
    trust: bool = False
    images: str = ""
    session: str = ""
    device: str = "auto"
    budget: int = 4
    alpha: float = 0.5
    strategy: str = "asfda"
    iterations: int = 200
    pseudo: bool = True


class ASFDAWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._guiConnection = None
        self.timer = qt.QTimer()
        self.timer.setInterval(200)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(_resource("UI/ASFDA.ui", self.resourcePath))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ASFDALogic()
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.timer.connect("timeout()", self.onPoll)
        self.ui.rankButton.connect("clicked()", self.onRank)
        self.ui.nextCaseButton.connect("clicked()", self.onNextCase)
        self.ui.saveLabelButton.connect("clicked()", self.onSaveLabel)
        self.ui.finetuneButton.connect("clicked()", self.onFinetune)
        self.ui.applyButton.connect("clicked()", self.onApply)
        self.ui.nextRoundButton.connect("clicked()", self.onNextRound)
        self.ui.exportButton.connect("clicked()", self.onExport)
        self.ui.installButton.connect("clicked()", self.onInstall)
        self.ui.resultsTable.connect("cellDoubleClicked(int,int)", self.onRowActivated)
        self.ui.sessionPathLineEdit.connect("currentPathChanged(QString)", self.onSessionChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.initializeParameterNode()
        self.ui.dependencyLabel.text = self.logic.dependencyReport(install=False)
        self.refresh()

    def cleanup(self):
        self.timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode and self._guiConnection:
            self._parameterNode.disconnectGui(self._guiConnection)
            self._guiConnection = None

    def onSceneStartClose(self, caller, event):
        self.exit()

    def initializeParameterNode(self):
        self._parameterNode = ASFDAParameterNode(self.logic.getParameterNode())
        if self._guiConnection is None:
            self._guiConnection = self._parameterNode.connectGui(self.ui)

    # --- actions: each defers to the workflow -------------------------------------------------------
    def _settings(self):
        from ASFDALib.app.workflow import PanelSettings

        p = self._parameterNode
        return PanelSettings(
            model=p.model,
            card=p.card,
            trust=p.trust,
            images=p.images,
            session=p.session,
            device=p.device,
            budget=p.budget,
            alpha=p.alpha,
            strategy=p.strategy,
            iterations=p.iterations,
            pseudo_iterations=p.iterations,
            pseudo=p.pseudo,
        )

    def onSessionChanged(self, path):
        self.logic.workflow(self._settings()).reopen()
        self.refresh()

    def onRank(self):
        if self.logic.flow.busy:
            self.logic.flow.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Ranking could not start"), waitCursor=True):
            self.logic.ensureDependencies()
            self.logic.workflow(self._settings()).start_rank()
            self.timer.start()
        self.refresh()

    def onNextCase(self):
        with slicer.util.tryWithErrorDisplay(_("Could not open the next case"), waitCursor=True):
            name = self.logic.flow.next_case()
            if name is None:
                self.ui.labelStatusLabel.text = self.logic.flow.log[-1]
            else:
                self._open(name)
        self.refresh()

    def onRowActivated(self, row, column):
        with slicer.util.tryWithErrorDisplay(_("Could not open the case"), waitCursor=True):
            self._open(self.ui.resultsTable.item(row, 1).text())

    def _open(self, name):
        volume, segmentation = self.logic.loadCase(name)
        self.ui.segmentEditorWidget.setSegmentationNode(segmentation)
        self.ui.segmentEditorWidget.setSourceVolumeNode(volume)
        self.ui.labelStatusLabel.text = _("Labelling {name}: correct the model's prediction, then Save label.").format(
            name=name
        )

    def onSaveLabel(self):
        with slicer.util.tryWithErrorDisplay(_("The label could not be saved"), waitCursor=True):
            nifti, seg = self.logic.saveCurrentLabel()
            self.ui.labelStatusLabel.text = _("Saved {a} and {b}").format(a=nifti.name, b=seg.name)
        self.refresh()

    def onFinetune(self):
        if self.logic.flow.busy:
            self.logic.flow.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning could not start")):
            self.logic.workflow(self._settings()).start_finetune(resume=True)
            self.timer.start()
        self.refresh()

    def onApply(self):
        with slicer.util.tryWithErrorDisplay(_("Prediction failed"), waitCursor=True):
            self.logic.applyRemaining()

    def onNextRound(self):
        with slicer.util.tryWithErrorDisplay(_("Next round could not start")):
            self.logic.workflow(self._settings()).start_next_round()
            self.timer.start()
        self.refresh()

    def onExport(self):
        folder = qt.QFileDialog.getExistingDirectory(None, _("Export the adapted model as a MONAI bundle"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("Export failed"), waitCursor=True):
                path = self.logic.flow.export(folder)
                slicer.util.infoDisplay(_("MONAI bundle written to {path}").format(path=path))

    def onInstall(self):
        with slicer.util.tryWithErrorDisplay(_("Dependencies could not be installed"), waitCursor=True):
            self.ui.dependencyLabel.text = self.logic.dependencyReport(install=True)
        self.refresh()

    # --- reflecting the workflow --------------------------------------------------------------------
    def onPoll(self):
        flow = self.logic.flow
        flow.poll()
        if not flow.busy:
            self.timer.stop()
        self.refresh()

    def refresh(self):
        from ASFDALib.app.workflow import BUTTON_ACTIONS

        flow = self.logic.workflow(self._settings())
        for name, action in BUTTON_ACTIONS.items():
            enabled, why = flow.check(action)
            getattr(self.ui, name).enabled = enabled
            getattr(self.ui, name).toolTip = why
        ranking = flow.busy and flow.job.kind == "ranking"
        training = flow.busy and flow.job.kind == "fine-tuning"
        self.ui.rankButton.enabled = True if ranking else self.ui.rankButton.enabled
        self.ui.rankButton.text = _("Cancel") if ranking else _("Rank volumes")
        self.ui.finetuneButton.enabled = True if training else self.ui.finetuneButton.enabled
        self.ui.finetuneButton.text = _("Cancel") if training else _("Fine-tune")
        bar, label = (
            (self.ui.finetuneProgressBar, self.ui.finetuneLabel)
            if training
            else (self.ui.progressBar, self.ui.progressLabel)
        )
        bar.value = int(100 * flow.progress)
        label.text = flow.progress_text
        self.ui.logTextEdit.setPlainText("\n".join(flow.log[-200:]))
        self._fillTable(flow.rows)

    def _fillTable(self, rows):
        table = self.ui.resultsTable
        table.setSortingEnabled(False)
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, value in enumerate((row.rank, row.case, row.score, row.dkd, row.asd, row.status)):
                item = qt.QTableWidgetItem()
                item.setData(qt.Qt.DisplayRole, float(value) if c in (0, 2, 3, 4) and value else value)
                if row.selected:
                    item.setBackground(qt.QColor(255, 236, 200))
                table.setItem(r, c, item)
        table.setSortingEnabled(True)


class ASFDALogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue: dependencies, MRML nodes for the current case; the rest is the workflow."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.flow = None
        self.current = None  # (case name, volume node, segmentation node)

    def getParameterNode(self):
        return ScriptedLoadableModuleLogic.getParameterNode(self)

    def workflow(self, settings):
        from ASFDALib.app.workflow import Workflow

        if self.flow is None or self.flow.settings.session != settings.session:
            self.flow = Workflow(settings)
        elif not self.flow.busy:
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
        if install:
            self.ensureDependencies()
        from importlib.metadata import PackageNotFoundError, version

        parts = []
        for package in ("torch", "monai", "nibabel"):
            try:
                parts.append(f"{package} {version(package)}")
            except PackageNotFoundError:
                parts.append(f"{package} missing")
        try:
            import torch

            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
        except ImportError:
            device = "torch not installed"
        return ", ".join(parts) + f" — {device}"

    def ensureDependencies(self):
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(
                    _("Install the PyTorch extension from the Extensions Manager, then restart.")
                ) from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=">=2.2")
            if torch is None:
                raise RuntimeError(_("PyTorch is required."))
        if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):
            slicer.packaging.pip_ensure(REQUIREMENTS, requester="ASFDA")
            return
        missing = [r for r in REQUIREMENTS if not _installed(r)]
        if missing and (
            slicer.app.testingEnabled()
            or slicer.util.confirmOkCancelDisplay(_("ASFDA needs: {p}. Install them now?").format(p=", ".join(missing)))
        ):
            slicer.util.pip_install(missing)

    # --- cases ---------------------------------------------------------------------------------------
    def loadCase(self, name):
        from ASFDALib.app import mrml

        volume = self.flow.case_volume(name)
        volumeNode = mrml.volume_to_node(slicer.mrmlScene, volume.array, volume.affine, name)
        prefill = self.flow.prefill(name)
        segmentation = mrml.labelmap_to_segmentation(
            slicer.mrmlScene, prefill, volume.affine, self.flow.class_names(), volumeNode, f"{name} label"
        )
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        self.current = (name, volumeNode, segmentation)
        return volumeNode, segmentation

    def saveCurrentLabel(self):
        from ASFDALib.app import mrml

        if self.current is None:
            raise RuntimeError(_("Open a case first (Next case)"))
        name, volumeNode, segmentation = self.current
        label = mrml.segmentation_to_labelmap(segmentation, volumeNode, self.flow.class_names())
        _array, affine = mrml.node_to_volume(volumeNode)
        return self.flow.save_label(name, label, affine, lambda path: mrml.save_segmentation(segmentation, path))

    def applyRemaining(self):
        from ASFDALib.app import mrml

        nodes = []
        for name, label in self.flow.apply().items():
            volume = self.flow.case_volume(name)
            volumeNode = mrml.volume_to_node(slicer.mrmlScene, volume.array, volume.affine, name)
            nodes.append(
                mrml.labelmap_to_segmentation(
                    slicer.mrmlScene, label, volume.affine, self.flow.class_names(), volumeNode, f"{name} prediction"
                )
            )
        return nodes


def _installed(requirement):
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(requirement.split(">=")[0])
        return True
    except PackageNotFoundError:
        return False


def _resource(relative, resourcePath):
    """Installed modules keep Resources beside the module; a source checkout keeps it at the top level."""
    path = resourcePath(relative)
    return path if os.path.exists(path) else os.path.join(_ROOT, "Resources", relative)


class ASFDATest(ScriptedLoadableModuleTest):
    """Synthetic volumes only, no network: rank, save a label, a short fine-tune, apply (under a minute)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
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
            )
        )
        self.delayDisplay("Ranking")
        flow.start_rank()
        flow.wait()
        self.assertEqual(len(flow.query), 1)
        name = flow.next_case()
        volumeNode, segmentation = logic.loadCase(name)
        self.assertGreater(segmentation.GetSegmentation().GetNumberOfSegments(), 0)
        self.delayDisplay("Saving a label")
        nifti, seg = logic.saveCurrentLabel()
        self.assertTrue(os.path.exists(nifti) and os.path.exists(seg))
        self.delayDisplay("Fine-tuning")
        flow.start_finetune()
        flow.wait()
        self.assertTrue(flow.check("apply")[0], flow.log[-3:])
        predictions = logic.applyRemaining()
        self.assertEqual(len(predictions), 3)
        self.delayDisplay("Test passed")
