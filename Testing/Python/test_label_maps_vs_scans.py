"""Label maps and scans are not taken for each other: a scan pool skips label maps with the reason and names the
scans' folder, a session inside the pool is not scanned, and a scan offered as a label or a prediction is refused.

One rule decides it (volumes.looks_like_label_map): whole values, few of them. Real scans must never meet it: CT in
integer HU and the MRI phantoms of every site are checked here too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from ASFDALib.app.cli import main
from ASFDALib.bench.phantoms import domain_config, make_phantom, site_config, write_phantoms
from ASFDALib.data.labels import LabelError, validate_label
from ASFDALib.data.volumes import LABEL_MAP_MAX_VALUES, looks_like_label_map, read_scan, read_volume, write_nifti
from ASFDALib.errors import VolumeError
from ASFDALib.query.ranking import RankConfig, rank_folder
from ASFDALib.query.source_stats import compute_source_stats

CARD = REPO / "Resources" / "Model" / "asfda_default.card.json"
CLASSES = ["background", "liver", "kidney", "gallbladder"]


def _scan_and_label(seed: int, domain: str = "mri") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A phantom as its files hold it: the scan rounded to integers (int16 HU for CT, uint16 for MRI), the label."""
    image, label, affine = make_phantom(seed, domain_config(domain))
    return np.round(image).astype(np.int16 if domain == "ct" else np.uint16), label, affine


def _pool(tmp_path: Path, count: int = 2) -> Path:
    """What 'asfda phantoms --out pool' writes: pool/images and pool/labels."""
    write_phantoms(tmp_path / "pool", count, "mri", seed=5)
    return tmp_path / "pool"


# --- the rule ------------------------------------------------------------------------------------------------------


def test_phantom_label_maps_look_like_label_maps_as_integers_floats_and_all_background():
    _, label, _ = _scan_and_label(0)
    assert sorted(np.unique(label).tolist()) == [0, 1, 2, 3]
    assert looks_like_label_map(label)
    assert looks_like_label_map(label.astype(np.float32))  # some tools store labels as whole-valued floats
    assert looks_like_label_map(np.zeros((8, 8, 8), np.uint8))


def test_ct_in_integer_hu_is_not_a_label_map():
    scan, _, _ = _scan_and_label(0, "ct")
    assert scan.dtype == np.int16 and np.unique(scan).size > 1000  # thousands of HU values
    assert not looks_like_label_map(scan)
    # a clinical-size CT goes through the subsample (2**18 voxels): noise in HU is never a few values
    big = np.clip(np.random.default_rng(0).normal(40, 300, (256, 256, 96)), -1024, 3071).astype(np.int16)
    assert not looks_like_label_map(big)


@pytest.mark.parametrize("site", ["A", "B", "C"])
def test_mri_phantoms_of_every_site_are_not_label_maps(site):
    image, _, _ = make_phantom(1, site_config(site))
    scan = np.round(image).astype(np.uint16)
    assert np.unique(scan).size > 500
    assert not looks_like_label_map(scan)


def test_values_the_subsample_misses_are_counted_over_the_whole_array():
    # 256 x 256 x 64 = 4 M voxels, 16 times the subsample (2**18 voxels at fixed random places)
    label = np.zeros((256, 256, 64), np.uint8, order="F")  # NIfTI arrays read Fortran-ordered
    for value in range(1, LABEL_MAP_MAX_VALUES):
        label[value * 8 : value * 8 + 8, :, :] = value  # 32 values in wide slabs: all in the sample
    assert looks_like_label_map(label)
    label[10, 20, 30] = 200  # a one-voxel 33rd value at a place the subsample does not look
    assert not looks_like_label_map(label)
    assert looks_like_label_map(label, max_values=33)


def test_fractional_values_are_not_a_label_map():
    values = np.zeros((8, 8, 8), np.float32)
    values[2:4, 2:4, 2:4] = 0.5  # a label resampled with linear interpolation, or a probability map
    assert not looks_like_label_map(values)


def test_reading_a_label_map_as_a_scan_is_refused_with_the_reason(tmp_path):
    _, label, affine = _scan_and_label(0)
    path = write_nifti(tmp_path / "mri_000.nii.gz", label, affine)
    with pytest.raises(VolumeError) as caught:
        read_scan(path)
    assert caught.value.reason == "looks like a label map, not a scan (4 distinct whole values, 0 to 3)"
    assert "images/ rather than labels/" in caught.value.fix
    assert read_volume(path).array.shape == label.shape  # as a label it still reads


# --- asfda rank and stats ------------------------------------------------------------------------------------------


def test_rank_on_a_dataset_folder_names_its_images_sub_folder_not_recursive(tmp_path, capsys):
    pool = _pool(tmp_path)
    assert main(["rank", "--images", str(pool), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"the scans look to be in a sub-folder: give --images {pool / 'images'}")
    assert "--recursive" not in err
    assert len(err.strip().splitlines()) == 1


def test_rank_on_a_folder_of_imagestr_and_imagests_names_both(tmp_path, capsys):
    pool = _pool(tmp_path)
    (pool / "images").rename(pool / "imagesTr")
    shutil.copytree(pool / "imagesTr", pool / "imagesTs")
    (pool / "labels").rename(pool / "labelsTr")
    assert main(["rank", "--images", str(pool), "--out", str(tmp_path / "s")]) == 1
    assert f"give --images {pool / 'imagesTr'} (or {pool / 'imagesTs'})" in capsys.readouterr().err


def test_rank_on_a_labels_folder_fails_in_one_line_naming_the_scans_folder(tmp_path, capsys):
    pool = _pool(tmp_path)
    out = tmp_path / "s"
    assert main(["rank", "--images", str(pool / "labels"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"asfda rank: error: {pool / 'labels'}: all 2 volumes look like label maps, not scans (whole values, at most "
        f"32 distinct; e.g. mri_000.nii.gz); give --images the folder of the scans, e.g. --images {pool / 'images'}"
    )
    assert not out.exists()  # a failed first rank leaves no session behind


def test_label_maps_among_scans_are_skipped_with_their_reason_and_the_scans_ranked(tmp_path, default_model, mri_pool):
    ranking = rank_folder(mri_pool, default_model, tmp_path / "cache", RankConfig(recursive=True, budget=2))
    scored = sorted(r.file for r in ranking.rows if r.status == "scored")
    assert scored == sorted(f"images/{p.name}" for p in (mri_pool / "images").iterdir())  # MRI scans all kept
    skipped = {r.file: r.reason for r in ranking.skipped}
    assert sorted(skipped) == sorted(f"labels/{p.name}" for p in (mri_pool / "labels").iterdir())
    assert all(reason.startswith("looks like a label map, not a scan (4 distinct") for reason in skipped.values())
    assert all(not f.startswith("labels/") for f in (r.file for r in ranking.selected))


def test_label_maps_scored_into_a_cache_before_pools_told_them_apart_are_skipped_on_re_rank(
    tmp_path, default_model, mri_pool, monkeypatch
):
    from ASFDALib.query import cache, ranking

    config = RankConfig(recursive=True, budget=2)
    with monkeypatch.context() as before:  # a cache filled by the release that read label maps as scans
        before.setattr(cache, "SCORING_VERSION", "1")
        before.setattr(ranking, "read_scan", read_volume)
        earlier = rank_folder(mri_pool, default_model, tmp_path / "cache", config)
    assert not earlier.skipped  # the label maps were scored, and their sweeps cached
    again = rank_folder(mri_pool, default_model, tmp_path / "cache", config)
    assert sorted(r.file for r in again.skipped) == sorted(f"labels/{p.name}" for p in (mri_pool / "labels").iterdir())


def test_predict_segments_the_scans_of_a_folder_and_skips_its_label_maps_with_the_reason(tmp_path, default_model):
    from ASFDALib.adaptation.pipeline import predict_folder

    folder = tmp_path / "mixed"
    write_phantoms(folder, 1, "mri", seed=3)
    shutil.copy(folder / "labels" / "mri_000.nii.gz", folder / "images" / "mri_000_seg.nii.gz")
    written, skipped = predict_folder(default_model, folder / "images", tmp_path / "pred", "cpu")
    assert [p.name for p in written] == ["mri_000.nii.gz"]
    assert len(skipped) == 1 and "mri_000_seg.nii.gz" in skipped[0] and "looks like a label map" in skipped[0]


def test_the_python_predict_refuses_to_write_over_its_scans_or_reference_labels_before_writing(tmp_path, default_model):
    """predict_folder itself guards, as `asfda predict` does: the images folder as out, a folder of reference
    labels, a session's folder are refused with nothing written; its maps say which model made them."""
    from ASFDALib.adaptation.pipeline import predict_folder
    from ASFDALib.errors import ASFDAError
    from ASFDALib.outputs import predictions_made_by, predictions_made_from

    folder = tmp_path / "pool"
    write_phantoms(folder, 1, "mri", seed=3)
    before = {p: p.read_bytes() for p in folder.rglob("*.nii.gz")}
    with pytest.raises(
        ASFDAError, match="is the images folder itself; choose another output folder, e.g. .*images_pred"
    ):
        predict_folder(default_model, folder / "images", folder / "images", "cpu")
    with pytest.raises(ASFDAError, match="mri_000.nii.gz: exists and was not written by asfda predict"):
        predict_folder(default_model, folder / "images", folder / "labels", "cpu")
    assert {p: p.read_bytes() for p in folder.rglob("*.nii.gz")} == before
    written, _ = predict_folder(default_model, folder / "images", tmp_path / "pred", "cpu")
    assert predictions_made_by(tmp_path / "pred")["mri_000.nii.gz"]["digest"] == default_model.digest
    assert set(predictions_made_from(tmp_path / "pred")) == {"mri_000.nii.gz"}
    again, _ = predict_folder(default_model, folder / "images", tmp_path / "pred", "cpu")  # its own maps: replaced
    assert again == written


def test_the_python_predict_takes_recursive_and_a_run_stopped_midway_is_finished_by_the_next(tmp_path, default_model):
    """predict_folder(recursive=True), as asfda predict --recursive: each map at its scan's path under out, the
    manifest naming it so; a run stopped after its first map leaves that map its own, and the next writes all."""
    from ASFDALib.adaptation.pipeline import predict_folder
    from ASFDALib.data.volumes import content_hash
    from ASFDALib.outputs import predictions_made_from, unchanged_predictions

    scans = sorted((_pool(tmp_path) / "images").iterdir())
    nested, out = tmp_path / "nested", tmp_path / "pred"
    names = [f"site{i}/anat/{scan.name}" for i, scan in enumerate(scans, 1)]
    for name, scan in zip(names, scans):
        (nested / name).parent.mkdir(parents=True)
        shutil.copy(scan, nested / name)

    def stop_at_the_second(done: int, total: int, name: str) -> None:
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_folder(default_model, nested, out, "cpu", stop_at_the_second, recursive=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz")) == names[:1]
    written, skipped = predict_folder(default_model, nested, out, "cpu", recursive=True)
    assert [p.relative_to(out).as_posix() for p in written] == names and skipped == []
    assert predictions_made_from(out) == {name: content_hash(nested / name) for name in names}
    # labels import knows an unchanged map from the manifest above its sub-folder: no model output as a label
    assert unchanged_predictions([out / names[0], nested / names[0]]) == {out / names[0]}
    assert not list(out.rglob(".asfda_predict.lock"))


def test_the_python_predict_leaves_out_the_session_its_model_comes_from_as_the_command_does(tmp_path, default_model):
    """A session kept inside a recursive pool holds labels and copies that are no scans: predict_folder with a
    session's model leaves that session out, as asfda predict does."""
    from dataclasses import replace

    from ASFDALib.adaptation.pipeline import predict_folder

    scans = sorted((_pool(tmp_path) / "images").iterdir())[:2]
    pool, out = tmp_path / "nested", tmp_path / "pred"
    (pool / "site1").mkdir(parents=True)
    for scan in scans:
        shutil.copy(scan, pool / "site1" / scan.name)
    (pool / "session" / "labels").mkdir(parents=True)
    shutil.copy(scans[0], pool / "session" / "labels" / "kept.nii.gz")
    model = replace(default_model, made_by={"session": str((pool / "session").resolve()), "model": "source"})
    written, _ = predict_folder(model, pool, out, "cpu", recursive=True)
    assert [p.relative_to(out).as_posix() for p in written] == [f"site1/{scan.name}" for scan in scans]


def test_ct_scans_in_integer_hu_are_ranked_not_skipped(tmp_path, default_model):
    write_phantoms(tmp_path / "ct", 2, "ct", seed=4, labels=False)
    assert read_volume(tmp_path / "ct" / "images" / "ct_000.nii.gz").array.dtype == np.int16
    ranking = rank_folder(tmp_path / "ct" / "images", default_model, tmp_path / "cache", RankConfig(budget=1))
    assert [r.status for r in ranking.rows] == ["scored", "scored"]


def test_a_session_inside_the_images_folder_is_never_scanned(tmp_path, mri_pool):
    images = tmp_path / "images"
    shutil.copytree(mri_pool / "images", images)
    out = images / "sess"
    assert main(["rank", "--images", str(images), "--out", str(out), "--budget", "1"]) == 0
    (query,) = json.loads((out / "ranking.json").read_text())["selected"]
    assert main(["labels", "import", str(out), "--from", str(mri_pool / "labels")]) == 0
    assert (out / "labels" / query.replace(".nii.gz", ".v1.nii.gz")).is_file()
    assert main(["rank", "--images", str(images), "--out", str(out), "--recursive", "--budget", "2"]) == 0
    report = json.loads((out / "ranking.json").read_text())
    files = [r["file"] for r in report["rows"]]  # scored, labelled and skipped alike
    assert sorted(files) == sorted(p.name for p in (mri_pool / "images").iterdir())  # not even listed as skipped


def test_stats_skips_label_maps_in_its_folder_with_the_reason(tmp_path, default_model):
    scan, label, affine = _scan_and_label(2, "ct")
    write_nifti(tmp_path / "source" / "ct_000.nii.gz", scan, affine)
    write_nifti(tmp_path / "source" / "ct_000_seg.nii.gz", label, affine)
    pooled, skipped = compute_source_stats(default_model, tmp_path / "source", tmp_path / "stats.npz")
    assert skipped == [
        f"{tmp_path / 'source' / 'ct_000_seg.nii.gz'}: looks like a label map, not a scan (4 distinct whole values, "
        "0 to 3) (give --images the scans' folder, e.g. images/ rather than labels/)"
    ]
    assert pooled.layers and (tmp_path / "stats.npz").is_file()


# --- asfda labels import -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, mri_pool) -> Path:
    """The MRI pool ranked with budget 1."""
    out = tmp_path_factory.mktemp("ranked") / "session"
    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(out), "--budget", "1"]) == 0
    return out


@pytest.fixture
def session(ranked, tmp_path) -> Path:
    """A fresh copy of the ranked session for each test (imports change it)."""
    shutil.copytree(ranked, tmp_path / "session")
    return tmp_path / "session"


def test_importing_the_scan_itself_as_its_label_is_refused_in_one_line(session, mri_pool, capsys):
    name = "mri_000.nii.gz"
    scan = mri_pool / "images" / name
    assert main(["labels", "import", str(session), "--from", str(scan), "--cases", name]) == 1
    count = np.unique(read_volume(scan).array).size
    refused = [line for line in capsys.readouterr().out.splitlines() if line.startswith("refused")]
    assert refused == [
        f"refused {scan}: is the session's image {name} itself ({count} distinct values), not a label map (give "
        "the case's label map, its segmentation file, e.g. the one in the labels/ folder)"
    ]
    assert not (session / "labels").exists()


def test_an_8_bit_scan_offered_as_its_own_label_is_named_as_the_scan(tmp_path):
    # 256 values at most: as many as a label map may hold, so only the voxels being the scan's tell
    scan, _, affine = _scan_and_label(0)
    eight_bit = np.clip(scan / scan.max() * 255, 0, 255).astype(np.uint8)
    image = write_nifti(tmp_path / "scan.nii.gz", eight_bit, affine)
    with pytest.raises(LabelError, match=r"is the session's image scan\.nii\.gz itself \(\d+ distinct values\)"):
        validate_label(image, image, ["background", "liver", "kidney", "gallbladder"])


def test_a_label_resampled_with_linear_interpolation_is_told_its_fractional_values_not_called_a_scan(tmp_path):
    scan, label, affine = _scan_and_label(0)
    blurred = label.astype(np.float32)
    blurred[1:] = 0.5 * (blurred[1:] + blurred[:-1])  # linear interpolation across one axis: edges go fractional
    blurred += np.where(blurred % 1, np.random.default_rng(0).uniform(-0.1, 0.1, blurred.shape), 0).astype(np.float32)
    assert np.unique(blurred).size > 256 and np.mean(blurred == np.round(blurred)) > 0.5
    image = write_nifti(tmp_path / "scan.nii.gz", scan, affine)
    path = write_nifti(tmp_path / "label.nii.gz", blurred, affine)
    with pytest.raises(LabelError, match="fractional values.*nearest-neighbour"):
        validate_label(path, image, ["background", "liver", "kidney", "gallbladder"])


def test_importing_another_scan_as_a_label_is_refused_as_an_intensity_image(session, mri_pool, capsys):
    other = mri_pool / "images" / "mri_001.nii.gz"
    assert main(["labels", "import", str(session), "--from", str(other), "--cases", "mri_000.nii.gz"]) == 1
    count = np.unique(read_volume(other).array).size
    printed = capsys.readouterr().out
    assert f"holds {count} distinct values and looks like an intensity image, not a label map (give" in printed
    assert "itself" not in printed and "--map" not in printed


def test_a_label_map_of_forty_structures_is_not_taken_for_a_scan(tmp_path):
    # atlases label more structures than a scan pool's rule allows (32): importing them must still work
    scan, _, affine = _scan_and_label(0)
    values = np.zeros(scan.shape, np.uint8)
    for value in range(1, 41):
        values[value, :, :] = value
    image = write_nifti(tmp_path / "case.nii.gz", scan, affine)
    label = write_nifti(tmp_path / "case_seg.nii.gz", values, affine)
    with pytest.raises(LabelError, match=r"label values \[4-40\] are not classes"):
        validate_label(label, image, CLASSES)


# --- asfda evaluate ------------------------------------------------------------------------------------------------


def test_evaluate_refuses_scans_given_as_predictions_and_writes_nothing(tmp_path, capsys):
    pool = _pool(tmp_path)
    args = ["evaluate", "--pred", str(pool / "images"), "--labels", str(pool / "labels"), "--card", str(CARD)]
    assert main(args) == 1
    first = pool / "images" / "mri_000.nii.gz"
    count = np.unique(read_volume(first).array).size
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"asfda evaluate: error: {first}: holds {count} distinct values and looks like an intensity image, not a "
        "label map (give --pred the folder of predicted label maps, as asfda predict --out writes)"
    )
    assert captured.out == ""  # refused before any case was scored
    assert sorted(p.name for p in (pool / "images").iterdir()) == ["mri_000.nii.gz", "mri_001.nii.gz"]


def test_evaluate_still_scores_label_maps_given_as_predictions(tmp_path, capsys):
    pool = _pool(tmp_path)
    out = tmp_path / "evaluation.csv"
    shutil.copytree(pool / "labels", tmp_path / "as_pred")  # the same maps in a folder of their own
    args = ["evaluate", "--pred", str(tmp_path / "as_pred"), "--labels", str(pool / "labels"), "--card", str(CARD)]
    assert main([*args, "--out", str(out)]) == 0
    mean = out.read_text().splitlines()[-1].split(",")
    assert mean[0] == "MEAN" and mean[-1] == "1.0000"  # each label against itself


def test_predicting_an_array_without_its_channel_axis_says_the_shape_it_takes(default_model):
    """A script passing a volume's (X, Y, Z) array: one line naming the (1, X, Y, Z) shape and preprocess."""
    from ASFDALib.inference.predict import predict_label

    with pytest.raises(ValueError, match=r"an image of shape \(8, 8, 8\): give \(1, X, Y, Z\), as data.preprocess"):
        predict_label(default_model.network, np.zeros((8, 8, 8), np.float32), default_model.card, "cpu")


def test_phantoms_written_from_python_never_replace_a_volume(tmp_path):
    """As `asfda phantoms`: a pool (perhaps one a session ranks) is refused before any file is written."""
    from ASFDALib.errors import ASFDAError

    write_phantoms(tmp_path, 2, "mri", seed=1)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.nii.gz")}
    with pytest.raises(ASFDAError, match="mri_000.nii.gz: already exists .*phantoms never replace a volume"):
        write_phantoms(tmp_path, 3, "mri", seed=2)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.nii.gz")} == before


def test_a_python_ranking_never_writes_its_cache_or_session_among_the_scans(tmp_path, mri_pool, default_model):
    """As `asfda rank` refuses --out equal to --images: the engine refuses it too, before scoring."""
    from ASFDALib.adaptation.rounds import rank_round
    from ASFDALib.adaptation.session import Session
    from ASFDALib.errors import ASFDAError

    images = tmp_path / "images"
    shutil.copytree(mri_pool / "images", images)
    with pytest.raises(ASFDAError, match="is the images folder itself; give the score cache a folder of its own"):
        rank_folder(images, default_model, images, RankConfig(budget=1))
    session = Session.open(images, create=True)
    with pytest.raises(ASFDAError, match="is the images folder itself; give the session a folder of its own"):
        rank_round(session, images, lambda: default_model, default_model.path, RankConfig(budget=1), False)
    assert sorted(p.name for p in images.iterdir()) == sorted(p.name for p in (mri_pool / "images").iterdir())


def test_evaluate_refuses_one_folder_given_as_both_predictions_and_references(tmp_path, capsys):
    pool = _pool(tmp_path)
    assert (
        main(["evaluate", "--pred", str(pool / "labels"), "--labels", str(pool / "labels"), "--card", str(CARD)]) == 1
    )
    assert "given as both --pred and --labels (every Dice would be 1)" in capsys.readouterr().err
