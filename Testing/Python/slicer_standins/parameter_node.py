"""Stands in for ``slicer.parameterNodeWrapper`` (Base/Python/slicer/parameterNodeWrapper/): the
decorator, its validators, and ``connectGui``/``disconnectGui``, on a real vtkMRMLScriptedModuleNode.

Which widget may bind to which field is not decided here: ``connectGui`` asks the rule table encoded from
Slicer's guiConnectors.py in ``test_slicer_contract.create_gui_connector`` (oldest supported Slicer), and
raises its RuntimeError as Slicer's ``createGuiConnector`` would, so a binding Slicer refuses makes
``setup()`` fail here too. The connectors then behave as Slicer's do: a combo box is refilled from
``Choice``, a spin box's or slider's range comes from ``WithinRange``, a path field shows ``str(Path)``;
widget -> node on the widget's signal, node -> widgets on the node's ModifiedEvent.
"""

from __future__ import annotations

import typing
from typing import Any

import vtk
from test_slicer_contract import (  # noqa: F401 - the validators are this module's API, as in Slicer
    PATH_TYPES,
    Choice,
    Decimals,
    Maximum,
    Minimum,
    SingleStep,
    WithinRange,
    create_gui_connector,
    first,
    split,
)

INT_MIN, INT_MAX = -(2**31), 2**31 - 1


# --- connectors: Slicer's GuiConnector classes, by the name create_gui_connector returns -------------------
class _Connector:
    signal = ""

    def __init__(self, widget, datatype):
        self.widget = widget
        self.unannotated, self.annotations = split(datatype)
        self.live = True  # disconnectGui ends it: the widget's signal no longer reaches the node

    def connect(self, callback) -> None:
        self.widget.connect(self.signal, lambda *args: callback() if self.live else None)


class _PathConnector(_Connector):
    signal = "currentPathChanged(QString)"

    def read(self):
        return self.unannotated(self.widget.currentPath)

    def write(self, value) -> None:
        self.widget.currentPath = str(value)


class _StringableComboConnector(_Connector):
    signal = "currentIndexChanged(int)"

    def __init__(self, widget, datatype):
        super().__init__(widget, datatype)
        self.choices = first(self.annotations, Choice).choices
        widget.clear()  # Slicer refills the combo box from Choice, whatever the .ui listed
        for choice in self.choices:
            widget.addItem(str(choice))

    def read(self):
        return self.choices[self.widget.currentIndex]

    def write(self, value) -> None:
        self.widget.currentIndex = list(self.choices).index(value)


def _bounds(annotations, low, high):
    within = first(annotations, WithinRange)
    if within is not None:
        return within.minimum, within.maximum
    minimum, maximum = first(annotations, Minimum), first(annotations, Maximum)
    return (minimum.minimum if minimum else low), (maximum.maximum if maximum else high)


class _IntConnector(_Connector):
    signal = "valueChanged(int)"

    def __init__(self, widget, datatype):
        super().__init__(widget, datatype)
        widget.setRange(*_bounds(self.annotations, INT_MIN, INT_MAX))  # the .ui's range is replaced

    def read(self):
        return int(self.widget.value)

    def write(self, value) -> None:
        self.widget.value = value


class _FloatConnector(_Connector):
    signal = "valueChanged(double)"

    def __init__(self, widget, datatype):
        super().__init__(widget, datatype)
        low, high = _bounds(self.annotations, float("-inf"), float("inf"))
        widget.setMinimum(low)
        widget.setMaximum(high)
        for kind, setter in ((Decimals, widget.setDecimals), (SingleStep, widget.setSingleStep)):
            annotation = first(self.annotations, kind)
            if annotation is not None:
                setter(annotation.value)

    def read(self):
        return self.unannotated(self.widget.value)

    def write(self, value) -> None:
        self.widget.value = value


class _CheckBoxConnector(_Connector):
    signal = "toggled(bool)"

    def read(self):
        return bool(self.widget.checked)

    def write(self, value) -> None:
        self.widget.checked = value


CONNECTORS = {
    "ctkPathLineEditToPathConnector": _PathConnector,
    "QComboBoxToStringableConnector": _StringableComboConnector,
    "QSliderOrSpinBoxToIntConnector": _IntConnector,
    "QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector": _FloatConnector,
    "QCheckBoxToBoolConnector": _CheckBoxConnector,
}


# --- the wrapper -------------------------------------------------------------------------------------------
def _default(unannotated):
    if unannotated in PATH_TYPES:
        return unannotated()
    return {bool: False, int: 0, float: 0.0, str: ""}.get(unannotated)


def _check_type(name: str, unannotated, value) -> None:
    if unannotated in PATH_TYPES:
        ok = isinstance(value, unannotated)  # Slicer's PathSerializer: IsInstance(type_), so no PureWindowsPath
    elif unannotated is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif unannotated is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, unannotated)
    if not ok:
        raise TypeError(f"{name}: expected {unannotated.__name__}, got {type(value).__name__} {value!r}")


def _serialize(unannotated, value) -> str:
    return str(value)


def _deserialize(unannotated, text: str):
    if unannotated is bool:
        return text == "True"
    return unannotated(text)


class _Field:
    def __init__(self, name: str, datatype, default):
        self.name, self.datatype = name, datatype
        self.unannotated, self.annotations = split(datatype)
        self.default = default if default is not _MISSING else _default(self.unannotated)

    def __get__(self, wrapper, owner=None):
        if wrapper is None:
            return self
        node = wrapper.parameterNode
        if not node.HasParameter(self.name):
            return self.default
        return _deserialize(self.unannotated, node.GetParameter(self.name))

    def __set__(self, wrapper, value) -> None:
        _check_type(self.name, self.unannotated, value)
        for validator in self.annotations:
            if hasattr(validator, "validate"):
                validator.validate(value)  # ValueError, as Slicer's validators raise
        wrapper.parameterNode.SetParameter(self.name, _serialize(self.unannotated, value))


_MISSING = object()


class _Wrapper:
    _fields: dict[str, _Field] = {}

    def __init__(self, parameterNode) -> None:  # noqa: N803 - Slicer's argument name
        self.parameterNode = parameterNode
        self._guis: dict[int, tuple[Any, list]] = {}
        self._nextTag = 0
        wasModifying = parameterNode.StartModify()
        for field in self._fields.values():  # Slicer writes the defaults of parameters the node lacks
            if not parameterNode.HasParameter(field.name):
                field.__set__(self, field.default)
        parameterNode.EndModify(wasModifying)

    def connectGui(self, gui) -> int:  # noqa: N802
        """Bind every widget of ``gui`` (an object with widgets as attributes) that has SlicerParameterName."""
        connectors = []
        for widget in list(vars(gui).values()):
            try:
                name = widget.property("SlicerParameterName")
            except (AttributeError, TypeError):
                continue
            if not name:
                continue
            if name not in self._fields:
                raise ValueError(f"Parameter name '{name}' does not exist in {type(self).__name__}")
            field = self._fields[name]
            connector_name = create_gui_connector(widget.metaObject().className(), field.datatype)
            if connector_name not in CONNECTORS:
                raise NotImplementedError(f"the stand-in has no {connector_name}: add it from guiConnectors.py")
            connector = CONNECTORS[connector_name](widget, field.datatype)
            connectors.append((name, connector))
        updating = [False]

        def to_gui(caller=None, event=None) -> None:
            updating[0] = True
            try:
                for name, connector in connectors:
                    connector.write(getattr(self, name))
            finally:
                updating[0] = False

        def from_gui(name, connector) -> None:
            if not updating[0] and getattr(self, name) != connector.read():
                setattr(self, name, connector.read())

        for name, connector in connectors:
            connector.connect(lambda name=name, connector=connector: from_gui(name, connector))
        observer = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, to_gui)
        to_gui()
        self._nextTag += 1
        self._guis[self._nextTag] = (observer, connectors)
        return self._nextTag

    def disconnectGui(self, tag: int) -> None:  # noqa: N802
        observer, connectors = self._guis.pop(tag)
        self.parameterNode.RemoveObserver(observer)
        for _name, connector in connectors:
            connector.live = False


def parameterNodeWrapper(cls):  # noqa: N802 - Slicer's name
    """``@parameterNodeWrapper``: typed fields stored as strings in a vtkMRMLScriptedModuleNode."""
    own = cls.__dict__.get("__annotations__", {})
    annotations = {name: hint for name, hint in typing.get_type_hints(cls, include_extras=True).items() if name in own}
    fields = {name: _Field(name, datatype, cls.__dict__.get(name, _MISSING)) for name, datatype in annotations.items()}
    namespace = {"_fields": fields, "__doc__": cls.__doc__, "__module__": cls.__module__, **fields}
    return type(cls.__name__, (_Wrapper,), namespace)
