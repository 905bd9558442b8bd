"""The multi-site generator, `asfda benchmark --quick` and `asfda demo` (that they run; the figures are
measured by the full protocol, not asserted here)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ASFDALib.app.cli import main
from ASFDALib.bench.phantoms import SITES, make_phantom, site_config, write_pool


def test_sites_differ_in_contrast_slice_thickness_and_field_of_view():
    shapes, spacings, means = [], [], []
    for site in SITES:
        image, label, affine = make_phantom(5, site_config(site))
        shapes.append(image.shape)
        spacings.append(np.diag(affine)[2])
        means.append([image[label == c].mean() for c in (1, 2, 3)])
    assert spacings == [2.0, 4.0, 6.0]
    assert shapes[0][2] > shapes[1][2] > shapes[2][2]
    orders = [tuple(np.argsort(m)) for m in means]
    assert len(set(orders)) == 3  # each site orders liver / kidney / gallbladder intensities differently


def test_rare_subgroups_change_the_anatomy_but_not_the_rest():
    _, normal, _ = make_phantom(9, site_config("A"))
    _, missing, _ = make_phantom(9, site_config("A", "missing_kidney"))
    image_lesion, lesion_label, _ = make_phantom(9, site_config("A", "lesion"))
    image_normal, _, _ = make_phantom(9, site_config("A"))
    assert 0 < (missing == 2).sum() < 0.7 * (normal == 2).sum()
    np.testing.assert_array_equal(lesion_label, normal)  # a cyst inside the liver is still liver
    assert not np.allclose(image_lesion, image_normal)


def test_the_source_domain_is_unchanged_by_site_options():
    from ASFDALib.bench.phantoms import domain_config

    a, la, _ = make_phantom(3, domain_config("ct"))
    b, lb, _ = make_phantom(3)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(a, b)


def test_pool_takes_sites_in_turn_with_about_ten_percent_rare(tmp_path):
    cases = write_pool(tmp_path, 20, seed=4)
    assert [c["site"] for c in cases[:6]] == ["A", "B", "C", "A", "B", "C"]
    assert sum(c["subgroup"] != "none" for c in cases) == 2
    assert json.loads((tmp_path / "cases.json").read_text())["cases"] == cases
    assert len(list((tmp_path / "labels").iterdir())) == 20


def test_quick_benchmark_runs_every_row_and_resumes(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["benchmark", "--quick", "--out", str(out)]) == 0
    report = json.loads((out / "benchmark.json").read_text())
    rows = {s["row"] for s in report["summary"].values()}
    assert rows == {
        "source",
        "random",
        "fg-random",
        "entropy",
        "epistemic",
        "coreset",
        "typiclust",
        "clasp-pe",
        "dkd",
        "asd",
        "asfda",
        "asfda+ssft",
        "full",
    }
    assert (out / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ASFDA (DKD + ASD) | 2 |" in (out / "benchmark.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert {s["row"] for s in summary} == rows
    assert set(summary[0]["per_group"]) == {"site", "subgroup"}  # the phantom test set carries both
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert main(["benchmark", "--quick", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == runs  # nothing was run twice
    (out / "benchmark.md").unlink()
    assert main(["benchmark", "--quick", "--out", str(out), "--report-only"]) == 0
    assert json.loads((out / "benchmark.json").read_text())["summary"] == report["summary"]
    assert (out / "benchmark.md").is_file()


@pytest.mark.parametrize("budget", [2])
def test_demo_runs_end_to_end(tmp_path, capsys, budget):
    out = tmp_path / "demo"
    assert (
        main(["demo", "--out", str(out), "--pool", "6", "--test", "2", "--budget", str(budget), "--iterations", "4"])
        == 0
    )
    report = json.loads((out / "demo.json").read_text())
    assert set(report["dice"]) == {"source", "random", "asfda"} and len(report["query"]) == budget
    assert (out / "demo.png").is_file() and (out / "session" / "ranking.png").is_file()
    assert "ASFDA vs random selection" in capsys.readouterr().out
