"""The Slicer panel's pure helpers (ASFDA/ASFDAPanelLib): dependency checks, torch pinning, state conversions."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

from conftest import REPO
from packaging.requirements import Requirement

sys.path.insert(0, str(REPO / "ASFDA"))  # Slicer puts the module's folder on sys.path; so do we

from ASFDAPanelLib import dependencies, state  # noqa: E402

from ASFDALib.app.workflow import PanelSettings, TableRow, Workflow  # noqa: E402


# --- dependencies ----------------------------------------------------------------------------------------
def _versions(**found):
    return lambda name: found.get(name)


def test_versions_are_compared_not_just_found():
    assert dependencies.satisfied("monai>=1.4", "1.4.0")
    assert dependencies.satisfied("scipy>=1.10", "1.11.2")  # numerically, not as text ("1.11" < "1.2")
    assert not dependencies.satisfied("monai>=1.4", "1.3.2")
    assert not dependencies.satisfied("monai>=1.4", None)
    assert dependencies.satisfied("torch>=2.3", "2.4.1+cu121")
    assert not dependencies.satisfied("torch>=2.3", "2.2.2+cpu")


def test_unmet_lists_missing_and_too_old_packages_in_order():
    found = _versions(monai="1.3.2", nibabel="5.2.1", einops="0.8.0", scipy="1.13.1", pyyaml="6.0.1", rich="13.7")
    assert dependencies.unmet(version_of=found) == ["monai>=1.4", "matplotlib>=3.7", "filelock>=3.22"]
    everything = dict(
        monai="1.4",
        nibabel="5.0",
        einops="0.6",
        scipy="1.10",
        pyyaml="6.0",
        rich="13",
        matplotlib="3.7",
        filelock="3.22",
    )
    assert dependencies.unmet(version_of=_versions(**everything)) == []


def test_matplotlib_and_filelock_are_installed_with_the_other_requirements():
    assert "matplotlib>=3.7" in dependencies.REQUIREMENTS
    assert "filelock>=3.22" in dependencies.REQUIREMENTS  # the session lock
    assert not any(r.startswith("torch") for r in dependencies.REQUIREMENTS)  # torch never comes from PyPI here


def test_torch_floor_is_the_one_the_code_needs_everywhere():
    assert dependencies.TORCH_FLOOR == "2.3" and dependencies.TORCH_REQUIREMENT == ">=2.3"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'"torch>=([\d.]+)"', pyproject).group(1) == dependencies.TORCH_FLOOR
    assert "GradScaler" in (REPO / "ASFDALib" / "adaptation" / "trainer.py").read_text()  # the reason for the floor
    assert dependencies.torch_problem("2.3.0") is None and dependencies.torch_problem("2.5.1+cu124") is None
    old = dependencies.torch_problem("2.2.2")
    assert "torch 2.2.2 is older than the 2.3 ASFDA needs" in old and "PyTorch Utils" in old
    assert "PyTorch extension" in dependencies.torch_problem(None)


def test_the_constraints_file_pins_exactly_the_installed_torch_build(tmp_path):
    path = dependencies.write_constraints(tmp_path, "2.4.1+cu121")
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert lines == ["torch==2.4.1+cu121"]
    # Read as pip reads it (packaging's specifiers): only that build satisfies it, not a PyPI upgrade
    # and not the same version without the CUDA label.
    pin = Requirement(lines[0])
    assert pin.name == "torch" and pin.specifier.contains("2.4.1+cu121")
    assert not pin.specifier.contains("2.5.0") and not pin.specifier.contains("2.4.2")
    assert dependencies.pip_arguments(["monai>=1.4"], path) == ["-c", str(path), "monai>=1.4"]


def test_every_requirement_is_valid_pep_508_and_matches_pyproject():
    pyproject = (REPO / "pyproject.toml").read_text()
    for text in dependencies.REQUIREMENTS:
        requirement = Requirement(text)
        assert f'"{requirement.name}{requirement.specifier}"' in pyproject, text


def test_report_names_versions_and_what_is_missing():
    found = _versions(torch="2.2.0", monai="1.4.0", nibabel="5.2.1", scipy="1.13.1")
    assert dependencies.report(found) == (
        "torch 2.2.0 (needs >=2.3), monai 1.4.0, nibabel 5.2.1, to install: einops, pyyaml, rich, matplotlib, filelock"
    )


# --- state: parameter node <-> workflow settings -----------------------------------------------------------
def _parameters(**values):
    """The parameter node's fields as Slicer's wrapper returns them: Path() for an empty path."""
    defaults = dict(
        model=Path(),
        card=Path(),
        trust=False,
        images=Path(),
        session=Path(),
        device="auto",
        budget=4,
        alpha=0.5,
        strategy="asfda",
        iterations=200,
        pseudo=True,
        pseudo_gate="rounds",
    )
    return SimpleNamespace(**{**defaults, **values})


def test_an_empty_path_field_is_no_path_for_the_engine():
    assert Path("") == Path(".")  # why: what an empty ctkPathLineEdit gives the parameter node
    values = state.settings_values(_parameters(images=Path("/data/ct")))
    settings = PanelSettings(**values)
    assert settings.model == "" and settings.card == "" and settings.session == ""
    assert settings.images == str(Path("/data/ct"))
    assert Workflow(settings).check("rank") == (False, "choose a session folder")  # not the folder "."


def test_the_panel_fine_tunes_without_data_loader_processes():
    settings = PanelSettings(**state.settings_values(_parameters(iterations=50)))
    assert settings.workers == 0 and settings.pseudo_iterations == 50


def test_parameter_values_round_trip():
    settings = PanelSettings(model="/m/model.pt", images="/data", session="/s", budget=7, alpha=0.25, strategy="dkd")
    values = state.parameter_values(settings)
    assert values["model"] == Path("/m/model.pt") and values["card"] == Path()
    assert PanelSettings(**state.settings_values(SimpleNamespace(**values))).__dict__ == {
        **settings.__dict__,
        "workers": 0,
    }


def test_reopening_a_session_restores_its_settings_into_the_parameter_node(mri_pool, tmp_path):
    """Choosing an existing session folder restores it, and the next refresh does not overwrite it."""
    first = Workflow(
        PanelSettings(images=str(mri_pool / "images"), session=str(tmp_path / "s"), budget=3, alpha=0.3, strategy="dkd")
    )
    first.start_rank()
    first.wait()
    assert len(first.query) == 3
    # A fresh panel: the user only picks the session folder (what ASFDAWidget.onSessionChanged does).
    node = _parameters(session=Path(tmp_path / "s"))
    flow = Workflow(PanelSettings(**state.settings_values(node)))
    assert flow.reopen()
    for name, value in state.parameter_values(flow.settings).items():
        setattr(node, name, value)
    assert (node.images, node.budget, node.alpha, node.strategy) == (mri_pool / "images", 3, 0.3, "dkd")
    refreshed = PanelSettings(**state.settings_values(node))  # every refresh reads the parameter node
    assert (refreshed.images, refreshed.budget, refreshed.strategy) == (str(mri_pool / "images"), 3, "dkd")
    assert flow.query == first.query


# --- state: the results table ------------------------------------------------------------------------------
def _rows(status="unlabelled", selected=True):
    return [
        TableRow("1", "a.nii.gz", "0.91", "0.5", "1.0", "0.4", status, selected),
        TableRow("2", "b.nii.gz", "0.72", "0.3", "0.8", "0.4", "unlabelled", False),
    ]


def test_an_unchanged_table_is_not_touched_and_a_change_is_one_cell():
    shown = {cells[1]: cells for cells in map(state.row_cells, _rows())}
    assert state.table_plan(shown, _rows()) == []
    assert state.table_plan(shown, _rows(status="labelled")) == [("a.nii.gz", 6, "labelled")]
    assert state.table_plan(shown, _rows(selected=False)) == [("a.nii.gz", state.SELECTED, False)]


def test_a_new_ranking_rebuilds_the_table():
    shown = {cells[1]: cells for cells in map(state.row_cells, _rows())}
    assert state.table_plan(shown, _rows()[:1]) is None
    assert state.table_plan({}, _rows()) is None
    assert state.table_plan({}, []) == []


def test_numbers_sort_as_numbers_and_placeholders_stay_text():
    assert state.display_value(2, "0.91") == 0.91 and state.display_value(0, "10") == 10.0
    assert state.display_value(3, "—") == "—" and state.display_value(1, "12.nii.gz") == "12.nii.gz"


def test_the_results_table_has_a_header_with_a_tooltip_for_every_number_it_shows():
    import xml.etree.ElementTree as ET

    from conftest import REPO

    table = ET.parse(REPO / "Resources" / "UI" / "ASFDA.ui").getroot().find(".//widget[@name='resultsTable']")
    headers = [c.find("./property[@name='text']/string").text for c in table.findall("column")]
    assert headers == ["Rank", "Case", "Score", "Gap", "Div.", "ASD", "Status"]
    assert len(headers) == len(state.COLUMNS)
    tips = {
        c.find("./property[@name='text']/string").text: c.find("./property[@name='toolTip']")
        for c in table.findall("column")
    }
    assert all(tips[h] is not None for h in ("Score", "Gap", "Div.", "ASD"))
