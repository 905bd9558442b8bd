"""Static checks of the Slicer module and extension packaging (Slicer itself cannot run here)."""

from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET

import pytest
from conftest import REPO

MODULE = REPO / "ASFDA" / "ASFDA.py"
UI = REPO / "Resources" / "UI" / "ASFDA.ui"
MODULE_CMAKE = REPO / "ASFDA" / "CMakeLists.txt"


def _tree():
    return ast.parse(MODULE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("version", [(3, 9), (3, 12)])
def test_module_compiles_for_the_python_of_every_supported_slicer(version):
    ast.parse(MODULE.read_text(encoding="utf-8"), feature_version=version)


def test_module_never_imports_heavy_packages_at_load_time():
    heavy = {"torch", "monai", "nibabel", "SimpleITK", "numpy", "ASFDALib"}
    for node in _tree().body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        assert not set(names) & heavy, f"line {node.lineno} imports {names} at module level"


def _ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget")}


def test_every_ui_widget_the_module_uses_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text(encoding="utf-8")))
    missing = used - set(_ui_widgets())
    assert used and not missing, f"ASFDA.py uses widgets missing from ASFDA.ui: {sorted(missing)}"


def test_every_parameter_bound_widget_has_a_parameter_node_field():
    cls = next(n for n in _tree().body if isinstance(n, ast.ClassDef) and n.name == "ASFDAParameterNode")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    bound = {
        p.find("string").text
        for w in _ui_widgets().values()
        for p in w.findall("property")
        if p.get("name") == "SlicerParameterName"
    }
    assert bound == fields


def _cmake_list(text: str, name: str) -> list[str]:
    block = re.search(rf"set\({name}\s+(.*?)\)", text, re.S)
    assert block, f"{name} not found"
    return block.group(1).split()


def test_every_library_and_resource_file_is_listed_in_cmake_and_exists():
    text = MODULE_CMAKE.read_text()
    listed = _cmake_list(text, "ASFDALIB_PYTHON_SCRIPTS")
    on_disk = sorted(p.name for p in (REPO / "ASFDALib").glob("*.py"))
    assert sorted(listed) == on_disk
    module_scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    beside = sorted(str(p.relative_to(REPO / "ASFDA")) for p in (REPO / "ASFDA").rglob("*.py"))
    assert sorted(s.replace("${MODULE_NAME}", "ASFDA") for s in module_scripts) == beside
    resources = _cmake_list(text, "ASFDA_RESOURCES")
    for item in resources:
        assert (REPO / "Resources" / item).is_file(), item
    shipped = sorted(
        str(p.relative_to(REPO / "Resources"))
        for p in (REPO / "Resources").rglob("*")
        if p.is_file() and "Screenshots" not in p.parts
    )
    assert sorted(resources) == shipped
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_description_files():
    top = (REPO / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top and "add_subdirectory(ASFDA)" in top
    s4ext = dict(
        line.split(" ", 1) for line in (REPO / "ASFDA.s4ext").read_text().splitlines() if line and line[0] != "#"
    )
    for key in ("scm", "scmurl", "scmrevision", "depends", "category", "homepage", "iconurl", "description"):
        assert s4ext.get(key), key
    catalog = json.loads((REPO / "ASFDA.json").read_text())
    assert catalog["build_dependencies"] == ["PyTorch"] and catalog["category"] and catalog["scm_url"]
    assert (REPO / "LICENSE.txt").is_file()


def test_icon_is_a_128_pixel_png():
    data = (REPO / "Resources" / "Icons" / "ASFDA.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_only_the_mrml_bridge_imports_slicer():
    importers = []
    for path in sorted((REPO / "ASFDALib").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            if "slicer" in names or "qt" in names:
                importers.append(path.name)
    assert set(importers) == {"mrml.py"}


def test_every_panel_button_exists_and_names_a_workflow_action():
    from ASFDALib.app.workflow import BUTTON_ACTIONS, Workflow

    widgets = _ui_widgets()
    flow = Workflow()
    for name, action in BUTTON_ACTIONS.items():
        assert widgets[name].get("class") == "QPushButton"
        enabled, why = flow.check(action)
        assert isinstance(enabled, bool) and why


@pytest.mark.parametrize("path", sorted((REPO / "ASFDALib").glob("*.py")), ids=lambda p: p.name)
def test_library_runs_on_the_python_of_slicer_5_4_to_5_8(path):
    """Slicer <= 5.8 ships Python 3.9: 3.9 grammar, and no 3.10-only keyword arguments such as zip(strict=)."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "zip":
            assert not node.keywords, f"{path.name}:{node.lineno} uses zip(strict=...), new in Python 3.10"
