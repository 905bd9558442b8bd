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


def _module_file(module: str):
    path = REPO.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _engine_imports(path) -> set[str]:
    """Every ASFDALib module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ASFDALib":
            found.add(node.module)
            found.update(
                f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}").is_file()
            )
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "ASFDALib")
    return found


def _shipped_engine() -> list[str]:
    """The engine files the panel and its self-test need: the import closure of the Slicer module's files,
    with the package __init__ files on the way."""
    todo = [m for path in (REPO / "ASFDA").rglob("*.py") for m in _engine_imports(path)]
    seen: set[str] = set()
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            module = ".".join(parts[:i])
            if module not in seen and _module_file(module).is_file():
                seen.add(module)
                todo.extend(_engine_imports(_module_file(module)))
    return sorted(str(_module_file(m).relative_to(REPO / "ASFDALib")) for m in seen)


def test_the_slicer_build_ships_exactly_the_engine_modules_the_panel_imports():
    listed = _cmake_list(MODULE_CMAKE.read_text(), "ASFDALIB_PYTHON_SCRIPTS")
    assert sorted(listed) == _shipped_engine()
    assert "app/cli.py" not in listed and "bench/benchmark.py" not in listed  # headless-only parts stay out
    for item in listed:
        assert (REPO / "ASFDALib" / item).is_file(), item


def test_every_resource_file_is_listed_in_cmake_and_exists():
    text = MODULE_CMAKE.read_text()
    resources = _cmake_list(text, "ASFDA_RESOURCES")
    for item in resources:
        assert (REPO / "Resources" / item).is_file(), item
    shipped = sorted(
        str(p.relative_to(REPO / "Resources"))
        for p in (REPO / "Resources").rglob("*")
        # the screenshots are for the catalog page, the benchmark's source models for the headless benchmark
        if p.is_file() and "Screenshots" not in p.parts and "BenchmarkModels" not in p.parts
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
    for path in sorted((REPO / "ASFDALib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            if "slicer" in names or "qt" in names:
                importers.append(str(path.relative_to(REPO / "ASFDALib")))
    assert set(importers) == {"app/mrml.py"}


def test_every_panel_button_exists_and_names_a_workflow_action():
    from ASFDALib.app.workflow import BUTTON_ACTIONS, Workflow

    widgets = _ui_widgets()
    flow = Workflow()
    for name, action in BUTTON_ACTIONS.items():
        assert widgets[name].get("class") == "QPushButton"
        enabled, why = flow.check(action)
        assert isinstance(enabled, bool) and why


@pytest.mark.parametrize("path", sorted((REPO / "ASFDALib").rglob("*.py")), ids=lambda p: p.name)
def test_library_runs_on_the_python_of_slicer_5_4_to_5_8(path):
    """Slicer <= 5.8 ships Python 3.9: 3.9 grammar, and no 3.10-only keyword arguments such as zip(strict=)."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "zip":
            assert not node.keywords, f"{path.name}:{node.lineno} uses zip(strict=...), new in Python 3.10"
