"""`asfda rank` end to end on real files: formats, bad inputs, cache and resume, source knowledge."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import DATA, write_dicom_series

from ASFDALib.app.cli import main
from ASFDALib.bench.phantoms import domain_config, make_phantom
from ASFDALib.data.volumes import write_nifti
from ASFDALib.errors import ASFDAError
from ASFDALib.query.ranking import RankConfig, rank_folder


def _rows(out: Path) -> list[dict]:
    with open(out / "ranking.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_sample_pool_a_rank_stopped_short_of_a_label_is_completed_with_its_scans_unchanged(tmp_path, monkeypatch):
    """Stopped between a sample volume and its label, the sample pool is made again where it lacks either, so the
    next step's label folder holds every label; its scans come back byte for byte, as a session hashed them."""
    from ASFDALib.models import defaults

    monkeypatch.setattr(defaults, "SAMPLE_COUNT", 2)
    images = defaults.sample_images(tmp_path / "sample_data")
    scans = {p.name: p.read_bytes() for p in images.iterdir()}
    last = sorted(scans)[-1]
    (tmp_path / "sample_data" / "labels" / last).unlink()  # what the stop leaves
    defaults.sample_images(tmp_path / "sample_data")
    assert (tmp_path / "sample_data" / "labels" / last).is_file()
    assert {p.name: p.read_bytes() for p in images.iterdir()} == scans


def test_rank_on_the_embedded_default_writes_every_output(tmp_path, capsys):
    out = tmp_path / "session"
    assert main(["rank", "--out", str(out), "--budget", "3"]) == 0
    printed = capsys.readouterr().out
    assert "BatchNorm running statistics" in printed
    assert "4 classes: background + liver, kidney, gallbladder" in " ".join(printed.split())
    # the sample pool's labels stand in for a clinician's: the next step names their folder
    labels = out / "sample_data" / "labels"
    assert f"'asfdalabelsimport{out}--from{labels}'" in "".join(printed.split())  # the terminal wraps long paths
    assert len(list(labels.iterdir())) == 12
    rows = _rows(out)
    assert len(rows) == 12 and all(r["status"] == "scored" for r in rows)
    assert [r["selected"] for r in rows[:4]] == ["True", "True", "True", "False"]
    assert [int(r["rank"]) for r in rows] == list(range(1, 13))
    for column in (
        "priority",
        "pick_score",
        "dkd",
        "knowledge_gap",
        "diversity",
        "asd",
        "foreground_ml",
        "source_knowledge",
    ):
        assert rows[0][column] != ""
    report = json.loads((out / "ranking.json").read_text())
    assert report["knowledge"] == "bn" and len(report["selected"]) == 3
    assert (out / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(float(r["foreground_ml"]) > 10 for r in rows)  # every phantom has organs the model finds


def test_rerank_with_another_alpha_is_served_from_the_cache(tmp_path, default_model, mri_pool):
    images = mri_pool / "images"
    first = rank_folder(images, default_model, tmp_path / "cache", RankConfig(alpha=0.5))
    second = rank_folder(images, default_model, tmp_path / "cache", RankConfig(alpha=0.9, budget=2))
    assert not any(r.cached for r in first.records)
    assert all(r.cached for r in second.records)
    assert {r.file for r in first.rows} == {r.file for r in second.rows}
    again = rank_folder(images, default_model, tmp_path / "cache", RankConfig(alpha=0.5))
    assert [r.file for r in again.rows] == [r.file for r in first.rows]
    assert [r.pick_score for r in again.rows] == pytest.approx([r.pick_score for r in first.rows])


def test_the_ranking_and_the_session_record_how_dkd_and_asd_were_combined(tmp_path, mri_pool):
    out = tmp_path / "s"
    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(out), "--fusion", "gated"]) == 0
    assert json.loads((out / "ranking.json").read_text())["fusion"] == "gated"
    assert json.loads((out / "session.json").read_text())["rounds"][-1]["strategy"]["fusion"] == "gated"
    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(out), "--strategy", "entropy"]) == 0
    assert json.loads((out / "ranking.json").read_text())["fusion"] is None  # a baseline combines nothing


def test_interrupted_ranking_resumes_where_it_stopped(tmp_path, default_model, mri_pool):
    def stop_after_three(done, total, name):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rank_folder(mri_pool / "images", default_model, tmp_path / "cache", RankConfig(), stop_after_three)
    resumed = rank_folder(mri_pool / "images", default_model, tmp_path / "cache", RankConfig())
    assert [r.cached for r in resumed.records] == [True] * 3 + [False] * 3
    assert not list((tmp_path / "cache").glob(".*tmp"))  # no half-written entries


def test_a_folder_is_a_score_cache_only_when_it_holds_nothing_else(tmp_path):
    """What an interrupted first rank leaves (any strategy's entries) lets the same command resume; a folder
    named cache holding someone's files does not."""
    from ASFDALib.query.cache import is_score_cache

    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("0123456789abcdef0123456789abcdef.npz", "fedcba9876543210fedcba9876543210.json", "index.json"):
        (cache / name).write_bytes(b"{}")  # sweeps; epistemic and ClaSP PE scalars; the index
    (cache / ".index.json.x1y2.tmp").write_bytes(b"{")  # a write the interruption cut short
    assert is_score_cache(cache)
    (cache / "notes.txt").write_text("mine")
    assert not is_score_cache(cache)


def test_changed_file_content_is_rescored(tmp_path, default_model, mri_pool):
    from ASFDALib.data.volumes import write_nifti

    images = tmp_path / "images"
    shutil.copytree(mri_pool / "images", images)
    rank_folder(images, default_model, tmp_path / "cache", RankConfig())
    victim = sorted(images.iterdir())[0]
    image, _, affine = make_phantom(999, domain_config("mri"))
    write_nifti(victim, np.round(image).astype(np.uint16), affine)
    again = rank_folder(images, default_model, tmp_path / "cache", RankConfig())
    assert {r.name: r.cached for r in again.records} == {p.name: p != victim for p in sorted(images.iterdir())}


def _mixed_folder(folder: Path) -> Path:
    """Real formats side by side: tptbox CT and MRI (NIfTI), an NRRD, a DICOM series, and two bad files."""
    folder.mkdir()
    shutil.copy(DATA / "tptbox" / "sub-ct_label-22_ct.nii.gz", folder)
    shutil.copy(DATA / "tptbox" / "sub-mri_label-6_T2w.nii.gz", folder)
    image, _, _ = make_phantom(11, domain_config("mri"))
    nrrd = sitk.GetImageFromArray(np.round(image).astype(np.int16).transpose(2, 1, 0))
    nrrd.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(nrrd, str(folder / "phantom.nrrd"))
    write_dicom_series(folder / "dicom_series", np.round(image[:, :, ::2]).astype(np.int16), spacing=(2.0, 2.0, 4.0))
    (folder / "truncated.nii.gz").write_bytes((DATA / "tptbox" / "sub-ct_label-22_ct.nii.gz").read_bytes()[:5000])
    (folder / "notes.nii.gz").write_text("not an image")
    return folder


def test_rank_reads_real_formats_and_skips_bad_files_with_reasons(tmp_path, capsys):
    images = _mixed_folder(tmp_path / "images")
    out = tmp_path / "session"
    assert main(["rank", "--images", str(images), "--out", str(out), "--budget", "2"]) == 0
    rows = {r["file"]: r for r in _rows(out)}
    scored = {f for f, r in rows.items() if r["status"] == "scored"}
    assert scored == {"sub-ct_label-22_ct.nii.gz", "sub-mri_label-6_T2w.nii.gz", "phantom.nrrd", "dicom_series"}
    assert rows["truncated.nii.gz"]["status"] == "skipped"
    assert "corrupt" in rows["truncated.nii.gz"]["reason"]
    assert "corrupt" in rows["notes.nii.gz"]["reason"]
    report = json.loads((out / "ranking.json").read_text())
    assert {s["file"] for s in report["skipped"]} == {"truncated.nii.gz", "notes.nii.gz"}
    printed = capsys.readouterr().out
    assert "skipped" in printed and "truncated.nii.gz" in printed


def test_rank_fails_only_when_nothing_could_be_scored(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.nii.gz").write_bytes(b"")
    (images / "b.nii").write_text("nope")
    write_nifti(images / "c.nii.gz", np.arange(72 * 72, dtype=np.int16).reshape(72, 72), np.eye(4))  # one slice
    assert main(["rank", "--images", str(images), "--out", str(tmp_path / "s")]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "No volume could be scored" in out
    for name, reason in (
        ("a.nii.gz", "empty file"),
        ("b.nii", "unreadable or corrupt"),
        ("c.nii.gz", "2D image of shape"),  # (72, 72): not a scoring failure
    ):
        assert f"{name}: {reason}" in out, name
    assert not (tmp_path / "s").exists()  # a first rank that scored nothing leaves no half-made session


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["rank", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert (
        f"{tmp_path / 'empty'}: no volumes found (looked for .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd and DICOM" in err
    )
    assert "; it is empty: give --images the folder that holds the scans to rank" in err and "--recursive" not in err
    (tmp_path / "empty" / "site1").mkdir()  # --recursive would find nothing there either: not suggested
    assert main(["rank", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "; its sub-folders hold none either: give --images the folder" in err and "--recursive" not in err


def test_a_pool_of_sub_folders_ranked_without_recursive_is_answered_with_them_before_the_model_loads(tmp_path, capsys):
    write_nifti(tmp_path / "pool" / "site1" / "a.nii.gz", np.arange(512, dtype=np.float32).reshape(8, 8, 8), np.eye(4))
    assert main(["rank", "--images", str(tmp_path / "pool"), "--out", str(tmp_path / "s")]) == 1
    said = capsys.readouterr()
    assert "; found volumes only in 1 sub-folder (site1): add --recursive to rank them" in said.err
    assert "Weights" not in said.out  # refused before the model loads: a wrong folder costs no model load


def test_torchscript_model_uses_the_energy_fallback_and_says_so(tmp_path, default_model, mri_pool, capsys):
    torch.jit.script(default_model.network.cpu()).save(str(tmp_path / "model.ts"))
    card = default_model.path.with_name("asfda_default.card.json")
    args = [
        "rank",
        "--model",
        str(tmp_path / "model.ts"),
        "--card",
        str(card),
        "--images",
        str(mri_pool / "images"),
        "--out",
        str(tmp_path / "s"),
    ]
    assert main(args) == 1
    assert "TorchScript runs code" in capsys.readouterr().err
    assert main([*args, "--trust"]) == 0
    assert "free-energy fallback" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "ranking.json").read_text())["knowledge"] == "energy"


def _default_model_as_bundle(folder: Path, model, weights: str) -> Path:
    """The default model as a MONAI bundle of ``models/<weights>`` (its state dict, or TorchScript for ``.ts``),
    whose transforms crop each scan to its foreground and orient nothing: what its card cannot say."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    if weights.endswith(".ts"):
        torch.jit.script(model.network.cpu()).save(str(folder / "models" / weights))
    else:
        torch.save(model.network.state_dict(), folder / "models" / weights)
    card = model.card
    steps = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": list(card.spacing)},
        {"_target_": "CropForegroundd", "keys": "image", "source_key": "image"},
        {
            "_target_": "ScaleIntensityRangePercentilesd",
            "keys": "image",
            "lower": 0.5,
            "upper": 99.5,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        },
    ]
    config = {
        "network_def": {"_target_": card.network.name, **card.network.args},
        "preprocessing": {"_target_": "Compose", "transforms": steps},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(card.roi_size), "sw_batch_size": 1},
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    pred = {"channel_def": dict(enumerate(card.class_names))}
    meta = {"name": "default as a bundle", "network_data_format": {"outputs": {"pred": pred}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    return folder


def test_a_session_kept_among_the_sub_folders_is_no_volumes_to_rank_with_recursive(tmp_path, capsys):
    """A folder holding only an ASFDA session (its label versions, its records): --recursive would rank the
    session's label maps, so it is not suggested, and the session's records are no files to convert."""
    from ASFDALib.adaptation.session import Session

    with Session.open(tmp_path / "folder" / "sess", create=True) as session:
        session.save()
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    labels[2:5, 2:5, 2:5] = 1
    write_nifti(tmp_path / "folder" / "sess" / "labels" / "a.v1.nii.gz", labels, np.eye(4))
    (tmp_path / "folder" / "sess" / "ranking.csv").write_text("rank,file\n")
    assert main(["rank", "--images", str(tmp_path / "folder"), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        f"{tmp_path / 'folder'}: no volumes found (looked for .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd and DICOM "
        "folders); its sub-folders hold none but ASFDA sessions' files (sess): give --images the folder that holds "
        "the scans to rank"
    )


def test_a_recursive_rank_leaves_out_a_session_kept_in_the_pool_and_says_so(tmp_path, mri_pool, capsys):
    """A session made inside the pool folder: --recursive ranks the scans, not the session's label versions (which
    it used to score and then skip as label maps)."""
    from ASFDALib.adaptation.session import Session

    scans = sorted((mri_pool / "images").iterdir())[:2]
    (tmp_path / "pool" / "site1").mkdir(parents=True)
    for scan in scans:
        shutil.copy(scan, tmp_path / "pool" / "site1" / scan.name)
    with Session.open(tmp_path / "pool" / "sess", create=True) as session:
        session.save()
    (tmp_path / "pool" / "sess" / "labels").mkdir()
    shutil.copy(mri_pool / "labels" / scans[0].name, tmp_path / "pool" / "sess" / "labels" / "a.v1.nii.gz")
    argv = ["rank", "--images", str(tmp_path / "pool"), "--recursive", "--out", str(tmp_path / "s"), "--budget", "1"]
    assert main(argv) == 0
    said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "label map" not in said
    assert sorted(r["file"] for r in _rows(tmp_path / "s")) == [f"site1/{scan.name}" for scan in scans]
    # left out, but not unsaid: printed and among ranking.json's notes
    line = (
        f"Left out 1 ASFDA session folder in {tmp_path / 'pool'} (sess): their label versions and predictions are "
        "no scans to rank"
    )
    assert line in said
    assert line in json.loads((tmp_path / "s" / "ranking.json").read_text())["notes"]
    # and stats, summarising the pool as a source domain, says the same
    assert main(["stats", "--images", str(tmp_path / "pool"), "--recursive", "--out", str(tmp_path / "st.npz")]) == 0
    assert line.replace("to rank", "to summarise") in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("weights", ["model.pt", "model.ts"])
def test_a_bundles_card_notes_reach_the_user_for_state_dict_and_torchscript_bundles_alike(
    tmp_path, default_model, mri_pool, capsys, weights
):
    """What the card derived from a bundle's configs cannot say is among rank's notes, once, printed and in
    ranking.json, whether the bundle's weights are a state dict (with a load report) or TorchScript (none)."""
    bundle = _default_model_as_bundle(tmp_path / "bundle", default_model, weights)
    out = tmp_path / "s"
    args = ["rank", "--model", str(bundle), "--images", str(mri_pool / "images"), "--out", str(out), "--trust"]
    assert main(args) == 0
    notes = [
        "configs/inference.json: no Orientationd on the image: MONAI gives the network each scan in its stored axis "
        "order, ASFDA in RAS order (the same for scans stored RAS)",
        "configs/inference.json: CropForegroundd: MONAI runs the network on each scan's foreground box only, ASFDA "
        "on the whole scan (and ScaleIntensityRangePercentilesd takes its statistics over the box)",
    ]
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert all(printed.count(note) == 1 for note in notes)  # not also in the Weights line of a model.pt bundle
    ranking = json.loads((out / "ranking.json").read_text())
    assert [n for n in ranking["notes"] if n.startswith("configs/")] == notes
    assert (ranking["model_load"] is None) == weights.endswith(".ts")


def test_a_bundles_card_notes_are_in_a_later_rounds_ranking_too(tmp_path, default_model, mri_pool, capsys):
    """A later rank loads the model with the card the session recorded, from which no note can be read again: the
    session keeps the first rank's notes, and round 2's ranking says them as round 1's did (printed, ranking.json
    and its copy under rankings/round2)."""
    bundle = _default_model_as_bundle(tmp_path / "bundle", default_model, "model.pt")
    pool, out = tmp_path / "pool", tmp_path / "s"
    for folder in ("images", "labels"):  # two scans: a round to label one, a second to rank the other
        (pool / folder).mkdir(parents=True)
        for name in ("mri_000.nii.gz", "mri_001.nii.gz"):
            shutil.copy(mri_pool / folder / name, pool / folder / name)
    rank = ["rank", "--out", str(out), "--budget", "1"]
    assert main([*rank, "--model", str(bundle), "--images", str(pool / "images"), "--trust"]) == 0
    notes = [n for n in json.loads((out / "ranking.json").read_text())["notes"] if n.startswith("configs/")]
    assert len(notes) == 2 and "no Orientationd" in notes[0] and "CropForegroundd" in notes[1]
    assert main(["labels", "import", str(out), "--from", str(pool / "labels")]) == 0
    assert main(["finetune", str(out), "--iterations", "2", "--no-pseudo"]) == 0
    capsys.readouterr()
    assert main(rank) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert all(printed.count(note) == 1 for note in notes)
    for ranking in (out / "ranking.json", out / "rankings" / "round2" / "ranking.json"):
        said = json.loads(ranking.read_text())
        assert said["weights"]["model"] == "adapted" and said["weights"]["round"] == 1  # round 1's fine-tuned model
        assert [n for n in said["notes"] if n.startswith("configs/")] == notes


def test_source_statistics_file_is_computed_and_used(tmp_path, default_model, mri_pool):
    from ASFDALib.bench.phantoms import write_phantoms

    write_phantoms(tmp_path / "source", 2, "ct", seed=9, labels=False)
    stats = tmp_path / "stats.npz"
    assert main(["stats", "--images", str(tmp_path / "source" / "images"), "--out", str(stats)]) == 0
    assert stats.is_file()
    before = stats.read_bytes()  # a card may name them: never written over, even by another summary
    assert main(["stats", "--images", str(mri_pool / "images"), "--out", str(stats)]) == 1
    assert stats.read_bytes() == before
    ranking = rank_folder(mri_pool / "images", default_model, tmp_path / "cache", RankConfig(knowledge="stats"))
    assert ranking.knowledge.kind == "stats"
    assert all(np.isfinite(r.knowledge_gap) for r in ranking.rows)


def test_stats_on_a_folder_of_no_scans_is_refused_as_rank_refuses_it_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    args = ["--images", str(tmp_path / "empty"), "--model", str(tmp_path / "broken.pt")]
    assert main(["stats", *args, "--out", str(tmp_path / "stats.npz")]) == 1
    err = capsys.readouterr().err.strip()  # about the folder, not the broken model: that loads after
    assert err.endswith(
        f"{tmp_path / 'empty'}: no volumes found (looked for .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd "
        "and DICOM folders); it is empty: give --images the folder that holds the scans to summarise"
    )
    assert not (tmp_path / "stats.npz").exists()


def test_asking_for_source_statistics_the_card_does_not_name_says_how_a_session_gets_them(default_model, tmp_path):
    from dataclasses import replace

    from ASFDALib.errors import ModelError
    from ASFDALib.query.ranking import choose_knowledge

    unnamed = replace(default_model, card=replace(default_model.card, source_stats=None))
    with pytest.raises(ModelError, match="the card names none .*name the file before a session's first rank"):
        choose_knowledge(unnamed, "stats")
    missing = replace(default_model, card=replace(default_model.card, source_stats="gone.npz"))
    with pytest.raises(ModelError, match="the card's source_stats, .*gone.npz, is not there"):
        choose_knowledge(missing, "stats")


@pytest.mark.parametrize("strategy", ["random", "fg-random", "entropy", "coreset", "dkd", "asd"])
def test_baseline_strategies_rank_the_whole_pool(tmp_path, default_model, mri_pool, strategy):
    ranking = rank_folder(
        mri_pool / "images", default_model, tmp_path / "cache", RankConfig(strategy=strategy, budget=2)
    )
    assert len(ranking.rows) == 6 and len(ranking.selected) == 2


def test_epistemic_strategy_runs_mc_dropout_passes(tmp_path, default_model, mri_pool):
    ranking = rank_folder(
        mri_pool / "images", default_model, tmp_path / "cache", RankConfig(strategy="epistemic", budget=2, mc_passes=2)
    )
    values = [r.epistemic for r in ranking.records]
    assert all(0 < v < 1 for v in values) and len(set(values)) == len(values)


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["rank", "--help"])
    text = capsys.readouterr().out
    for phrase in ("examples:", "--alpha", "--strategy", "--trust", "fg-random", "re-rank"):
        assert phrase in text


def test_the_command_line_answers_help_without_loading_torch():
    """Engine modules are imported inside each command: `asfda --help` must not wait seconds for torch."""
    import subprocess
    import sys

    code = "import sys, ASFDALib.app.cli; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_asked_for_prototypes_an_instancenorm_network_ranks_by_them_and_caches_them(tmp_path, mri_pool, capsys):
    """nnU-Net's layout (DynUNet, InstanceNorm, 1x1x1 head) with its own classes: no BatchNorm statistics
    and no statistics file, so the knowledge gap is the misalignment with the head's weight rows; a second
    ranking reads the same gaps from the cache."""
    from ASFDALib.models.card import NetworkSpec
    from ASFDALib.models.loading import build_network

    args = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 4,
        "kernel_size": [3, 3, 3],
        "strides": [1, 2, 2],
        "upsample_kernel_size": [2, 2],
        "filters": [8, 16, 32],
        "norm_name": "instance",
    }
    torch.manual_seed(0)
    torch.save(build_network(NetworkSpec("DynUNet", args)).state_dict(), tmp_path / "nnunet.pt")
    card = {"class_names": ["background", "liver", "kidney", "gallbladder"], "spacing": [4, 4, 4]}
    (tmp_path / "card.json").write_text(json.dumps({**card, "roi_size": [32, 32, 32]}))
    command = ["rank", "--model", str(tmp_path / "nnunet.pt"), "--network", "DynUNet"]
    command += ["--network-args", json.dumps(args), "--card", str(tmp_path / "card.json")]
    command += ["--images", str(mri_pool / "images"), "--knowledge", "prototype"]
    assert main([*command, "--out", str(tmp_path / "first")]) == 0
    assert "class prototypes" in capsys.readouterr().out
    report = json.loads((tmp_path / "first" / "ranking.json").read_text())
    assert report["knowledge"] == "prototype"
    first = _rows(tmp_path / "first")
    assert {r["source_knowledge"] for r in first} == {"prototype"}
    gaps = [float(r["source_divergence"]) for r in first]
    assert min(gaps) == 0.0 and max(gaps) > 0.0  # shifted to start at zero, and they differ
    from ASFDALib.models.loading import load_model
    from ASFDALib.query.ranking import choose_knowledge

    model = load_model(tmp_path / "nnunet.pt", tmp_path / "card.json", NetworkSpec("DynUNet", args))
    config = RankConfig(knowledge="prototype")
    rankings = [rank_folder(mri_pool / "images", model, tmp_path / "cache", config) for _ in range(2)]
    assert rankings[0].knowledge.kind == choose_knowledge(model, "prototype").kind == "prototype"
    assert all(r.cached for r in rankings[1].records)
    gaps = [[r.result.prototype_gap for r in ranking.records] for ranking in rankings]
    assert np.isfinite(gaps[0]).all() and gaps[1] == gaps[0]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"budget": -1}, r"RankConfig.budget -1: use a value 0 or more \(0 scores and ranks, selecting none\)"),
        ({"alpha": 3}, r"RankConfig.alpha 3: use a value in \[0, 1\]"),
        ({"strategy": "asdfa"}, "RankConfig.strategy 'asdfa': use one of asfda, dkd"),
        ({"knowledge": "batchnorm"}, "RankConfig.knowledge 'batchnorm': use one of auto, bn"),
    ],
)
def test_a_scripts_ranking_option_out_of_range_is_refused_when_the_config_is_made(options, message):
    from ASFDALib.query.config import RankConfig

    with pytest.raises(ValueError, match=message):
        RankConfig(**options)


def test_series_deeper_than_one_sub_folder_are_named_and_a_series_given_as_the_pool_is_refused(tmp_path, default_model):
    """A CD export's patient folders beside series folders: without --recursive only the series one level down
    are found, so the others are named with the fix; a series folder given as the pool would be named '.'."""
    image, _, _ = make_phantom(11, domain_config("mri"))
    series = np.round(image[:, :, ::2]).astype(np.int16)
    pool = tmp_path / "pool"
    write_dicom_series(pool / "pat1", series, spacing=(2.0, 2.0, 4.0))
    write_dicom_series(pool / "pat2" / "ST000000" / "SE000000", series, spacing=(2.0, 2.0, 4.0))
    (pool / "notes").mkdir()  # a folder of no series says nothing
    flat = rank_folder(pool, default_model, tmp_path / "cache", RankConfig(budget=1))
    assert [r.name for r in flat.records] == ["pat1"]
    assert "Not ranked: DICOM series deeper than one sub-folder, in pat2; add --recursive to rank them too" in (
        flat.notes
    )
    deep = rank_folder(pool, default_model, tmp_path / "cache", RankConfig(budget=1, recursive=True))
    assert [r.name for r in deep.records] == ["pat1", "pat2/ST000000/SE000000"]
    assert not any(n.startswith("Not ranked") for n in deep.notes)
    with pytest.raises(ASFDAError, match=r"pat1: is one DICOM series \(a scan\), not a pool of them; give --images"):
        rank_folder(pool / "pat1", default_model, tmp_path / "cache", RankConfig())
