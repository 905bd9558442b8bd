"""Stands in for the CTK widgets of ASFDA.ui (Slicer's ``ctk`` module): QWidget subclasses with the real
widgets' names, the properties the .ui and the parameter-node connectors set, and the real signals
(ctkPathLineEdit.h, ctkSliderWidget.h, ctkCollapsibleButton.h). No look, no file dialogs.
"""

from __future__ import annotations

from PySide6.QtCore import Property, Signal
from PySide6.QtWidgets import QWidget

from .qt import PythonQtObject


class ctkPathLineEdit(PythonQtObject, QWidget):  # noqa: N801 - the CTK class name
    """A path field: ``currentPath``, emitting ``currentPathChanged(QString)`` when it changes."""

    currentPathChanged = Signal(str)  # noqa: N815
    validInputChanged = Signal(bool)  # noqa: N815

    def __init__(self, parent=None):
        super().__init__(parent)
        self._path = ""
        self._filters = 0

    def _get_path(self) -> str:
        return self._path

    def setCurrentPath(self, path: str) -> None:  # noqa: N802
        if path != self._path:
            self._path = path
            self.currentPathChanged.emit(path)

    def typePath(self, text: str, append: bool = False) -> None:  # noqa: N802 - not CTK's: a user's typing
        """Type ``text`` over the field's text (selected first), or after it, a key at a time: ctkPathLineEdit
        emits currentPathChanged at every keystroke (ctkPathLineEdit.cpp: editTextChanged ->
        updateHasValidInput -> currentPathChanged)."""
        typed = self._path if append else ""
        for char in text:
            typed += char
            self.setCurrentPath(typed)

    def _get_filters(self) -> int:
        return self._filters

    def _set_filters(self, value) -> None:
        self._filters = value

    currentPath = Property(str, _get_path, setCurrentPath, notify=currentPathChanged)  # noqa: N815
    filters = Property(int, _get_filters, _set_filters)


class ctkSliderWidget(PythonQtObject, QWidget):  # noqa: N801
    """A bounded double value: ``value`` kept within ``minimum``..``maximum``, ``valueChanged(double)``."""

    valueChanged = Signal(float)  # noqa: N815
    valueIsChanging = Signal(float)  # noqa: N815
    decimalsChanged = Signal(int)  # noqa: N815

    def __init__(self, parent=None):
        super().__init__(parent)
        self._value, self._minimum, self._maximum, self._step, self._decimals = 0.0, 0.0, 99.0, 1.0, 2

    def _get_value(self) -> float:
        return self._value

    def setValue(self, value: float) -> None:  # noqa: N802
        value = min(max(float(value), self._minimum), self._maximum)
        if value != self._value:
            self._value = value
            self.valueChanged.emit(value)

    def _get_minimum(self) -> float:
        return self._minimum

    def setMinimum(self, value: float) -> None:  # noqa: N802
        self._minimum = float(value)
        self._maximum = max(self._maximum, self._minimum)
        self.setValue(self._value)

    def _get_maximum(self) -> float:
        return self._maximum

    def setMaximum(self, value: float) -> None:  # noqa: N802
        self._maximum = float(value)
        self._minimum = min(self._minimum, self._maximum)
        self.setValue(self._value)

    def setRange(self, low: float, high: float) -> None:  # noqa: N802
        self.setMinimum(low)
        self.setMaximum(high)

    def _get_step(self) -> float:
        return self._step

    def setSingleStep(self, value: float) -> None:  # noqa: N802
        self._step = float(value)

    def _get_decimals(self) -> int:
        return self._decimals

    def setDecimals(self, value: int) -> None:  # noqa: N802
        self._decimals = int(value)
        self.decimalsChanged.emit(self._decimals)

    value = Property(float, _get_value, setValue, notify=valueChanged)
    minimum = Property(float, _get_minimum, setMinimum)
    maximum = Property(float, _get_maximum, setMaximum)
    singleStep = Property(float, _get_step, setSingleStep)  # noqa: N815
    decimals = Property(int, _get_decimals, setDecimals, notify=decimalsChanged)


class ctkCollapsibleButton(PythonQtObject, QWidget):  # noqa: N801
    """A titled section: ``text``, ``collapsed`` and ``contentsCollapsed(bool)``; its children stay visible."""

    contentsCollapsed = Signal(bool)  # noqa: N815

    def __init__(self, parent=None):
        super().__init__(parent)
        self._text, self._collapsed = "", False

    def _get_text(self) -> str:
        return self._text

    def setText(self, text: str) -> None:  # noqa: N802
        self._text = text

    def _get_collapsed(self) -> bool:
        return self._collapsed

    def setCollapsed(self, collapsed: bool) -> None:  # noqa: N802
        if collapsed != self._collapsed:
            self._collapsed = collapsed
            self.contentsCollapsed.emit(collapsed)

    text = Property(str, _get_text, setText)
    collapsed = Property(bool, _get_collapsed, setCollapsed, notify=contentsCollapsed)


WIDGETS = {cls.__name__: cls for cls in (ctkPathLineEdit, ctkSliderWidget, ctkCollapsibleButton)}
