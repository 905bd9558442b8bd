"""Scenario (a), hospital shift within CT: the sites differ as scanners and protocols do, the source set
varies, and the source-model script plus `asfda benchmark --scenario ct-shift` run end to end (a handful
of iterations: the real training is benchmarks/train_source_model.py's long run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ASFDALib.app.cli import main
from ASFDALib.bench.phantoms import make_phantom
from ASFDALib.bench.scenarios import TARGET_SITES, source_config, target_config, write_target_split

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_source_model.py"


def test_target_hospitals_differ_in_noise_slices_phase_field_of_view_and_body_size():
    volumes = {site: make_phantom(11, target_config(site)) for site in TARGET_SITES}
    spacing_z = {site: float(np.diag(a)[2]) for site, (_, _, a) in volumes.items()}
    assert spacing_z == {"H1": 2.0, "H2": 6.0, "H3": 4.0}
    assert volumes["H2"][0].shape[0] < volumes["H1"][0].shape[0]  # H2's smaller reconstruction field
    liver = {site: float(np.median(img[lab == 1])) for site, (img, lab, _) in volumes.items()}
    kidney = {site: float(np.median(img[lab == 3])) for site, (img, lab, _) in volumes.items()}
    assert kidney["H1"] - liver["H1"] > 80 and kidney["H2"] - liver["H2"] < 60  # arterial vs delayed phase
    organ_ml = {site: (lab > 0).sum() * np.prod(np.diag(a)[:3]) / 1000 for site, (_, lab, a) in volumes.items()}
    assert organ_ml["H3"] > 1.5 * organ_ml["H1"]  # bariatric population: organs scale with the body (x1.5)


def test_source_protocols_vary_and_stay_inside_their_ranges():
    configs = [source_config(s) for s in range(40)]
    noises = [c.noise for c in configs]
    assert 5 <= min(noises) and max(noises) <= 20 and np.std(noises) > 3
    assert {c.contrast for c in configs} == {"ct_native", "ct_portal"}
    assert {c.slice_factor for c in configs} == {1, 2}
    assert 0 < sum(c.subgroup != "none" for c in configs) < 10


def test_target_split_records_site_and_subgroup(tmp_path):
    cases = write_target_split(tmp_path, 6, seed=3, prefix="pool")
    assert [c["site"] for c in cases] == ["H1", "H2", "H3"] * 2
    assert sum(c["subgroup"] != "none" for c in cases) == 1
    assert json.loads((tmp_path / "cases.json").read_text())["scenario"] == "ct-shift"


def test_source_model_script_and_ct_shift_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_source_model", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    models = tmp_path / "models"
    argv = ["--norm", "instance", "--volumes", "2", "--iterations", "2", "--check", "1", "--device", "cpu"]
    assert script.main([*argv, "--out", str(models), "--work", str(tmp_path / "work")]) == 0
    check = json.loads((models / "ct_source_instance_check.json").read_text())
    assert set(check["dice"]) == {"source", "H1", "H2", "H3"} and check["seconds_per_iteration"] > 0
    assert check["weights_mb"] < 20  # small enough to ship in Resources/
    card = json.loads((models / "ct_source_instance.card.json").read_text())
    assert card["network"]["args"]["norm"] == "instance" and len(card["class_names"]) == 6
    assert (models / "ct_source_instance_stats.npz").is_file()

    out = tmp_path / "bench"
    bench = ["benchmark", "--scenario", "ct-shift", "--model", str(models / "ct_source_instance.pt"), "--quick"]
    assert (
        main([*bench, "--rows", "source,random,asfda", "--validation", "3", "--device", "cpu", "--out", str(out)]) == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [s["row"] for s in summary] == ["source", "random", "asfda"]
    assert set(summary[0]["per_group"]["site"]) == {"H1", "H2", "H3"}
    assert all("validation_mean_dice" in s for s in summary)


def test_the_ct_to_mri_source_model_is_named_apart_and_checked_on_the_mri_sites():
    spec = importlib.util.spec_from_file_location("train_source_model", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.model_name("unet", "batch") == "ct_source_batch"
    assert script.model_name("unet", "batch", "percentile") == "ct_source_batch_percentile"  # never replaces it
    assert script.make_card("batch", "percentile").intensity.mode == "percentile"
    mri = script.check_targets("percentile")
    assert set(mri) == {"A", "B", "C"} and {c.domain for c in mri.values()} == {"mri"}
    assert all(c.anatomy == "rich" for c in mri.values())
    assert set(script.check_targets("ct")) == {"H1", "H2", "H3"}


@pytest.mark.parametrize("scenario,stem", [("ct-shift", "ct_source_batch"), ("mri-rich", "ct_source_batch_percentile")])
def test_a_rich_scenario_without_a_model_fine_tunes_its_shipped_source_model(tmp_path, scenario, stem):
    out = tmp_path / "bench"
    argv = [
        "benchmark", "--scenario", scenario, "--rows", "source", "--pool", "3", "--test", "1", "--seeds", "0,",
        "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "benchmark.json").read_text())
    assert report["class_names"] == ["background", "liver", "spleen", "kidney", "pancreas", "gallbladder"]
    # the model that was loaded is the scenario's shipped source model
    shipped = Path(__file__).resolve().parents[2] / "Resources" / "BenchmarkModels" / f"{stem}.pt"
    assert report["model"] == str(shipped)


@pytest.mark.parametrize(
    "stem,knowledge",
    [("ct_source_batch", "bn"), ("ct_source_dynunet_instance", "stats"), ("ct_source_batch_percentile", "bn")],
)
def test_the_shipped_source_models_load_with_their_cards_and_source_knowledge(stem, knowledge):
    """The benchmark's trained source models (benchmarks/train_source_model.py) ship in Resources/BenchmarkModels:
    five organs of the rich anatomy, the knowledge each gives DKD, and the check of their Dice per site."""
    from ASFDALib.bench.anatomy import RICH_CLASS_NAMES
    from ASFDALib.models.loading import load_model
    from ASFDALib.query.ranking import choose_knowledge

    folder = Path(__file__).resolve().parents[2] / "Resources" / "BenchmarkModels"
    model = load_model(folder / f"{stem}.pt")
    assert model.card.class_names == RICH_CLASS_NAMES
    assert choose_knowledge(model).kind == knowledge
    check = json.loads((folder / f"{stem}_check.json").read_text())
    sites = {"A", "B", "C"} if stem.endswith("_percentile") else {"H1", "H2", "H3"}  # CT -> MRI: the MRI sites
    assert set(check["dice"]) == {"source", *sites}
