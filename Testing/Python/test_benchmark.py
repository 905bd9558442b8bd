"""The multi-site generator, `asfda benchmark --quick` and `asfda demo` (that they run; the figures are
measured by the full protocol, not asserted here)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from ASFDALib.adaptation.recipe import FinetuneConfig
from ASFDALib.app.cli import main
from ASFDALib.bench.phantoms import SITES, make_phantom, site_config, write_pool
from ASFDALib.errors import ASFDAError
from ASFDALib.models.loading import ModelSource
from ASFDALib.query.selection import DEFAULT_FUSION


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
        "ssft-control",
        "full",
    }
    assert (out / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ASFDA (DKD + ASD) | 2 |" in (out / "benchmark.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert {s["row"] for s in summary} == rows
    assert json.loads((out / "data" / "scenario.json").read_text()) == {"scenario": "ct-shift"}  # the default
    # how many volumes each row trained on: the budget, the whole pool for the upper bound, none for the source
    labelled = {s["row"]: s["labelled"] for s in summary if s["budget"] in (0, 2)}
    assert (labelled["source"], labelled["asfda"], labelled["full"]) == (0, 2, report["config"]["pool"])
    assert set(summary[0]["per_group"]) == {"site", "subgroup"}  # the phantom test set carries both
    runs = json.loads((out / "results.json").read_text())["runs"]
    # what stage 2 pseudo-labelled is recorded for the SSFT runs, and only for them
    assert all(isinstance(r["pseudo_labelled"], list) == (r["row"] == "asfda+ssft") for r in runs)
    # and which gate judged their pool: rounds, or its flips fallback where rounds kept no volume
    gates = {r["pseudo_gate"] for r in runs if r["row"] == "asfda+ssft"}
    assert gates and gates <= {"rounds", "flips"}
    assert all(r["pseudo_gate"] == "" for r in runs if r["row"] != "asfda+ssft")
    capsys.readouterr()
    assert main(["benchmark", "--quick", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == runs  # nothing was run twice
    # a resume's own time is short: the runs' time is said beside it, from their records
    spent = sum(r["seconds"] for r in runs)
    said = " ".join(capsys.readouterr().out.split())
    assert f"this time ({len(runs)} runs, {spent:.0f} s in all)" in said or (
        f"this time ({len(runs)} runs, {spent / 60:.1f} min in all)" in said
    )
    (out / "benchmark.md").unlink()
    assert main(["benchmark", "--quick", "--out", str(out), "--report-only"]) == 0
    assert json.loads((out / "benchmark.json").read_text())["summary"] == report["summary"]
    assert (out / "benchmark.md").is_file()


def test_a_report_of_a_folder_no_benchmark_wrote_is_refused_and_writes_nothing(tmp_path, capsys):
    """--report-only where no results.json is (a mistyped --out): refused in one line, no folder made; nor
    does a report write into an input folder, as a run may not."""
    data = _user_folders(tmp_path / "data")
    assert main(["benchmark", "--out", str(tmp_path / "nosuch"), "--report-only"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"{tmp_path / 'nosuch' / 'results.json'}: not found, so there are no runs to report" in err
    assert not (tmp_path / "nosuch").exists()
    inside = data / "pool" / "report"
    assert main([*_tiny_run(data, inside), "--report-only"]) == 1
    assert "--out is inside the --pool folder" in " ".join(capsys.readouterr().err.split())
    assert not inside.exists()
    # a report of rows none of which ran, or by another model than the runs': refused, naming what is there
    out = tmp_path / "bench"
    assert main(_tiny_run(data, out)) == 0
    capsys.readouterr()
    args = _tiny_run(data, out)
    args[args.index("--rows") + 1] = "asfda+ssft"
    assert main([*args, "--report-only"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "none of the rows asked for ran (asfda+ssft); it holds random: give --rows among those" in err
    other = tmp_path / "other.pt"
    other.write_bytes(b"not the weights the runs were made with")
    assert main([*_tiny_run(data, out, other), "--report-only"]) == 1
    assert f"{other}: not the model the runs in {out / 'results.json'} were made with" in capsys.readouterr().err


@pytest.mark.parametrize("scenario, classes", [("ct-shift", 6), ("mri", 4)])
def test_demo_runs_end_to_end_in_either_scenario(tmp_path, capsys, scenario, classes):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--pool", "6", "--test", "2", "--budget", "2", "--iterations", "4"]
    assert main([*argv, "--scenario", scenario]) == 0
    report = json.loads((out / "demo.json").read_text())
    assert set(report["dice"]) == {"source", "random", "asfda"} and len(report["query"]) == 2
    assert report["config"]["scenario"] == scenario and len(report["class_names"]) == classes
    # the adapted model's share of source weights: none where the fallback judged (the MRI-like pool)
    assert report["handover_blend"] in ((0.0,) if scenario == "mri" else (0.0, 0.2))
    # and how stage 2 ran: the fixed teacher's patches mixed with the labelled ones where the rounds gate kept
    # volumes; an EMA teacher's (a fallback judged) unmixed; nothing where no volume was pseudo-labelled
    stage2 = (report["pseudo_teacher"], report["pseudo_mix"])
    assert stage2 == ("", "") if not report["pseudo_labelled"] else stage2 in (("fixed", "copy-paste"), ("ema", "none"))
    assert (out / "demo.png").is_file() and (out / "session" / "ranking.png").is_file()
    printed = capsys.readouterr().out
    said = " ".join(printed.split())
    # what is compared, and that it is one draw: the table's note and the last lines say so
    assert "ASFDA (its query, then selective pseudo-labels) vs random selection (labels only), the same 2" in said
    assert "on this one pool and seed (the benchmark measures it over seeds)" in said
    assert "One pool and one training seed (0), the same iterations for both queries" in said
    assert f"The measurement is `asfda benchmark --scenario {scenario}`" in said
    # captured output is no terminal: the progress is plain lines, the first and the last stage among them
    assert printed.startswith("Demo 0% generating a 3-site") and "\nDemo 100% done, elapsed" in printed


def test_the_demos_next_steps_name_the_command_as_it_was_started(tmp_path, monkeypatch):
    """After `make run` the environment is not activated: the next round's commands name .venv/bin/asfda,
    and plain `asfda` where that name finds the same program."""
    from ASFDALib.app.commands import invoked_as

    program = tmp_path / ".venv" / "bin" / "asfda"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [str(program), "demo"])
    monkeypatch.setenv("PATH", "/usr/bin")
    assert invoked_as() == ".venv/bin/asfda"
    monkeypatch.chdir(program.parent)  # ./asfda in its own folder: the bare name would not find it
    assert invoked_as() == "./asfda"
    monkeypatch.setenv("PATH", str(program.parent))
    assert invoked_as() == "asfda"


def test_the_demo_refuses_a_budget_the_pool_cannot_hold_and_a_folder_that_is_not_a_demos(tmp_path, capsys):
    """A budget of the whole pool makes ASFDA and random label the same volumes; a folder of other files could
    lose its data/ and session/ to the demo's: each refused before any work, in one line."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--pool", "4", "--budget", "4"]) == 1
    assert "--budget 4 must be below --pool 4" in capsys.readouterr().err
    mine = tmp_path / "home"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "thesis.txt").write_text("keep me")
    assert main(["demo", "--out", str(mine), "--pool", "6", "--budget", "2", "--iterations", "2"]) == 1
    assert "holds files of no demo (no data/scenario.json)" in " ".join(capsys.readouterr().err.split())
    assert (mine / "data" / "thesis.txt").read_text() == "keep me"


def test_a_demo_run_again_with_another_pool_makes_its_data_anew_and_records_what_ran(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--test", "2", "--budget", "2", "--iterations", "2", "--scenario", "mri"]
    assert main([*argv, "--pool", "5"]) == 0
    assert main([*argv, "--pool", "4"]) == 0
    assert "Replacing the earlier demo in" in " ".join(capsys.readouterr().out.split())
    assert len(list((out / "data" / "pool" / "images").iterdir())) == 4
    assert json.loads((out / "demo.json").read_text())["config"]["pool"] == 4
    (out / "data" / "scenario.json").unlink()  # a demo folder made before the marker was written: still a demo's
    assert main([*argv, "--pool", "4"]) == 0
    # the README invites going on from the demo's session: what the user did there is not replaced
    said = " ".join(capsys.readouterr().out.split())
    labels = out / "data" / "pool" / "labels"
    assert f"Next round: 'asfda rank --out {out / 'session'}', then 'asfda labels import" in said
    assert main(["rank", "--out", str(out / "session")]) == 0  # round 2, as the demo's last line says
    assert main(["labels", "import", str(out / "session"), "--from", str(labels)]) == 0
    before = (out / "session" / "session.json").read_bytes()
    assert main([*argv, "--pool", "4"]) == 1
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert f"{out / 'session'}: holds work the demo did not do (2 rounds), and the demo replaces its session" in err
    assert "Replacing" not in captured.out  # refused before anything says it replaces
    assert (out / "session" / "session.json").read_bytes() == before and (out / "demo.json").is_file()


def _user_folders(root):
    """The layout `asfda phantoms` writes, as a research group would hand it over (with a site file)."""
    write_pool(root / "pool", 4, seed=21, prefix="p")
    write_pool(root / "test", 2, seed=22, prefix="t")
    write_pool(root / "val", 2, seed=23, prefix="v")
    return root


def test_benchmark_on_the_users_own_folders_writes_results_summary_table_and_plot(tmp_path, capsys):
    from ASFDALib.models.defaults import default_model_path

    data = _user_folders(tmp_path / "data")
    out = tmp_path / "bench"
    argv = [
        "benchmark", "--model", str(default_model_path()), "--pool", str(data / "pool"), "--test", str(data / "test"),
        "--validation", str(data / "val"), "--budgets", "1", "--seeds", "0,1", "--rows", "random,typiclust,clasp-pe",
        "--iterations", "2", "--eval-at", "1", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["row"], s["budget"], s["seeds"]) for s in summary] == [
        ("random", 1, [0, 1]),
        ("typiclust", 1, [0, 1]),
        ("clasp-pe", 1, [0, 1]),
    ]
    for entry in summary:
        assert 0.0 <= entry["mean_dice"] <= 100.0 and list(entry["per_class"]) == ["liver", "kidney", "gallbladder"]
        assert "validation_mean_dice" in entry and set(entry["per_group"]["site"]) <= {"A", "B", "C"}
    typiclust = summary[1]["diff_vs_random"]
    assert typiclust["seeds"] == [0, 1] and typiclust["ci95"] is None  # two seeds: no interval
    assert "[2 seeds: no interval below 3]" in (out / "benchmark.md").read_text()
    results = json.loads((out / "results.json").read_text())
    # what ran on the user's folders: their fingerprints, not the phantom settings
    assert results["class_names"] == ["background", "liver", "kidney", "gallbladder"]
    assert not {"pool", "test", "data_seed", "scenario"} & set(results["config"])
    assert len(results["protocol"]["files"]) == 2 * (4 + 2 + 2) and results["protocol"]["model"]
    runs = results["runs"]
    assert len(runs) == 6 and all(
        len(r["query"]) == 1 and set(r["cases"]) == {"t_000_siteA.nii.gz", "t_001_siteB.nii.gz"} for r in runs
    )
    assert all(set(r["curve"]) == {"1", "2"} for r in runs if not r["shared_with"])
    assert "Δ vs random" in (out / "benchmark.md").read_text()
    assert (out / "benchmark.png").read_bytes()[:4] == b"\x89PNG" and (out / "benchmark_diff.png").is_file()
    assert (out / "benchmark_curves.png").is_file() and len(json.loads((out / "curves.json").read_text())) == 6
    # the same command again runs nothing and says so
    capsys.readouterr()
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "resuming: 6 of 6 runs are already in" in said and "Benchmark 0/6" not in said
    assert json.loads((out / "results.json").read_text())["runs"] == runs
    # resuming with other iterations would mix protocols: refused, naming the file
    longer = list(argv)
    longer[argv.index("--iterations") + 1] = "3"
    assert main(longer) == 1
    assert "results.json: its runs were made with other iterations (2 here, 3 now)" in capsys.readouterr().err
    # so would another recipe (a learning rate being chosen on --validation)
    assert main([*argv, "--lr", "1e-3"]) == 1
    assert "results.json: its runs were made with other lr" in capsys.readouterr().err
    # and another way of combining DKD and ASD
    other = "gated" if DEFAULT_FUSION == "sum" else "sum"
    assert main([*argv, "--fusion", other]) == 1
    assert "results.json: its runs were made with other fusion" in capsys.readouterr().err
    # and another rule for which loaded tensors learn at the lower rate
    other = "loaded" if FinetuneConfig.lower_rate_for == "encoder" else "encoder"
    assert main([*argv, "--lower-rate-for", other]) == 1
    assert "results.json: its runs were made with other lower_rate_for" in capsys.readouterr().err
    # and another pseudo-label gate
    other = "rounds" if FinetuneConfig.reliability != "rounds" else "flips"
    assert main([*argv, "--pseudo-gate", other]) == 1
    err = " ".join(capsys.readouterr().err.split())
    # only the option changed is named, not the EMA weight that is part of one protocol and not the other
    assert f"results.json: its runs were made with other ssft reliability ({FinetuneConfig.reliability} here," in err
    assert "ema_weight" not in err
    # an agreement floor without an agreement gate changes nothing: refused as such, before any work
    assert main([*argv, "--pseudo-gate", "confidence", "--min-agreement", "0.7"]) == 1
    assert "--min-agreement is the floor of the flips and rounds gates" in capsys.readouterr().err
    # and a fallback the confidence gate never hands over to
    assert main([*argv, "--pseudo-gate", "confidence", "--pseudo-fallback", "flips"]) == 1
    assert "the confidence gate always keeps some" in capsys.readouterr().err
    # and strong augmentation where the runs had the weak one: another protocol
    other = "weak" if FinetuneConfig.pseudo_augment == "strong" else "strong"
    assert main([*argv, "--pseudo-augment", other]) == 1
    assert "results.json: its runs were made with other ssft pseudo_augment" in capsys.readouterr().err
    # and another teacher of the pseudo-labelled patches
    other = "fixed" if FinetuneConfig.teacher != "fixed" else "ema"
    assert main([*argv, "--pseudo-teacher", other]) == 1
    err = capsys.readouterr().err
    assert f"teacher ({FinetuneConfig.teacher} here, {other} now)" in err and "ema_weight" not in err
    # and another schedule of stage 2's rate
    other = "cosine" if FinetuneConfig.stage2_lr == "constant" else "constant"
    assert main([*argv, "--stage2-lr", other]) == 1
    assert f"its runs were made with other ssft stage2_lr ({FinetuneConfig.stage2_lr} here, {other} now)" in (
        capsys.readouterr().err
    )


def _tiny_run(data, out, model=None):
    """One random run of one iteration on the user's folders (the cheapest complete benchmark)."""
    from ASFDALib.models.defaults import default_model_path

    return [
        "benchmark", "--model", str(model or default_model_path()), "--pool", str(data / "pool"),
        "--test", str(data / "test"), "--budgets", "1", "--seeds", "1", "--rows", "random", "--iterations", "1",
        "--device", "cpu", "--out", str(out),
    ]  # fmt: skip


def test_a_scenario_beside_your_own_folders_is_refused_and_none_is_part_of_their_protocol(tmp_path, capsys):
    """--scenario picks phantom data; on the user's folders it would be ignored, so it is refused. Runs recorded
    when the default scenario was part of every protocol (mri) still resume."""
    data = _user_folders(tmp_path / "data")
    out = tmp_path / "bench"
    assert main([*_tiny_run(data, out), "--scenario", "ct-shift"]) == 1
    assert "--scenario ct-shift picks phantom data" in " ".join(capsys.readouterr().err.split())
    folders = ["--pool", str(data / "pool"), "--test", str(data / "test")]  # said first, before --model is asked for
    assert main(["benchmark", *folders, "--scenario", "mri", "--out", str(out)]) == 1
    assert "--scenario mri picks phantom data" in " ".join(capsys.readouterr().err.split())
    assert not out.exists()
    assert main(_tiny_run(data, out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert "scenario" not in results["protocol"]
    results["protocol"]["scenario"] = "mri"  # as recorded before 2026-12-06
    (out / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    assert main(_tiny_run(data, out)) == 0
    assert "resuming: 1 of 1 runs are already in" in " ".join(capsys.readouterr().out.split())


def test_phantom_data_of_the_earlier_default_scenario_is_named_with_the_option_that_resumes_it(tmp_path, capsys):
    """Before 2026-12-06 a benchmark without --scenario ran mri (and its first data carried no marker)."""
    out = tmp_path / "bench"
    (out / "data" / "pool").mkdir(parents=True)
    assert main(["benchmark", "--quick", "--out", str(out)]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert "holds the mri scenario's data; give --scenario mri to resume that benchmark, or another --out" in said


def test_a_resume_after_the_model_or_a_label_changed_is_refused_naming_what_changed(tmp_path, capsys):
    from ASFDALib.models.defaults import default_model_path

    data = _user_folders(tmp_path / "data")
    out = tmp_path / "bench"
    assert main(_tiny_run(data, out)) == 0
    before = (out / "results.json").read_bytes()
    # a fine-tuned copy of the model is another model: its runs would be mislabelled as the first one's
    other = tmp_path / "other.pt"
    shutil.copy(default_model_path(), other)
    shutil.copy(default_model_path().with_suffix(".card.json"), tmp_path / "other.card.json")
    with open(other, "ab") as handle:
        handle.write(b"\0")
    assert main(_tiny_run(data, out, other)) == 1
    assert "its runs were made with other model file contents" in capsys.readouterr().err
    # a corrected label
    label = data / "test" / "labels" / "t_000_siteA.nii.gz"
    nib = pytest.importorskip("nibabel")
    img = nib.load(label)
    array = np.asarray(img.dataobj).copy()
    array[array == 1] = 0
    nib.save(nib.Nifti1Image(array, img.affine), label)
    assert main(_tiny_run(data, out)) == 1
    assert "other data files (test/labels/t_000_siteA.nii.gz)" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_a_resume_without_a_rate_the_runs_were_given_is_refused_naming_it(tmp_path, capsys):
    data = _user_folders(tmp_path / "data")
    out = tmp_path / "bench"
    assert main([*_tiny_run(data, out), "--lr", "1e-3"]) == 0
    # the same command without --lr would train at the recipe's default rate: other runs, said so
    assert main(_tiny_run(data, out)) == 1
    assert "its runs were made with other lr (0.001 here, the default now: give it again)" in capsys.readouterr().err


def test_a_resume_given_a_rate_the_runs_left_to_the_default_is_refused_saying_to_leave_it_out(tmp_path, capsys):
    """The recipe's default then need not be today's, so naming today's default is another run: said how to resume."""
    data = _user_folders(tmp_path / "data")
    out = tmp_path / "bench"
    assert main(_tiny_run(data, out)) == 0
    assert main([*_tiny_run(data, out), "--lr", "3e-3"]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert "other lr (left to the default when these runs were made, 0.003 now: leave it out)" in said


def _shifted_label(d):
    nib = pytest.importorskip("nibabel")
    path = d / "test" / "labels" / "t_000_siteA.nii.gz"
    img = nib.load(path)
    affine = img.affine.copy()
    affine[0, 3] += 30.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), path)


def _foreign_class(d):
    nib = pytest.importorskip("nibabel")
    path = d / "pool" / "labels" / "p_002_siteC.nii.gz"
    img = nib.load(path)
    array = np.asarray(img.dataobj).astype(np.uint8)
    array[array == 1] = 7
    nib.save(nib.Nifti1Image(array, img.affine), path)


def _short_label(d):
    nib = pytest.importorskip("nibabel")
    path = d / "pool" / "labels" / "p_001_siteB.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., :-4], img.affine), path)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (_shifted_label, "t_000_siteA.nii.gz: label geometry differs from the image's: origin by 30 mm"),
        (_foreign_class, "p_002_siteC.nii.gz: label values [7] are not classes of the model"),
        (_short_label, "p_001_siteB.nii.gz: label grid"),
    ],
)
def test_labels_the_model_cannot_use_are_refused_by_name_before_any_work(tmp_path, capsys, breakage, message):
    data = _user_folders(tmp_path / "data")
    breakage(data)
    out = tmp_path / "bench"
    assert main(_tiny_run(data, out)) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (out / "results.json").exists()


def test_an_output_folder_inside_an_input_folder_is_refused(tmp_path, capsys):
    data = _user_folders(tmp_path / "data")
    assert main(_tiny_run(data, data / "pool" / "images")) == 1
    assert "--out is inside the --pool folder" in capsys.readouterr().err
    assert sorted(p.name for p in (data / "pool" / "images").iterdir()) == [
        f"p_00{i}_site{s}.nii.gz" for i, s in enumerate("ABCA")
    ]


def test_files_that_are_not_volumes_are_not_cases(tmp_path, capsys):
    data = _user_folders(tmp_path / "data")
    (data / "pool" / "images" / "README.txt").write_text("scans from site A")
    assert main(_tiny_run(data, tmp_path / "bench")) == 0
    runs = json.loads((tmp_path / "bench" / "results.json").read_text())["runs"]
    assert all(name.endswith(".nii.gz") for r in runs for name in r["query"])


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--iterations", "0", "0 is not a positive integer"),
        ("--budgets", "0", "0 is not a positive integer"),
        ("--budgets", "2,2", "2 is listed twice"),
        ("--seeds", "0,0", "0 is listed twice"),
        ("--seeds", "0", "one number is a count of seeds"),
        ("--rows", "", "empty; choose from"),
        ("--rows", "random,asdfa", "unknown 'asdfa'; did you mean asfda?"),
    ],
)
def test_benchmark_arguments_are_checked_while_parsed(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", option, value, "--out", str(tmp_path / "b")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("setting", "then", "other", "rest"),
    [
        ("fusion", "sum", "gated", {"lower_rate_for": "encoder"}),  # DKD and ASD were summed
        ("lower_rate_for", "encoder", "loaded", {"fusion": "gated"}),  # only the encoder was slowed
    ],
)
def test_runs_recorded_before_a_setting_was_a_choice_resume_as_what_ran_then(tmp_path, setting, then, other, rest):
    from ASFDALib.bench.benchmark import _load_runs

    protocol = {"iterations": 400, "scenario": "ct-shift", **rest}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"protocol": protocol, "runs": []}))
    assert _load_runs(path, {**protocol, setting: then}) == []
    with pytest.raises(ASFDAError, match=f"other {setting}"):
        _load_runs(path, {**protocol, setting: other})


def test_runs_recorded_before_pseudo_labels_had_an_agreement_gate_resume_as_confidence_gated(tmp_path):
    from dataclasses import asdict

    from ASFDALib.bench.benchmark import SSFTOptions, _load_runs, _ssft_protocol

    before = {"stage1_fraction": 1.0, "keep_fraction": 0.5, "confidence": 0.9, "extra_fraction": 0.5}
    path = tmp_path / "results.json"
    rest = {"iterations": 400, "fusion": "gated", "lower_rate_for": "encoder"}
    path.write_text(json.dumps({"protocol": {**rest, "ssft": before}, "runs": []}))
    # the options as they were then: each field added since at the value those runs ran with
    then = {
        "stage2_lr": "constant",
        "fallback": "none",
        "pseudo_augment": "weak",
        "teacher": "fixed",
        "pseudo_mix": "none",
    }
    confidence = _ssft_protocol(asdict(SSFTOptions(reliability="confidence", **then)))
    assert _load_runs(path, {**rest, "ssft": confidence}) == []
    with pytest.raises(ASFDAError, match=r"pseudo_augment \(weak here, strong now\)"):
        _load_runs(path, {**rest, "ssft": {**confidence, "pseudo_augment": "strong"}})
    with pytest.raises(ASFDAError, match=r"pseudo_mix \(none here, copy-paste now\)"):
        _load_runs(path, {**rest, "ssft": {**confidence, "pseudo_mix": "copy-paste"}})
    with pytest.raises(ASFDAError, match="other ssft"):
        _load_runs(path, {**rest, "ssft": {**confidence, "reliability": "rounds"}})


def test_the_ema_teachers_weight_is_part_of_the_protocol_only_where_an_ema_teacher_can_label(tmp_path):
    from dataclasses import asdict

    from ASFDALib.bench.benchmark import SSFTOptions, _load_runs, _ssft_protocol

    rest = {"iterations": 400, "fusion": "gated", "lower_rate_for": "encoder"}
    path = tmp_path / "results.json"
    for options, refused in (
        ({"teacher": "fixed"}, False),
        ({"teacher": "ema-if-fallback", "fallback": "none"}, False),  # no fallback judges: no EMA teacher labels
        ({"teacher": "ema-if-fallback", "reliability": "confidence"}, False),  # it always keeps some volume
        ({"teacher": "ema-if-fallback"}, True),
        ({"teacher": "ema", "reliability": "confidence"}, True),
    ):
        before = {k: v for k, v in asdict(SSFTOptions(**options)).items() if k != "ema_weight"}  # ran at 1
        path.write_text(json.dumps({"protocol": {**rest, "ssft": before}, "runs": []}))
        now = {**rest, "ssft": _ssft_protocol(asdict(SSFTOptions(**options, ema_weight=0.5)))}
        if refused:
            with pytest.raises(ASFDAError, match=r"ema_weight \(1.0 here, 0.5 now\)"):
                _load_runs(path, now)
        else:
            assert _load_runs(path, now) == []


def test_the_mix_is_part_of_the_protocol_only_where_the_fixed_teacher_can_label(tmp_path):
    from dataclasses import asdict

    from ASFDALib.bench.benchmark import SSFTOptions, _load_runs, _ssft_protocol

    rest = {"iterations": 400, "fusion": "gated", "lower_rate_for": "encoder"}
    path = tmp_path / "results.json"
    for teacher, refused in (("fixed", True), ("ema-if-fallback", True), ("ema", False)):
        before = _ssft_protocol(asdict(SSFTOptions(teacher=teacher, pseudo_mix="none")))
        path.write_text(json.dumps({"protocol": {**rest, "ssft": before}, "runs": []}))
        now = {**rest, "ssft": _ssft_protocol(asdict(SSFTOptions(teacher=teacher, pseudo_mix="copy-paste")))}
        if refused:
            with pytest.raises(ASFDAError, match=r"pseudo_mix \(none here, copy-paste now\)"):
                _load_runs(path, now)
        else:
            assert _load_runs(path, now) == []


def test_the_benchmark_command_mixes_the_ssft_rows_patches_as_asked(tmp_path):
    from ASFDALib.app.cli import build_parser
    from ASFDALib.app.commands import benchmark_config

    args = build_parser().parse_args(["benchmark", "--pseudo-mix", "copy-paste", "--out", str(tmp_path / "b")])
    assert benchmark_config(args)[0].ssft.pseudo_mix == "copy-paste"
    args = build_parser().parse_args(["benchmark", "--out", str(tmp_path / "b")])
    assert benchmark_config(args)[0].ssft.pseudo_mix == FinetuneConfig.pseudo_mix
    args = build_parser().parse_args(
        ["benchmark", "--pseudo-mix", "copy-paste", "--pseudo-teacher", "ema", "--out", str(tmp_path / "b")]
    )
    with pytest.raises(ASFDAError, match="the EMA teacher labels each patch online, so it would do nothing"):
        benchmark_config(args)


def test_the_benchmark_trains_with_the_learning_rates_it_is_given(monkeypatch, tmp_path):
    from ASFDALib.adaptation import trainer as trainer_module
    from ASFDALib.bench.benchmark import BenchmarkConfig, _rates, train
    from ASFDALib.models.defaults import default_model_path

    seen = []
    monkeypatch.setattr(trainer_module.Trainer, "run", lambda self, *a, **k: seen.append(self.config))
    config = BenchmarkConfig(lr=1e-3, encoder_lr_scale=1.0, lower_rate_for="loaded")
    train(ModelSource(default_model_path()), [], [], 1, 0, "cpu", None, tmp_path, rates=_rates(config))
    assert (seen[0].lr, seen[0].encoder_lr_scale, seen[0].lower_rate_for) == (1e-3, 1.0, "loaded")
    assert _rates(BenchmarkConfig()) == {}  # the recipe's own defaults


def test_with_a_decaying_stage_2_the_control_runs_both_stages_on_the_labels_alone(monkeypatch, tmp_path):
    from ASFDALib.adaptation import trainer as trainer_module
    from ASFDALib.adaptation.pseudo import PseudoLabels
    from ASFDALib.bench import benchmark
    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.loading import load_model

    seen, asked = [], []

    def run(self, labelled, iterations, pseudo=None, *rest, **kw):
        seen.append((self.stage, iterations, pseudo, self.config.stage2_lr))
        with torch.no_grad():  # "training" moves every weight by one
            for p in self.network.parameters():
                p.add_(1.0)

    def gate(*args):  # the rounds gate keeps a volume: its SSFT twin would hand over a blend
        asked.append((args[7], args[10]))  # the gate asked for, and its fallback
        return PseudoLabels(["p"], {"p": 0.9}, {"p": np.zeros((2, 2, 2), np.uint8)}, "rounds")

    monkeypatch.setattr(trainer_module.Trainer, "run", run)
    monkeypatch.setattr(benchmark, "selective_pseudo_labels", gate)
    ssft = benchmark.SSFTOptions(stage2_lr="cosine")
    network, kept, judged, blend = benchmark.train(
        ModelSource(default_model_path()), [], [], 400, 0, "cpu", ssft, tmp_path, pseudo_labels=False
    )
    start = load_model(default_model_path()).network.state_dict()
    moved = {k: v - start[k] for k, v in network.state_dict().items() if v.is_floating_point()}
    weights = [k for k, _ in network.named_parameters()]
    assert all(torch.allclose(moved[k], torch.full_like(moved[k], 1.6)) for k in weights)  # 0.8 x the 2 moved
    assert seen == [("stage1", 400, None, "cosine"), ("stage2", 200, None, "cosine")]  # no pseudo-labels taught
    # the gate judged only whether the start vouched (no fallback asked), and the control blends as its twin
    assert asked == [("rounds", "none")] and (kept, judged, blend) == ([], "", 0.2)
    # with no blend to decide, the control asks no gate at all
    monkeypatch.setattr(benchmark, "selective_pseudo_labels", lambda *a: pytest.fail("the gate was asked"))
    none = replace(ssft, blend_start=0.0)
    source = ModelSource(default_model_path())
    control = benchmark.train(source, [], [], 400, 0, "cpu", none, tmp_path, pseudo_labels=False)
    assert control[3] == 0.0


def test_a_constant_stage_2_with_a_blend_is_refused_since_its_control_would_not_blend(tmp_path, capsys):
    args = ["benchmark", "--quick", "--pseudo-gate", "rounds", "--stage2-lr", "constant", "--out", str(tmp_path / "b")]
    assert main(args) == 1
    assert "only the asfda+ssft row would be handed over blended; add --blend-start 0" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "teacher, asked, trained",
    [("ema-if-fallback", "rounds", "ema"), ("ema-if-fallback", "", "fixed"), ("ema", "", "ema")],
)
def test_stage_2_of_the_ssft_row_trains_with_the_teacher_the_gate_that_judged_calls_for_and_mixes_fixed_labels(
    monkeypatch, tmp_path, teacher, asked, trained
):
    from ASFDALib.adaptation import trainer as trainer_module
    from ASFDALib.adaptation.pseudo import PseudoLabels
    from ASFDALib.bench import benchmark
    from ASFDALib.models.defaults import default_model_path

    seen = []
    monkeypatch.setattr(trainer_module.Trainer, "run", lambda self, *a, **k: seen.append((self.stage, self.config)))
    judged = PseudoLabels([], {}, {}, "flips" if asked else "rounds", asked)
    monkeypatch.setattr(benchmark, "selective_pseudo_labels", lambda *args: judged)
    ssft = benchmark.SSFTOptions(teacher=teacher, pseudo_mix="copy-paste")
    benchmark.train(ModelSource(default_model_path()), [], [], 4, 0, "cpu", ssft, tmp_path)
    assert [(stage, config.teacher) for stage, config in seen] == [("stage1", teacher), ("stage2", trained)]
    # only the fixed teacher's labels are mixed with the labelled patches
    assert seen[1][1].pseudo_mix == ("copy-paste" if trained == "fixed" else "none")


def test_the_ssft_control_trains_on_the_labels_as_long_as_ssft_trains_in_all():
    from ASFDALib.bench.benchmark import BenchmarkConfig, Run, _twin, row_iterations

    config = BenchmarkConfig(iterations=400)
    assert row_iterations("asfda", config) == 400
    assert row_iterations("ssft-control", config) == 400 + 200  # stage 1 (400) + stage 2 (+50%)
    asfda = Run("asfda", 2, 0, [0.5], ["a", "b"])
    # the same query and seed, but another recipe: not the same training
    assert _twin([asfda], ["b", "a"], 0, "ssft-control", config) is None
    assert _twin([asfda], ["b", "a"], 0, "dkd", config) is asfda


def test_the_upper_bound_trains_its_own_iterations_and_they_are_part_of_the_protocol_only_when_they_differ(
    tmp_path,
):
    from ASFDALib.app.cli import build_parser
    from ASFDALib.app.commands import benchmark_config
    from ASFDALib.bench.benchmark import BenchmarkConfig, _load_runs, options_protocol, row_iterations

    args = build_parser().parse_args(
        ["benchmark", "--iterations", "400", "--full-iterations", "1600", "--out", str(tmp_path / "b")]
    )
    config = benchmark_config(args)[0]
    assert row_iterations("full", config) == 1600
    assert row_iterations("random", config) == 400  # the budgeted rows keep theirs
    assert row_iterations("ssft-control", config) == 600
    assert options_protocol(config)["full_iterations"] == 1600
    # as long as the other rows (asked or not): the protocol of every table made before the option
    assert "full_iterations" not in options_protocol(BenchmarkConfig(iterations=400, full_iterations=400))
    before = {"iterations": 400, "scenario": "ct-shift", "fusion": "gap-first", "lower_rate_for": "encoder"}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"protocol": before, "runs": []}))
    with pytest.raises(ASFDAError, match="full_iterations .left to the default when these runs were made, 1600"):
        _load_runs(path, {**before, "full_iterations": 1600})


def test_a_report_of_stored_runs_states_the_iterations_recipe_rows_and_budgets_they_ran_with_not_those_typed():
    from ASFDALib.bench.benchmark import BenchmarkConfig, Run, _config_record, as_run, options_protocol

    ran = BenchmarkConfig(iterations=400, full_iterations=2400)
    ran.ssft.pseudo_mix = "none"
    runs = [Run(row, budget, 0, [0.5]) for row, budget in (("source", 0), ("random", 1), ("asfda", 1), ("asfda", 8))]
    typed = BenchmarkConfig(iterations=300, budgets=())  # --report-only with the defaults
    reported = as_run(typed, options_protocol(ran), runs)
    assert (reported.iterations, reported.full_iterations, reported.ssft.pseudo_mix) == (400, 2400, "none")
    # the rows and budgets that ran (no SSFT row: no note on how one trained), in the table's order
    assert reported.rows == ("source", "random", "asfda") and reported.budgets == (1, 8)
    # of those typed, the ones that ran
    narrowed = as_run(BenchmarkConfig(rows=("asfda", "full"), budgets=(8, 4)), options_protocol(ran), runs)
    assert (narrowed.rows, narrowed.budgets) == (("asfda",), (8,))
    # and benchmark.json's config names the upper bound's iterations as it trained them, set or not
    assert _config_record(BenchmarkConfig(iterations=400), user_data=False)["full_iterations"] == 400


def test_curve_points_no_row_trains_to_are_refused_before_any_work(tmp_path):
    from ASFDALib.app.cli import build_parser
    from ASFDALib.app.commands import benchmark_config

    asked = ["benchmark", "--validation", "2", "--rows", "full", "--iterations", "400", "--out", str(tmp_path / "b")]
    with pytest.raises(ASFDAError, match="--eval-at 1600: no row trains past 400 iterations"):
        benchmark_config(build_parser().parse_args([*asked, "--eval-at", "400,1600"]))
    longer = benchmark_config(build_parser().parse_args([*asked, "--eval-at", "400,1600", "--full-iterations", "3200"]))
    assert longer[0].eval_at == (400, 1600)


def test_stage_2_of_the_ssft_row_trains_the_pseudo_iterations_asked_and_the_table_says_so(tmp_path):
    """--pseudo-iterations sets stage 2's length as asfda finetune's option does: the SSFT row and its control
    train that much longer in all, the protocol records it (another length is other runs), the note says it."""
    from ASFDALib.app.cli import build_parser
    from ASFDALib.app.commands import benchmark_config
    from ASFDALib.bench.benchmark import _changes, _ssft_note, options_protocol, row_iterations, row_labels

    asked = ["benchmark", "--rows", "asfda+ssft,ssft-control", "--iterations", "400", "--out", str(tmp_path / "b")]
    default = benchmark_config(build_parser().parse_args(asked))[0]
    longer = benchmark_config(build_parser().parse_args([*asked, "--pseudo-iterations", "1200"]))[0]
    assert (row_iterations("ssft-control", default), row_iterations("ssft-control", longer)) == (600, 1600)
    assert (
        options_protocol(longer)["ssft"]["extra_fraction"] == 3.0 != options_protocol(default)["ssft"]["extra_fraction"]
    )
    assert "1200 stage-2 iterations after stage 1's 400" in _ssft_note(longer, [])
    assert "stage-2 iterations" not in _ssft_note(default, [])  # the tables' own length goes unsaid, as before
    # the row's name in tables and plots says the length that ran
    assert row_labels(longer.ssft.extra_fraction)["asfda+ssft"].endswith("(stage 2: +300% iterations)")
    assert row_labels()["asfda+ssft"].endswith("(stage 2: +50% iterations)")  # as the stored tables name it
    # a resume under another length names the option, not the fraction it is stored as
    changed = _changes(options_protocol(longer), options_protocol(default))
    assert changed == "ssft stage 2 length (--pseudo-iterations: 3 x --iterations here, 0.5 x now)"


def _summary_row(row: str, budget: int, mean: float) -> dict:
    return {"row": row, "budget": budget, "mean_dice": mean}


def test_the_report_says_when_the_upper_bound_is_not_clearly_above_a_budgeted_row():
    from ASFDALib.bench.benchmark import BenchmarkConfig, _upper_bound_note

    config = BenchmarkConfig(iterations=400)
    close = [_summary_row("random", 4, 74.4), _summary_row("asfda+ssft", 4, 77.5), _summary_row("full", 0, 77.6)]
    note = _upper_bound_note(config, close)
    assert "The upper bound (77.6) is not clearly above every budgeted row" in note
    assert "budget 4: 77.5" in note and "--full-iterations" in note
    clear = [_summary_row("random", 4, 74.4), _summary_row("asfda+ssft", 4, 77.5), _summary_row("full", 0, 79.9)]
    assert _upper_bound_note(config, clear) == ""
    longer = _upper_bound_note(BenchmarkConfig(iterations=400, full_iterations=1600), clear)
    assert longer.strip() == (
        "The upper bound trained 1600 iterations, the budgeted rows 400 (ASFDA + SSFT and its control half as many "
        "again)."
    )
    assert _upper_bound_note(config, clear[:2]) == ""  # no upper bound ran: nothing to say


def _no_test_labels(d):
    shutil.rmtree(d / "test" / "labels")


def _one_label_missing(d):
    (d / "pool" / "labels" / "p_001_siteB.nii.gz").unlink()


def _pool_case_in_test(d):
    for sub in ("images", "labels"):
        shutil.copy(d / "pool" / sub / "p_000_siteA.nii.gz", d / "test" / sub / "p_000_siteA.nii.gz")


@pytest.mark.parametrize(
    "breakage, message",
    [
        (_no_test_labels, "test: no labels/ folder; each folder needs images/ and labels/"),
        (_one_label_missing, "no label for 1 image(s) (p_001_siteB.nii.gz)"),
        (_pool_case_in_test, "p_000_siteA.nii.gz: the same volume is in the pool; --test must hold other cases"),
        (lambda d: None, "4 pool volumes cannot serve a budget of 4"),
    ],
)
def test_unusable_folders_are_refused_in_one_line_before_any_work(tmp_path, capsys, breakage, message):
    from ASFDALib.models.defaults import default_model_path

    data = tmp_path / "data"
    write_pool(data / "pool", 4, seed=21, prefix="p")
    write_pool(data / "test", 1, seed=22, prefix="t")
    breakage(data)
    out = tmp_path / "bench"
    argv = [
        "benchmark",
        "--model",
        str(default_model_path()),
        "--pool",
        str(data / "pool"),
        "--test",
        str(data / "test"),
    ]
    budgets = ["--budgets", "4" if "cannot serve" in message else "1"]
    assert main([*argv, *budgets, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (out / "results.json").exists()


def test_own_data_needs_a_model_and_both_folders(tmp_path, capsys):
    assert main(["benchmark", "--pool", str(tmp_path), "--test", str(tmp_path), "--out", str(tmp_path / "b")]) == 1
    assert "needs --model" in capsys.readouterr().err
    (tmp_path / "m.pt").write_bytes(b"")
    model = str(tmp_path / "m.pt")
    assert main(["benchmark", "--model", model, "--pool", str(tmp_path), "--out", str(tmp_path / "b")]) == 1
    assert "needs both --pool DIR and --test DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a model that is not there: an argument error, before any work
        main(["benchmark", "--model", str(tmp_path / "no.pt"), "--out", str(tmp_path / "b")])
    assert exit_.value.code == 2 and "no.pt does not exist" in capsys.readouterr().err


def test_the_cli_lists_the_benchmark_rows_without_loading_torch():
    from ASFDALib.app.cli import BENCH_ROWS, BENCH_SCENARIOS
    from ASFDALib.bench.benchmark import ROWS, SCENARIOS

    assert BENCH_ROWS == ROWS and BENCH_SCENARIOS == SCENARIOS


def test_rows_sharing_labels_and_seed_share_one_stage_1_and_train_as_if_each_ran_it(tmp_path):
    """The ASFDA row writes its stage 1; a longer row resumes from it: the same weights as a fresh run."""
    import torch

    from ASFDALib.bench.benchmark import BenchmarkConfig, SSFTOptions, load_cases, train, write_data
    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.loading import load_model

    model = load_model(default_model_path())
    data = write_data(tmp_path / "data", BenchmarkConfig(pool=3, test=1, validation=0, scenario="mri"))
    pool = load_cases(data / "pool", model.card)
    cache = tmp_path / "stage1"

    def weights(iterations, folder, ssft=None):
        args = (ModelSource(default_model_path()), pool[:1], pool, iterations, 0, "cpu", ssft, tmp_path / "w")
        return train(*args, pseudo_labels=False, stage1_cache=folder)[0].state_dict()

    weights(3, cache)  # the ASFDA row: stage 1 alone, kept
    assert len(list(cache.glob("*.pt"))) == 1
    control = SSFTOptions(stage2_lr="cosine")  # a decaying stage 2 on the labels alone after the same stage 1
    for iterations, ssft in ((5, None), (3, control)):
        fresh, shared = weights(iterations, None, ssft), weights(iterations, cache, ssft)
        for key, value in fresh.items():
            torch.testing.assert_close(shared[key], value, rtol=0, atol=0)


def test_the_table_says_how_the_ssft_row_and_its_control_trained():
    from ASFDALib.bench.benchmark import BenchmarkConfig, Run, SSFTOptions, _ssft_note

    cosine = BenchmarkConfig(
        rows=("random", "asfda+ssft", "ssft-control"),
        budgets=(2, 4),
        ssft=SSFTOptions(reliability="confidence", stage2_lr="cosine", pseudo_augment="weak"),
    )
    assert _ssft_note(cosine, []) == (
        "\nASFDA + SSFT: confidence gate, at most 50% of the pool pseudo-labelled, mixed with the labelled patches "
        "(bidirectional copy-paste), stage 2's learning rate cosine; its control trains a second stage on the labels "
        "alone.\n"
    )
    defaults = BenchmarkConfig(rows=("asfda+ssft",), ssft=SSFTOptions())
    assert _ssft_note(defaults, []).startswith(
        "\nASFDA + SSFT: rounds gate (floor 0.5), the flips gate where it keeps no volume, at most 50% of the pool "
        "pseudo-labelled, strongly augmented (and through random intensity curves where the fallback judged), an EMA "
        "teacher relabelling them online where the fallback judged, at weight 0.5, mixed with the labelled patches "
        "(bidirectional copy-paste) where the fixed teacher labels, stage 2's learning rate cosine;"
    )
    rounds = BenchmarkConfig(
        rows=("asfda+ssft",), ssft=SSFTOptions(reliability="rounds", min_agreement=0.7, stage2_lr="constant")
    )
    assert "rounds gate (floor 0.7)" in _ssft_note(rounds, []) and "one longer stage" in _ssft_note(rounds, [])
    mixed = BenchmarkConfig(rows=("asfda+ssft",), ssft=SSFTOptions(teacher="fixed", pseudo_mix="copy-paste"))
    assert ", mixed with the labelled patches (bidirectional copy-paste), stage 2's" in _ssft_note(mixed, [])
    fallback = BenchmarkConfig(rows=("asfda+ssft",), ssft=SSFTOptions(pseudo_mix="copy-paste"))  # EMA where it judged
    assert "(bidirectional copy-paste) where the fixed teacher labels" in _ssft_note(fallback, [])
    # and which runs that reached: those the asked gate judged (the fixed teacher), not the fallback's (EMA)
    judged = [
        Run("asfda+ssft", 2, 0, [], pseudo_labelled=["a"], pseudo_gate="rounds"),
        Run("asfda+ssft", 2, 1, [], pseudo_labelled=["b"], pseudo_gate="flips"),
        Run("asfda+ssft", 2, 2, [], pseudo_labelled=[], pseudo_gate="rounds"),  # nothing kept, nothing to mix
    ]
    assert "Pseudo-labelled patches mixed (copy-paste) in 1 of 2 SSFT runs that kept volumes.\n" in _ssft_note(
        fallback, judged
    )
    assert "mixed (copy-paste) in" not in _ssft_note(mixed, judged)  # the fixed teacher mixes every run's
    assert _ssft_note(BenchmarkConfig(rows=("random", "asfda")), []) == ""


def test_the_table_says_how_many_volumes_the_gate_let_through_and_which_controls_shared_a_run():
    from ASFDALib.bench.benchmark import BenchmarkConfig, Run, _ssft_note

    config = BenchmarkConfig(rows=("asfda+ssft", "ssft-control"), budgets=(2, 4))
    runs = [
        Run("asfda+ssft", 2, 1, [], pseudo_labelled=[]),
        Run("asfda+ssft", 2, 0, [], pseudo_labelled=["a", "b"]),
        Run("asfda+ssft", 4, 0, [], pseudo_labelled=["c"], pseudo_gate="flips"),
        Run("ssft-control", 2, 1, [], shared_with="asfda+ssft@2"),
    ]
    note = _ssft_note(config, runs)
    assert (
        "Volumes pseudo-labelled (the runs that recorded it): 2 labels: 2 (seed 0), 0 (seed 1); 4 labels: 1 (seed 0, "
        "by the flips gate).\n" in note
    )
    assert "Where the gate kept no volume the SSFT run trained the control's model" in note
    # a table whose SSFT row was run again, with volumes kept, beside the earlier control: nothing shared there
    rerun = [Run("asfda+ssft", 2, 1, [], pseudo_labelled=["a"]), runs[3]]
    assert "shares it" not in _ssft_note(config, rerun)
    assert "Volumes pseudo-labelled" not in _ssft_note(config, runs[3:])  # recorded before they were kept


def test_a_decaying_stage_2s_control_shares_the_training_of_an_ssft_run_that_kept_no_volume():
    """Such a run trained stage 2 on the labels alone: the control's training, to the decimal."""
    from dataclasses import replace

    from ASFDALib.bench.benchmark import BenchmarkConfig, Run, SSFTOptions, _twin

    cosine = BenchmarkConfig(ssft=SSFTOptions(stage2_lr="cosine"))
    kept_none = Run("asfda+ssft", 2, 0, [70.0], query=["a", "b"], pseudo_labelled=[])
    assert _twin([kept_none], ["b", "a"], 0, "ssft-control", cosine) is kept_none
    assert _twin([kept_none], ["b", "a"], 1, "ssft-control", cosine) is None  # another seed
    kept_one = replace(kept_none, pseudo_labelled=["c"])
    assert _twin([kept_one], ["b", "a"], 0, "ssft-control", cosine) is None
    # a constant stage 2's control is one longer stage: another training
    constant = BenchmarkConfig(ssft=SSFTOptions(stage2_lr="constant"))
    assert _twin([kept_none], ["b", "a"], 0, "ssft-control", constant) is None
    # an SSFT run is never taken for one that may keep volumes
    assert _twin([Run("ssft-control", 2, 0, [], query=["a", "b"])], ["a", "b"], 0, "asfda+ssft", cosine) is None


def test_each_row_trains_as_its_recipe_says_and_the_control_follows_the_ssft_rows_schedule():
    from dataclasses import replace

    from ASFDALib.bench.benchmark import BenchmarkConfig, SSFTOptions, row_training

    constant = BenchmarkConfig(iterations=400, ssft=SSFTOptions(stage2_lr="constant"))
    assert row_training("asfda", constant) == (None, 400, True)
    assert row_training("asfda+ssft", constant) == (constant.ssft, 400, True)  # stage 2 adds its 200
    assert row_training("ssft-control", constant) == (None, 600, False)  # one longer stage on the labels
    cosine = replace(constant, ssft=SSFTOptions(stage2_lr="cosine"))
    assert row_training("ssft-control", cosine) == (cosine.ssft, 400, False)  # the same two stages, no pseudo-labels


def test_a_cards_fingerprint_is_the_one_runs_recorded_before_intensity_had_nonzero_and_clip(tmp_path):
    """A card that does not choose nonzero or clip has the fingerprint it had before they existed (its intensity
    as cards store it), so a benchmark's earlier runs still resume; one that chooses them has another."""
    from ASFDALib.bench.benchmark import Folders, fingerprints
    from ASFDALib.models.card import IntensityConfig, ModelCard

    for folder in ("pool", "test"):
        (tmp_path / folder / "images").mkdir(parents=True)
        (tmp_path / folder / "labels").mkdir(parents=True)
    (tmp_path / "model.pt").write_bytes(b"weights")
    folders = Folders(tmp_path / "pool", tmp_path / "test")
    card = ModelCard(class_names=["background", "liver"])
    # the fingerprint of this card as asfda 4cb28e7 (before nonzero and clip) computed it
    recorded = "609b85346833f941"
    assert fingerprints(ModelSource(tmp_path / "model.pt"), card, folders)["card"].startswith(recorded)
    chosen = ModelCard(class_names=["background", "liver"], intensity=IntensityConfig("zscore", nonzero=False))
    assert not fingerprints(ModelSource(tmp_path / "model.pt"), chosen, folders)["card"].startswith(recorded)
