"""Stands in for PythonQt's ``qt`` module, as Slicer's Python sees Qt, on top of PySide6.

Only PythonQt's conventions that ASFDA.py and Slicer's own ``slicer/util.py`` rely on:

* Qt properties read and written as attributes (``button.enabled = False``, ``label.text``,
  ``table.rowCount``): PythonQt prefers a property over a method of the same name;
* ``obj.connect("signal(args)", slot)`` with a C++ signature, refused when the class has no such signal;
* ``obj.name`` for ``objectName`` (``slicer.util.childWidgetVariables`` reads it);
* ``qt.QUiLoader`` creating the CTK and MRML widgets of a ``.ui`` (Slicer's designer plugins do that) and
  wiring its ``<connections>``, whose ``vtkMRMLScene*`` arguments PySide cannot name.

Every QObject class taken from ``qt`` is a PySide6 subclass with :class:`PythonQtObject` mixed in, named as
the Qt class, so ``metaObject().className()`` is what the C++ class would say.
"""

from __future__ import annotations

import inspect
import re
import types
import xml.etree.ElementTree as ET

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

# CTK and MRML widget stand-ins by class name; filled by slicer_standins.install().
CUSTOM_WIDGETS: dict[str, type] = {}
_PROPERTIES: dict[type, frozenset[str]] = {}
_CLASSES: dict[type, type] = {}


def _properties(obj) -> frozenset[str]:
    cls = type(obj)
    names = _PROPERTIES.get(cls)
    if names is None:
        meta = QtCore.QObject.metaObject(obj)
        names = frozenset(meta.property(i).name() for i in range(meta.propertyCount()))
        _PROPERTIES[cls] = names
    return names


def _signature_types(signature: str) -> tuple[str, list[str]]:
    name, _, args = signature.partition("(")
    args = args.rstrip(")")
    return name.strip(), [a for a in args.split(",") if a]


def _python_side(type_name: str) -> str:
    # A signal declared in Python with an object argument (a vtkMRMLScene*, say) is "PyObject" to Qt.
    return "PyObject" if type_name.endswith("*") and not type_name.startswith("Q") else type_name


class PythonQtObject:
    """Mixin: PythonQt's attribute-style properties, string-signature connect, and ``name``."""

    def __getattribute__(self, name):
        if name[:1] != "_" and name not in ("property", "setProperty"):
            if name in _properties(self):
                return QtCore.QObject.property(self, name)
            if name == "name":
                return QtCore.QObject.objectName(self)
            if name == "connect":  # PySide's own QObject.connect would win over a mixin method
                return types.MethodType(PythonQtObject.pythonqt_connect, self)
            if name == "disconnect":
                return types.MethodType(PythonQtObject.pythonqt_disconnect, self)
        return super().__getattribute__(name)

    def __setattr__(self, name, value):
        if name[:1] != "_" and name in _properties(self) and not isinstance(getattr(type(self), name, None), property):
            if not QtCore.QObject.setProperty(self, name, value):
                raise AttributeError(f"{type(self).__name__}.{name}: Qt refused the value {value!r}")
            return
        super().__setattr__(name, value)

    def pythonqt_connect(self, signal: str, slot) -> bool:
        """PythonQt's ``connect("signal(args)", callable)``: the signature must be one of the class's signals."""
        normal = bytes(QtCore.QMetaObject.normalizedSignature(signal)).decode()
        name, wanted = _signature_types(normal)
        meta = QtCore.QObject.metaObject(self)
        found = None
        for i in range(meta.methodCount()):
            method = meta.method(i)
            if method.methodType() != QtCore.QMetaMethod.Signal:
                continue
            has_name, has_types = _signature_types(bytes(method.methodSignature()).decode())
            if has_name == name and has_types == [_python_side(t) for t in wanted]:
                found = method
                break
        if found is None:
            raise AttributeError(f"{meta.className()} has no signal {normal}")
        count = len(wanted)
        try:  # PythonQt passes as many arguments as the slot takes
            params = inspect.signature(slot).parameters.values()
            if not any(p.kind is p.VAR_POSITIONAL for p in params):
                count = min(count, len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]))
        except (TypeError, ValueError):
            pass
        bound = super().__getattribute__(name)
        try:
            bound = bound[tuple({"int": int, "double": float, "bool": bool, "QString": str}[t] for t in wanted)]
        except (KeyError, IndexError, TypeError):
            pass  # not overloaded by these types: the default overload is the one

        def call(*args):
            return slot(*args[:count])

        bound.connect(call)
        connections = self.__dict__.setdefault("_pythonqt_connections", {})
        connections.setdefault((normal, slot), []).append((bound, call))
        return True

    def pythonqt_disconnect(self, signal: str, slot) -> bool:
        """PythonQt's ``disconnect("signal(args)", callable)``: undoes a ``connect`` of the same pair."""
        normal = bytes(QtCore.QMetaObject.normalizedSignature(signal)).decode()
        made = self.__dict__.get("_pythonqt_connections", {}).get((normal, slot))
        if not made:
            return False
        bound, call = made.pop()
        bound.disconnect(call)
        return True


def pythonqt_class(base: type) -> type:
    """``base`` (a PySide6 QObject class) with PythonQt's conventions, named as the Qt class."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (PythonQtObject, base), {"__module__": __name__})
        _CLASSES[base] = cls
    return cls


class QUiLoader(PythonQtObject, QtUiTools.QUiLoader):
    """Creates every widget of a .ui as its PythonQt-style class (CTK/MRML ones from CUSTOM_WIDGETS) and
    connects the .ui's signal/slot connections by name, as Slicer's designer plugins make possible."""

    def createWidget(self, className, parent=None, name=""):  # noqa: N802 - Qt's virtual
        cls = CUSTOM_WIDGETS.get(className)
        if cls is None:
            base = getattr(QtWidgets, className, None)
            if base is None:
                raise RuntimeError(f"QUiLoader stand-in: no widget class {className}")
            cls = pythonqt_class(base)
        widget = cls(parent)
        widget.setObjectName(name)
        return widget

    def load(self, device, parent=None):
        root = ET.fromstring(bytes(device.readAll()))
        connections = root.find("connections")
        if connections is not None:
            root.remove(connections)
        buffer = QtCore.QBuffer()
        buffer.setData(QtCore.QByteArray(ET.tostring(root)))
        buffer.open(QtCore.QIODevice.ReadOnly)
        widget = super().load(buffer, parent)
        for connection in [] if connections is None else connections.iter("connection"):
            sender, receiver = (self._named(widget, connection.findtext(k)) for k in ("sender", "receiver"))
            slot = re.match(r"\s*(\w+)", connection.findtext("slot")).group(1)
            sender.connect(connection.findtext("signal"), getattr(receiver, slot))
        return widget

    @staticmethod
    def _named(root, name):
        found = root if QtCore.QObject.objectName(root) == name else root.findChild(QtCore.QObject, name)
        if found is None:
            raise RuntimeError(f"QUiLoader stand-in: no object {name} for a connection")
        return found


def __getattr__(name: str):
    """``qt.X``: the Qt class X (QObject classes with PythonQt's conventions) or Qt namespace member."""
    if name == "QUiLoader":
        return QUiLoader
    for module in (QtWidgets, QtGui, QtCore):
        found = getattr(module, name, None)
        if found is not None:
            if isinstance(found, type) and issubclass(found, QtCore.QObject):
                return pythonqt_class(found)
            return found
    raise AttributeError(f"module 'qt' (stand-in) has no attribute {name!r}")
