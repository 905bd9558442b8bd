"""Stands in for Slicer's MRML widgets used by ASFDA.ui and the module panel: ``qMRMLWidget``,
``qMRMLSegmentEditorWidget``, the effect factory it lists effects from, and the
``qSlicerScriptedLoadableModuleWidget`` a module widget lives in.

The segment editor keeps no state of its own: like the real one it reads and writes the segment editor
node (real MRML from slicer-core), and it refuses what the real one refuses with an error in Slicer's
log (a node from another scene, no editor node, a source volume before a segmentation), so a panel that
loses its editor node after File -> Close Scene fails here. Effects are names only: no views, no drawing.
"""

from __future__ import annotations

from PySide6.QtCore import Property, QObject, Signal
from PySide6.QtWidgets import QVBoxLayout, QWidget

from .qt import PythonQtObject


class qMRMLWidget(PythonQtObject, QWidget):  # noqa: N801 - the Slicer class name
    """A widget with a scene: ``setMRMLScene`` emits ``mrmlSceneChanged(vtkMRMLScene*)``."""

    mrmlSceneChanged = Signal(object)  # noqa: N815

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene) -> None:  # noqa: N802
        if scene is not self._scene:
            self._scene = scene
            self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):  # noqa: N802
        return self._scene


class qSlicerSegmentEditorEffectFactory(PythonQtObject, QObject):  # noqa: N801
    """``slicer.qSlicerSegmentEditorEffectFactory``: the singleton effects are registered with, emitting
    ``effectRegistered(QString)`` for each (an editor made before then does not list it by itself)."""

    effectRegistered = Signal(str)  # noqa: N815
    _instance = None

    def __init__(self):
        super().__init__()
        self.registered = ["Paint", "Draw", "Erase", "Threshold"]  # Slicer's built-in effects, in part

    @classmethod
    def instance(cls):
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def registerEffect(self, name: str) -> None:  # noqa: N802 - takes an effect object in Slicer
        self.registered.append(name)
        self.effectRegistered.emit(name)


class qMRMLSegmentEditorWidget(qMRMLWidget):  # noqa: N801
    """The embedded Segment Editor: segmentation and source volume live in its segment editor node."""

    segmentationNodeChanged = Signal(object)  # noqa: N815
    sourceVolumeNodeChanged = Signal(object)  # noqa: N815
    masterVolumeNodeChanged = Signal(object)  # noqa: N815
    currentSegmentIDChanged = Signal(str)  # noqa: N815

    def __init__(self, parent=None):
        super().__init__(parent)
        self._editorNode = None
        self.activeEffect = None
        self.shortcutsInstalled = False
        self.effects = list(qSlicerSegmentEditorEffectFactory.instance().registered)

    def setMRMLSegmentEditorNode(self, node) -> None:  # noqa: N802
        self._editorNode = node

    def mrmlSegmentEditorNode(self):  # noqa: N802
        return self._editorNode

    def _node(self, action: str):
        node = self._editorNode
        if node is None or node.GetScene() is None or node.GetScene() is not self.mrmlScene():
            raise RuntimeError(f"qMRMLSegmentEditorWidget::{action}: Invalid segment editor parameter set node")
        return node

    def _check_scene(self, node, action: str) -> None:
        if node is not None and node.GetScene() is not self.mrmlScene():
            raise RuntimeError(f"qMRMLSegmentEditorWidget::{action}: the node is not in the widget's scene")

    def setSegmentationNode(self, node) -> None:  # noqa: N802
        if node is None and self._editorNode is None:
            return
        self._check_scene(node, "setSegmentationNode")
        self._node("setSegmentationNode").SetAndObserveSegmentationNode(node)
        self.segmentationNodeChanged.emit(node)

    def segmentationNode(self):  # noqa: N802
        return self._editorNode.GetSegmentationNode() if self._editorNode is not None else None

    def setSourceVolumeNode(self, node) -> None:  # noqa: N802
        """As vtkSlicerSegmentEditorLogic::SetSourceVolumeNode: nothing (an error in the log) before a
        segmentation is set, and only a scalar volume (any other node sets none)."""
        import slicer

        self._check_scene(node, "setSourceVolumeNode")
        editor = self._node("setSourceVolumeNode")
        if editor.GetSegmentationNode() is None:
            return  # "need to set segment editor and segmentation nodes first"
        volume = node if isinstance(node, slicer.vtkMRMLScalarVolumeNode) else None
        editor.SetAndObserveSourceVolumeNode(volume)
        self.sourceVolumeNodeChanged.emit(volume)

    def sourceVolumeNode(self):  # noqa: N802
        return self._editorNode.GetSourceVolumeNode() if self._editorNode is not None else None

    def setActiveEffect(self, effect) -> None:  # noqa: N802
        self.activeEffect = effect

    def installKeyboardShortcuts(self) -> None:  # noqa: N802
        self.shortcutsInstalled = True

    def uninstallKeyboardShortcuts(self) -> None:  # noqa: N802
        self.shortcutsInstalled = False

    def removeViewObservations(self) -> None:  # noqa: N802
        pass  # no views here

    def updateEffectList(self) -> None:  # noqa: N802
        """The real widget lists the effects registered by then; later ones only once this is called."""
        self.effects = list(qSlicerSegmentEditorEffectFactory.instance().registered)

    def updateWidgetFromMRML(self) -> None:  # noqa: N802
        if self._editorNode is not None:
            self._node("updateWidgetFromMRML")


class qSlicerScriptedLoadableModuleWidget(PythonQtObject, QWidget):  # noqa: N801
    """The module panel's widget a ScriptedLoadableModuleWidget is built in: a vertical layout, and
    ``isEntered``, set by ``enter()``/``exit()`` around the Python widget's own enter()/exit()."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setLayout(QVBoxLayout())
        self._entered = False
        self._python = None

    def _get_entered(self) -> bool:
        return self._entered

    isEntered = Property(bool, _get_entered)  # noqa: N815

    def setPythonWidget(self, widget) -> None:  # noqa: N802
        self._python = widget

    def enter(self) -> None:
        self._entered = True
        self._python.enter()

    def exit(self) -> None:
        self._entered = False
        self._python.exit()


WIDGETS = {cls.__name__: cls for cls in (qMRMLWidget, qMRMLSegmentEditorWidget)}
