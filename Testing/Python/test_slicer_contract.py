"""The panel against Slicer's own rules: every parameter binding and every signal connection it makes.

Slicer cannot run here, so its rules are encoded from its source and checked on the parsed files:

* ``Resources/UI/ASFDA.ui`` (XML): which widget class carries which ``SlicerParameterName``;
* ``ASFDA/ASFDA.py`` (AST): the ``@parameterNodeWrapper`` class's field types, and every ``connect``.

``connectGui`` (Base/Python/slicer/parameterNodeWrapper/wrapper.py) maps each widget's
``SlicerParameterName`` dynamic property to a field and calls ``createGuiConnector(widget, dataType)``
(guiConnectors.py), which raises ``RuntimeError("Unable to create GUI connector ...")`` unless a
registered connector's ``canRepresent`` accepts the exact widget class (``type(widget) ==``, no
subclasses) with the field's unannotated type, and whose ``create``/``__init__`` raises for a combo box
without ``Choice`` and for an unbounded slider. ``CONNECTORS`` below is that list, read from
Slicer/Slicer at 583e9b37 (2026-08-21) and, for the ``since`` column, at the tags v5.4.0 to v5.12.0.
"""

from __future__ import annotations

import ast
import enum
import pathlib
import re
import typing
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Annotated, Any, Callable

import pytest
from conftest import REPO

MODULE = REPO / "ASFDA" / "ASFDA.py"
UI = REPO / "Resources" / "UI" / "ASFDA.ui"
OLDEST_SLICER = (5, 4)  # README: "Slicer >= 5.4"; a binding must work in every version from there on


# --- Slicer's validators and annotations (parameterNodeWrapper/validators.py, guiConnectors.py) ------------
@dataclass(frozen=True)
class Choice:
    choices: Any

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


@dataclass(frozen=True)
class WithinRange:
    minimum: Any
    maximum: Any

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


@dataclass(frozen=True)
class Minimum:
    minimum: Any

    def validate(self, value) -> None:
        if value < self.minimum:
            raise ValueError(f"Value must be greater than {self.minimum}, is {value}")


@dataclass(frozen=True)
class Maximum:
    maximum: Any

    def validate(self, value) -> None:
        if value > self.maximum:
            raise ValueError(f"Value must be less than {self.maximum}, is {value}")


@dataclass(frozen=True)
class Decimals:
    value: int


@dataclass(frozen=True)
class SingleStep:
    value: float


class FloatRange:  # parameterNodeWrapper/types.py
    pass


@dataclass(frozen=True)
class RangeBounds:
    minimum: float
    maximum: float


class MRMLNode:  # stands for slicer.vtkMRMLNode subclasses in the rule table
    pass


PATH_TYPES = (
    pathlib.Path,
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
)


def split(datatype) -> tuple[Any, tuple]:
    """parameterNodeWrapper/util.py splitAnnotations: (unannotated type, annotations)."""
    if typing.get_origin(datatype) is Annotated:
        return datatype.__origin__, datatype.__metadata__
    return datatype, ()


def first(annotations, kind):
    return next((a for a in annotations if isinstance(a, kind)), None)


def bounded(annotations) -> bool:
    # guiConnectors.py: isBounded = withinRange is not None or (minimum is not None and maximum is not None)
    return first(annotations, WithinRange) is not None or (
        first(annotations, Minimum) is not None and first(annotations, Maximum) is not None
    )


def is_enum(t) -> bool:
    return isinstance(t, type) and issubclass(t, enum.Enum)


@dataclass(frozen=True)
class Connector:
    """One registered GuiConnector: the widget classes and types its canRepresent accepts, what create refuses."""

    name: str
    widgets: dict[str, tuple[int, int]]  # exact widget class -> first Slicer version whose connector takes it
    accepts: Callable[[Any], bool]
    refuses: Callable[[str, tuple], str | None] = lambda widget, annotations: None  # create()'s RuntimeError
    since: Callable[[Any], tuple[int, int]] = lambda t: (5, 4)  # first version accepting this type


# In registration order, as createGuiConnector tries them (guiConnectors.py).
CONNECTORS = (
    Connector("QCheckBoxToBoolConnector", {"QCheckBox": (5, 4), "ctkCheckBox": (5, 8)}, lambda t: t is bool),
    Connector("QCheckablePushButtonToBoolConnector", {"QPushButton": (5, 4)}, lambda t: t is bool),
    Connector("ctkCheckablePushButtonToBoolConnector", {"ctkCheckablePushButton": (5, 10)}, lambda t: t is bool),
    Connector(
        "QSliderOrSpinBoxToIntConnector",
        {"QSlider": (5, 4), "QSpinBox": (5, 4)},
        lambda t: t is int,
        lambda w, a: (
            None
            if w != "QSlider" or bounded(a)
            else "Cannot have a connection to QSlider where the int type is unbounded."
        ),
    ),
    Connector(
        "QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector",
        {
            "QDoubleSpinBox": (5, 4),
            "ctkSliderWidget": (5, 4),
            "qMRMLSliderWidget": (5, 6),
            "ctkDoubleSlider": (5, 10),
            "ctkDoubleSpinBox": (5, 10),
            "qMRMLSpinBox": (5, 10),
        },
        lambda t: t in (float, int),
        lambda w, a: (
            None
            if w not in ("ctkSliderWidget", "qMRMLSliderWidget") or bounded(a)
            else "Cannot have a connection to ctkSliderWidget where the float types is unbounded."
        ),
        lambda t: (5, 4) if t is float else (5, 10),  # int joined float in 5.10
    ),
    Connector(
        "QComboBoxToStringableConnector",
        {"QComboBox": (5, 4), "ctkComboBox": (5, 8)},
        lambda t: t in (int, float, str, bool),
        lambda w, a: (
            None
            if first(a, Choice) is not None
            else "ComboBoxToStringableConnector requires the Choice annotation to be used."
        ),
    ),
    Connector("QComboBoxToEnumConnector", {"QComboBox": (5, 4), "ctkComboBox": (5, 8)}, is_enum),
    Connector("QLineEditToStrConnector", {"QLineEdit": (5, 4)}, lambda t: t is str),
    Connector("QLabelToStrConnector", {"QLabel": (5, 8)}, lambda t: t is str),
    Connector("QTextEditPlainTextToStrConnector", {"QTextEdit": (5, 4)}, lambda t: t is str),  # not QPlainTextEdit
    Connector(
        "ctkRangeWidgetToRangeConnector",
        {"ctkRangeWidget": (5, 4), "ctkDoubleRangeSlider": (5, 10), "qMRMLRangeWidget": (5, 10)},
        lambda t: t is FloatRange,
        lambda w, a: None if first(a, RangeBounds) is not None else "a range widget needs RangeBounds",
    ),
    Connector("ctkPathLineEditToPathConnector", {"ctkPathLineEdit": (5, 4)}, lambda t: t in PATH_TYPES),
    Connector("ctkDirectoryButtonToPathConnector", {"ctkDirectoryButton": (5, 4)}, lambda t: t in PATH_TYPES),
    Connector(
        "qMRMLNodeComboBoxToNodeConnector",
        {"qMRMLNodeComboBox": (5, 4)},
        lambda t: isinstance(t, type) and issubclass(t, MRMLNode),
    ),
)


def create_gui_connector(widget_class: str, datatype, version: tuple[int, int] = OLDEST_SLICER) -> str:
    """Our createGuiConnector: the connector Slicer ``version`` would make, or RuntimeError as Slicer raises it."""
    unannotated, annotations = split(datatype)
    for connector in CONNECTORS:
        if (
            connector.widgets.get(widget_class, (99, 0)) <= version
            and connector.accepts(unannotated)
            and connector.since(unannotated) <= version
        ):
            refusal = connector.refuses(widget_class, annotations)
            if refusal:
                raise RuntimeError(refusal)
            return connector.name
    raise RuntimeError(
        f"Unable to create GUI connector from datatype '{datatype}' to widget type '{widget_class}' (Slicer {version})"
    )


def test_the_encoded_rules_refuse_what_slicer_refuses():
    """The rule table itself, on the pairs issue 13 names (so a wrong table cannot pass the panel)."""
    assert create_gui_connector("ctkPathLineEdit", pathlib.Path) == "ctkPathLineEditToPathConnector"
    assert create_gui_connector("QComboBox", Annotated[str, Choice(["a"])]) == "QComboBoxToStringableConnector"
    assert create_gui_connector("ctkSliderWidget", Annotated[float, WithinRange(0, 1)]).startswith("QDoubleSpinBox")
    for widget, datatype, message in [
        ("ctkPathLineEdit", str, "Unable to create GUI connector"),
        ("ctkDirectoryButton", str, "Unable to create GUI connector"),
        ("QComboBox", str, "requires the Choice annotation"),
        ("ctkSliderWidget", float, "unbounded"),
        ("ctkSliderWidget", Annotated[float, Minimum(0)], "unbounded"),
        ("QSlider", int, "unbounded"),
        ("QPlainTextEdit", str, "Unable to create GUI connector"),
        ("QSpinBox", float, "Unable to create GUI connector"),
        ("QLabel", str, "Unable to create GUI connector"),  # only from Slicer 5.8
        ("ctkSliderWidget", Annotated[int, WithinRange(0, 1)], "Unable to create GUI connector"),  # int from 5.10
    ]:
        with pytest.raises(RuntimeError, match=message):
            create_gui_connector(widget, datatype)
    assert create_gui_connector("QLabel", str, (5, 8)) == "QLabelToStrConnector"


# --- reading the panel ----------------------------------------------------------------------------------
def _module_tree(source: str | None = None) -> ast.Module:
    return ast.parse(source if source is not None else MODULE.read_text(encoding="utf-8"))


def ui_widgets(text: str | None = None) -> dict[str, ET.Element]:
    root = ET.fromstring(text) if text is not None else ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def _property(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            value = prop[0]
            if value.tag in ("number",):
                return int(value.text)
            if value.tag == "double":
                return float(value.text)
            if value.tag == "bool":
                return value.text == "true"
            return value.text
    return None


def ui_bindings(text: str | None = None) -> dict[str, tuple[str, ET.Element]]:
    """SlicerParameterName -> (widget class, element). Names must be unique: connectGui keeps only the last."""
    bound: dict[str, tuple[str, ET.Element]] = {}
    for name, widget in ui_widgets(text).items():
        parameter = _property(widget, "SlicerParameterName")
        if parameter:
            assert parameter not in bound, f"{parameter} is bound to {bound[parameter][1].get('name')} and {name}"
            bound[parameter] = (widget.get("class"), widget)
    return bound


def _namespace(tree: ast.Module) -> dict[str, Any]:
    """What the field annotations may name: typing, pathlib, Slicer's validators, and the module's constants."""
    ns: dict[str, Any] = {
        "Annotated": Annotated,
        "typing": typing,
        "pathlib": pathlib,
        "Path": pathlib.Path,
        "enum": enum,
        "Choice": Choice,
        "WithinRange": WithinRange,
        "Minimum": Minimum,
        "Maximum": Maximum,
        "Decimals": Decimals,
        "SingleStep": SingleStep,
        "FloatRange": FloatRange,
        "RangeBounds": RangeBounds,
    }
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                ns[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
        elif isinstance(node, ast.ClassDef) and any(
            getattr(b, "id", getattr(b, "attr", "")) == "Enum" for b in node.bases
        ):
            ns[node.name] = enum.Enum(
                node.name, [t.id for s in node.body if isinstance(s, ast.Assign) for t in s.targets]
            )
    return ns


@dataclass
class Field:
    name: str
    datatype: Any
    default: Any


def wrapper_fields(source: str | None = None) -> dict[str, Field]:
    """The fields of the @parameterNodeWrapper class, their (annotated) types and defaults, as Slicer reads them."""
    tree = _module_tree(source)
    classes = [
        n
        for n in tree.body
        if isinstance(n, ast.ClassDef)
        and any(getattr(d, "id", getattr(d, "attr", None)) == "parameterNodeWrapper" for d in n.decorator_list)
    ]
    assert len(classes) == 1, "ASFDA.py must have one @parameterNodeWrapper class"
    ns = _namespace(tree)
    fields = {}
    for node in classes[0].body:
        if isinstance(node, ast.AnnAssign):
            datatype = eval(compile(ast.Expression(node.annotation), "<annotation>", "eval"), ns)  # noqa: S307
            unannotated, _ = split(datatype)
            if node.value is not None:
                default = eval(compile(ast.Expression(node.value), "<default>", "eval"), ns)  # noqa: S307
            else:  # serializers.py: the serializer's default, e.g. Path() for pathlib types, "" for str
                default = unannotated() if unannotated in (*PATH_TYPES, str, int, float, bool) else None
            fields[node.target.id] = Field(node.target.id, datatype, default)
    return fields


def binding_problems(source: str | None = None, ui_text: str | None = None) -> list[str]:
    """Every reason Slicer would refuse (or silently change) the panel's bindings; empty when it accepts them."""
    problems = []
    fields = wrapper_fields(source)
    for parameter, (widget_class, widget) in sorted(ui_bindings(ui_text).items()):
        name = widget.get("name")
        if parameter not in fields:  # wrapper.py _checkParamName raises
            problems.append(f"{name}: SlicerParameterName {parameter!r} is not a field of the parameter node")
            continue
        field = fields[parameter]
        try:
            create_gui_connector(widget_class, field.datatype)
        except RuntimeError as exc:
            problems.append(f"{name} ({widget_class}) <-> {parameter}: {exc}")
            continue
        _, annotations = split(field.datatype)
        for validator in annotations:  # ValidatedSerializer validates the default when the node is created
            if hasattr(validator, "validate"):
                try:
                    validator.validate(field.default)
                except ValueError as exc:
                    problems.append(f"{parameter}: default {field.default!r} is refused: {exc}")
        choice = first(annotations, Choice)
        if choice is not None:  # QComboBoxToStringableConnector clears the items and adds str(c) per choice
            items = [item.find("property/string").text for item in widget.findall("item")]
            if items and items != [str(c) for c in choice.choices]:
                problems.append(f"{name}: the .ui items {items} are replaced by Choice {list(choice.choices)}")
        if widget_class in ("QSpinBox", "QSlider", "QDoubleSpinBox", "ctkSliderWidget"):
            # The int/float connectors set the widget's range from WithinRange/Minimum/Maximum, else to the
            # full int range / +-inf: the .ui's minimum and maximum must be the field's bounds, or they are lost.
            within = first(annotations, WithinRange)
            low = within.minimum if within else getattr(first(annotations, Minimum), "minimum", None)
            high = within.maximum if within else getattr(first(annotations, Maximum), "maximum", None)
            ui_low = _property(widget, "minimum")
            ui_high = _property(widget, "maximum")
            if ui_low is None and widget_class in ("QSpinBox", "QDoubleSpinBox", "ctkSliderWidget"):
                ui_low = 0  # Qt's and CTK's default minimum
            if (low, high) != (ui_low, ui_high):
                problems.append(f"{name}: .ui range {ui_low}..{ui_high} but the field's bounds are {low}..{high}")
    return problems


def test_every_bound_widget_forms_a_pair_slicer_accepts():
    assert binding_problems() == []


def test_every_parameter_node_field_is_bound_to_a_widget():
    assert set(ui_bindings()) == set(wrapper_fields())


def test_the_binding_check_fails_on_the_panel_before_issue_13():
    """The panel as it was is refused: str paths, bare str combo boxes, an unbounded slider (connectGui raises),
    and spin boxes whose .ui range the connector silently replaced with the full int range."""
    import subprocess

    old, old_ui = (
        subprocess.run(
            ["git", "show", f"64a4a04:{path}"], cwd=REPO, capture_output=True, text=True, encoding="utf-8", check=False
        )
        for path in ("ASFDA/ASFDA.py", "Resources/UI/ASFDA.ui")
    )
    if old.returncode or old_ui.returncode:
        pytest.skip("the pre-fix commit is not in this checkout's history")
    problems = binding_problems(old.stdout, old_ui.stdout)
    refused = sorted(re.match(r"\w+", p).group() for p in problems)
    assert refused == [
        "alphaSliderWidget",
        "budgetSpinBox",
        "cardPathLineEdit",
        "deviceComboBox",
        "imagesPathLineEdit",
        "iterationsSpinBox",
        "modelPathLineEdit",
        "sessionPathLineEdit",
        "strategyComboBox",
    ], problems
    assert any("requires the Choice annotation" in p for p in problems)
    assert any("unbounded" in p for p in problems)


def test_combo_box_choices_are_the_engines():
    from ASFDALib.adaptation.recipe import RELIABILITY, FinetuneConfig
    from ASFDALib.query.selection import STRATEGIES

    fields = wrapper_fields()
    names = ("strategy", "device", "pseudo_gate")
    strategy, device, gate = (first(split(fields[n].datatype)[1], Choice) for n in names)
    assert None not in (strategy, device, gate), "every combo box needs Choice([...])"
    assert set(strategy.choices) == set(STRATEGIES)
    assert list(device.choices) == ["auto", "cpu", "cuda"]
    assert set(gate.choices) == set(RELIABILITY) and fields["pseudo_gate"].default == FinetuneConfig.reliability


def test_export_formats_are_asfda_exports_and_each_dialog_filter_names_the_suffix_written():
    from ASFDALib.models.formats import FORMATS, SUFFIXES

    fields = wrapper_fields()
    export = first(split(fields["export_format"].datatype)[1], Choice)
    assert list(export.choices) == list(FORMATS) and fields["export_format"].default == "bundle"
    filters = _namespace(_module_tree())["EXPORT_FILTERS"]
    assert {fmt: re.search(r"\(\*(\.\w+)\)$", f).group(1) for fmt, f in filters.items()} == SUFFIXES


# --- signals --------------------------------------------------------------------------------------------
# Signals per class, normalised as Qt does (no spaces, no const/&), from the Qt 5 class references
# (doc.qt.io/qt-5/<class>.html#signals, inherited ones included through BASES) and the CTK/Slicer headers
# (ctkPathLineEdit.h, ctkSliderWidget.h, ctkCollapsibleButton.h, ctkDirectoryButton.h, qMRMLWidget.h,
# qMRMLSegmentEditorWidget.h, qMRMLNodeComboBox.h, qSlicerSegmentEditorEffectFactory.h).
SIGNALS: dict[str, set[str]] = {
    "QObject": {"destroyed()", "destroyed(QObject*)", "objectNameChanged(QString)"},
    "QTimer": {"timeout()"},
    "QWidget": {"customContextMenuRequested(QPoint)", "windowIconChanged(QIcon)", "windowTitleChanged(QString)"},
    "QAbstractButton": {"clicked()", "clicked(bool)", "pressed()", "released()", "toggled(bool)"},
    "QPushButton": set(),
    "QCheckBox": {"stateChanged(int)"},
    "QLabel": {"linkActivated(QString)", "linkHovered(QString)"},
    "QComboBox": {
        "activated(int)",
        "currentIndexChanged(int)",
        "currentTextChanged(QString)",
        "editTextChanged(QString)",
        "highlighted(int)",
        "textActivated(QString)",
        "textHighlighted(QString)",
    },
    "QAbstractSpinBox": {"editingFinished()"},
    "QSpinBox": {"valueChanged(int)", "textChanged(QString)"},
    "QDoubleSpinBox": {"valueChanged(double)", "textChanged(QString)"},
    "QLineEdit": {
        "textChanged(QString)",
        "textEdited(QString)",
        "returnPressed()",
        "editingFinished()",
        "selectionChanged()",
        "cursorPositionChanged(int,int)",
        "inputRejected()",
    },
    "QPlainTextEdit": {
        "textChanged()",
        "blockCountChanged(int)",
        "copyAvailable(bool)",
        "cursorPositionChanged()",
        "modificationChanged(bool)",
        "redoAvailable(bool)",
        "selectionChanged()",
        "undoAvailable(bool)",
        "updateRequest(QRect,int)",
    },
    "QProgressBar": {"valueChanged(int)"},
    "QAbstractItemView": {
        "activated(QModelIndex)",
        "clicked(QModelIndex)",
        "doubleClicked(QModelIndex)",
        "entered(QModelIndex)",
        "iconSizeChanged(QSize)",
        "pressed(QModelIndex)",
        "viewportEntered()",
    },
    "QTableView": set(),
    "QTableWidget": {
        "cellActivated(int,int)",
        "cellChanged(int,int)",
        "cellClicked(int,int)",
        "cellDoubleClicked(int,int)",
        "cellEntered(int,int)",
        "cellPressed(int,int)",
        "currentCellChanged(int,int,int,int)",
        "currentItemChanged(QTableWidgetItem*,QTableWidgetItem*)",
        "itemActivated(QTableWidgetItem*)",
        "itemChanged(QTableWidgetItem*)",
        "itemClicked(QTableWidgetItem*)",
        "itemDoubleClicked(QTableWidgetItem*)",
        "itemEntered(QTableWidgetItem*)",
        "itemPressed(QTableWidgetItem*)",
        "itemSelectionChanged()",
    },
    "ctkCollapsibleButton": {"contentsCollapsed(bool)"},
    "ctkPathLineEdit": {"currentPathChanged(QString)", "validInputChanged(bool)"},
    "ctkDirectoryButton": {"directoryChanged(QString)", "directorySelected(QString)"},
    "ctkSliderWidget": {"valueChanged(double)", "valueIsChanging(double)", "decimalsChanged(int)"},
    "qMRMLWidget": {"mrmlSceneChanged(vtkMRMLScene*)"},
    "qMRMLSegmentEditorWidget": {
        "segmentationNodeChanged(vtkMRMLSegmentationNode*)",
        "sourceVolumeNodeChanged(vtkMRMLVolumeNode*)",
        "masterVolumeNodeChanged(vtkMRMLVolumeNode*)",
        "currentSegmentIDChanged(QString)",
    },
    "qSlicerSegmentEditorEffectFactory": {"effectRegistered(QString)"},
}
BASES = {
    "QTimer": "QObject",
    "QWidget": "QObject",
    "QAbstractButton": "QWidget",
    "QPushButton": "QAbstractButton",
    "QCheckBox": "QAbstractButton",
    "ctkCollapsibleButton": "QAbstractButton",
    "QLabel": "QWidget",
    "QComboBox": "QWidget",
    "QAbstractSpinBox": "QWidget",
    "QSpinBox": "QAbstractSpinBox",
    "QDoubleSpinBox": "QAbstractSpinBox",
    "QLineEdit": "QWidget",
    "QPlainTextEdit": "QWidget",
    "QProgressBar": "QWidget",
    "QAbstractItemView": "QWidget",
    "QTableView": "QAbstractItemView",
    "QTableWidget": "QTableView",
    "ctkPathLineEdit": "QWidget",
    "ctkDirectoryButton": "QWidget",
    "ctkSliderWidget": "QWidget",
    "qMRMLWidget": "QWidget",
    "qMRMLSegmentEditorWidget": "qMRMLWidget",
    "qSlicerSegmentEditorEffectFactory": "QObject",
}
SLOTS = {"qMRMLWidget": {"setMRMLScene(vtkMRMLScene*)"}}


def signals_of(cls: str) -> set[str]:
    assert cls in SIGNALS, f"{cls} is not in the signal table: add its signals from the Qt/CTK documentation"
    found = set(SIGNALS[cls])
    while cls in BASES:
        cls = BASES[cls]
        found |= SIGNALS[cls]
    return found


def normalise(signature: str) -> str:
    signature = re.sub(r"\bconst\s+|\s*&", "", signature)
    return re.sub(r"\s+", "", signature)


def _receiver_class(expr: ast.expr, widgets: dict[str, ET.Element], attributes: dict[str, str]) -> str | None:
    # self.ui.<name>: the .ui's class for that object name; self.<attr>: the class it was constructed as
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Attribute) and expr.value.attr == "ui":
        widget = widgets.get(expr.attr)
        return widget.get("class") if widget is not None else f"<no widget {expr.attr} in the .ui>"
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id == "self":
        return attributes.get(expr.attr)
    return None


def connections(source: str | None = None, ui_text: str | None = None) -> list[tuple[int, str, str]]:
    """(line, receiver class, signal) for every ``x.connect("signal(args)", ...)`` and ``x.signal.connect(...)``."""
    tree = _module_tree(source)
    widgets = ui_widgets(ui_text)
    attributes = {}  # self.timer = qt.QTimer() -> {"timer": "QTimer"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            cls = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if cls == "instance" and isinstance(func.value, ast.Attribute):  # a singleton: X.instance()
                cls = func.value.attr
            for target in node.targets:
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "self"
                ):
                    attributes[target.attr] = cls
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"):
            continue
        owner = node.func.value
        if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            cls = _receiver_class(owner, widgets, attributes)
            found.append((node.lineno, cls, normalise(node.args[0].value)))
        elif isinstance(owner, ast.Attribute):  # PythonQt's attribute style: widget.clicked.connect(slot)
            cls = _receiver_class(owner.value, widgets, attributes)
            found.append((node.lineno, cls, owner.attr))
    return found


def signal_problems(source: str | None = None, ui_text: str | None = None) -> list[str]:
    problems = []
    for line, cls, signal in connections(source, ui_text):
        if cls is None:
            problems.append(f"ASFDA.py:{line}: cannot tell which class connects {signal!r}: name it in the table")
            continue
        if cls.startswith("<"):
            problems.append(f"ASFDA.py:{line}: {cls}")
            continue
        names = signals_of(cls)
        if "(" in signal:
            ok = signal in names
        else:
            ok = signal in {s.split("(")[0] for s in names}
        if not ok:
            problems.append(f"ASFDA.py:{line}: {cls} has no signal {signal}")
    widgets = ui_widgets(ui_text)
    root = ET.fromstring(ui_text) if ui_text is not None else ET.parse(UI).getroot()
    for conn in root.iter("connection"):
        sender, receiver = widgets[conn.findtext("sender")], widgets[conn.findtext("receiver")]
        signal, slot = normalise(conn.findtext("signal")), normalise(conn.findtext("slot"))
        if signal not in signals_of(sender.get("class")):
            problems.append(f"ASFDA.ui: {sender.get('class')} has no signal {signal}")
        receiver_slots = set()
        cls = receiver.get("class")
        while cls:
            receiver_slots |= SLOTS.get(cls, set())
            cls = BASES.get(cls)
        if slot not in receiver_slots:
            problems.append(f"ASFDA.ui: {receiver.get('class')} has no slot {slot}")
    return problems


def test_every_connected_signal_exists_on_its_widget_class():
    found = connections()
    assert ("QTimer", "timeout()") in {(c, s) for _, c, s in found}
    assert ("QTableWidget", "cellDoubleClicked(int,int)") in {(c, s) for _, c, s in found}
    assert signal_problems() == []


def test_the_signal_check_names_a_misspelt_or_misplaced_signal():
    source = MODULE.read_text(encoding="utf-8")
    wrong = source.replace('"cellDoubleClicked(int,int)"', '"cellDoubleClicked(int, int, int)"').replace(
        'self.ui.rankButton.connect("clicked()"', 'self.ui.resultsTable.connect("clicked()"'
    )
    problems = signal_problems(wrong)
    assert len(problems) == 2, problems
    assert any("QTableWidget has no signal cellDoubleClicked(int,int,int)" in p for p in problems)
    assert any("QTableWidget has no signal clicked()" in p for p in problems)
