"""Stand-ins for what only the Slicer application provides, so that ``ASFDA/ASFDA.py`` runs for real in a
Qt event loop outside Slicer.

Real here: Qt (PySide6 on the offscreen platform), MRML (slicer-core: scenes, nodes, the segmentations
logic) and ``slicer.util`` (slicer-core ships Slicer's own ``util.py``: loadUI, childWidgetVariables,
VTKObservationMixin, tryWithErrorDisplay, NodeModify, pip_install ...). Stood in, each minimal and each
module's docstring naming what it replaces: ``qt`` (PythonQt over PySide6), the ``ctk`` widgets, the
MRML widgets of the .ui and the module panel (``mrml_widgets``), ``slicer.app`` and
``slicer.ScriptedLoadableModule`` (``scripted_module``), and ``slicer.parameterNodeWrapper``
(``parameter_node``, binding by the connector rules of test_slicer_contract).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
MODULE = REPO / "ASFDA" / "ASFDA.py"
_MODULES = ("qt", "ctk", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "ASFDA")
_ATTRIBUTES = (
    "app",
    "mrmlScene",
    "ScriptedLoadableModule",
    "parameterNodeWrapper",
    "qMRMLWidget",
    "qSlicerSegmentEditorEffectFactory",
)


@dataclass
class Installed:
    """What :func:`install` changed, to undo it; ``scene`` is ``slicer.mrmlScene``."""

    app: object
    scene: object
    saved_modules: dict = field(default_factory=dict)
    saved_attributes: dict = field(default_factory=dict)
    saved_path: list = field(default_factory=list)

    def uninstall(self) -> None:
        import slicer

        for name, module in self.saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name, value in self.saved_attributes.items():
            if value is _ABSENT:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)
        sys.path[:] = self.saved_path


_ABSENT = object()


def install() -> Installed:
    """Make ``import qt``, ``import ctk``, ``slicer.app``, ``slicer.mrmlScene`` and Slicer's scripted-module
    and parameter-node modules resolve to the stand-ins, with one QApplication (offscreen)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtWidgets

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])

    import slicer
    import slicer.util  # noqa: F401 - Slicer's own util.py, from slicer-core

    from . import ctk, mrml_widgets, parameter_node, qt, scripted_module

    qt.CUSTOM_WIDGETS.update(ctk.WIDGETS)
    qt.CUSTOM_WIDGETS.update(mrml_widgets.WIDGETS)
    scene = slicer.vtkMRMLScene()
    # Slicer's Segmentations module registers its node classes (the segment editor node among them) at startup.
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    installed = Installed(
        app,
        scene,
        {name: sys.modules.get(name) for name in _MODULES},
        {name: getattr(slicer, name, _ABSENT) for name in _ATTRIBUTES},
        list(sys.path),
    )
    sys.modules.update(
        {
            "qt": qt,
            "ctk": ctk,
            "slicer.ScriptedLoadableModule": scripted_module,
            "slicer.parameterNodeWrapper": parameter_node,
        }
    )
    slicer.app = scripted_module.SlicerApplication()
    slicer.mrmlScene = scene
    slicer.ScriptedLoadableModule = scripted_module
    slicer.parameterNodeWrapper = parameter_node
    slicer.qMRMLWidget = mrml_widgets.qMRMLWidget
    slicer.qSlicerSegmentEditorEffectFactory = mrml_widgets.qSlicerSegmentEditorEffectFactory
    installed.segmentations = segmentations
    # Slicer puts a scripted module's folder on sys.path (ASFDA.py imports ASFDAPanelLib beside it).
    sys.path.insert(0, str(MODULE.parent))
    return installed


def load_panel(source: str | None = None) -> types.ModuleType:
    """Import ASFDA/ASFDA.py as Slicer does (module ``ASFDA``); ``source`` replaces its text (to test refusals)."""
    if source is None:
        spec = importlib.util.spec_from_file_location("ASFDA", MODULE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["ASFDA"] = module
        spec.loader.exec_module(module)
        return module
    module = types.ModuleType("ASFDA")
    module.__file__ = str(MODULE)
    sys.modules["ASFDA"] = module
    exec(compile(source, str(MODULE), "exec", dont_inherit=True), module.__dict__)  # noqa: S102 - our own file, edited by a test
    return module
