"""Stands in for ``slicer.ScriptedLoadableModule`` (Base/Python/slicer/ScriptedLoadableModule.py) and for
``slicer.app`` (qSlicerApplication), with only what a module's widget, logic and test use: the module
panel's layout and resource path, the logic's singleton parameter node (real MRML, made as Slicer makes
it), ``testingEnabled()`` (on, as under ``Slicer --testing``: message boxes are logged, not shown), the
override cursor, the top-level widgets (none of them a main window), and ``coreIOManager()`` writing volumes
as Slicer's VolumeFile writer does (ITK through vtkMRMLVolumeArchetypeStorageNode), for ``slicer.util.saveNode``
in the module's self-test.
"""

from __future__ import annotations

import logging
import os
import sys
import unittest

from PySide6 import QtWidgets

from .mrml_widgets import qSlicerScriptedLoadableModuleWidget


class SlicerApplication:
    """``slicer.app``: testing mode, cursor, events; no main window and no layout manager (no views)."""

    applicationName = "Slicer"

    def testingEnabled(self) -> bool:  # noqa: N802
        return True

    def setOverrideCursor(self, cursor) -> None:  # noqa: N802
        QtWidgets.QApplication.setOverrideCursor(cursor)

    def restoreOverrideCursor(self) -> None:  # noqa: N802
        QtWidgets.QApplication.restoreOverrideCursor()

    def processEvents(self) -> None:  # noqa: N802
        QtWidgets.QApplication.processEvents()

    def layoutManager(self):  # noqa: N802
        return None

    def topLevelWidgets(self) -> list:  # noqa: N802 - slicer.util.mainWindow() looks among them
        return QtWidgets.QApplication.topLevelWidgets()

    def coreIOManager(self):  # noqa: N802
        return CoreIOManager()


class CoreIOManager:
    """qSlicerCoreIOManager: saving volume nodes only."""

    def fileWriterFileType(self, node) -> str:  # noqa: N802
        import slicer

        if not isinstance(node, slicer.vtkMRMLVolumeNode):
            raise NotImplementedError(f"the stand-in saves volumes only, not {node.GetClassName()}")
        return "VolumeFile"

    def saveNodes(self, fileType, properties, userMessages=None) -> bool:  # noqa: N802
        import slicer

        node = _scene().GetNodeByID(properties["nodeID"])
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        _scene().AddNode(storage)
        storage.SetFileName(str(properties["fileName"]))
        ok = bool(storage.WriteData(node))
        _scene().RemoveNode(storage)
        return ok


def _scene():
    import slicer

    return slicer.mrmlScene


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__


class ScriptedLoadableModuleWidget:
    """Built inside a module panel widget; ``self.layout`` is its layout, as in Slicer."""

    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__.removesuffix("Widget")
        self.developerMode = False
        self.parent = parent if parent is not None else qSlicerScriptedLoadableModuleWidget()
        if isinstance(self.parent, qSlicerScriptedLoadableModuleWidget):
            self.parent.setPythonWidget(self)
        self.layout = self.parent.layout()

    def resourcePath(self, filename: str) -> str:  # noqa: N802
        # Slicer: <folder of the module's .py>/Resources/<filename>
        module = sys.modules[self.__class__.__module__]
        return os.path.join(os.path.dirname(module.__file__), "Resources", filename)

    def setup(self) -> None:
        pass  # Slicer adds the Reload & Test section here in developer mode

    def cleanup(self) -> None:
        pass

    def enter(self) -> None:
        pass

    def exit(self) -> None:
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__.removesuffix("Logic")

    def getParameterNode(self):  # noqa: N802
        """The scene's singleton vtkMRMLScriptedModuleNode tagged with the module name, made on first use."""
        scene = _scene()
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node:
            return node
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(self.moduleName)
        node.SetName(scene.GenerateUniqueName(self.moduleName))
        node.SetModuleName(self.moduleName)
        return scene.AddNode(node)


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=1000):  # noqa: N802
        logging.info(message)
