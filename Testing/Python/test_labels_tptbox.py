"""`asfda labels import` and `asfda evaluate` walked as a user does, on the vendored real tptbox CT/MRI.

The files keep their BIDS names (`sub-mri_label-6_T2w.nii.gz`, `sub-mri_seg-subreg_label-6_msk.nii.gz`) and
raw subregion values (41-50, 60-62, 100). The session's model is the built-in network under a spine card
(background, vertebral body, posterior elements, disc) so that class names in `--map` read as a user writes them.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import DATA, REPO

from ASFDALib.app.cli import main
from ASFDALib.data.labels import parse_mapping
from ASFDALib.data.volumes import read_volume, write_nifti

TPTBOX = DATA / "tptbox"
MRI, CT = "sub-mri_label-6_T2w.nii.gz", "sub-ct_label-22_ct.nii.gz"
MRI_SUBREG, CT_SUBREG = "sub-mri_seg-subreg_label-6_msk.nii.gz", "sub-ct_seg-subreg_label-22_msk.nii.gz"
SPINE = ["background", "vertebral body", "posterior elements", "disc"]
SPINE_MAP = "41-48=posterior elements;49,50=vertebral body,100=disc,*=0"


def _spine(values: np.ndarray) -> np.ndarray:
    """What SPINE_MAP should make of raw tptbox subregion values, computed independently of the parser."""
    out = np.zeros(values.shape, np.uint8)
    out[(values >= 41) & (values <= 48)] = 2
    out[np.isin(values, (49, 50))] = 1
    out[values == 100] = 3
    return out


@pytest.fixture(scope="module")
def ranked(tmp_path_factory) -> Path:
    """Both tptbox scans ranked with budget 1 under the spine card; the MRI is the query."""
    root = tmp_path_factory.mktemp("tptbox")
    (root / "images").mkdir()
    for name in (MRI, CT):
        shutil.copy(TPTBOX / name, root / "images" / name)
    shutil.copy(REPO / "Resources" / "Model" / "asfda_default.pt", root / "spine.pt")
    card = json.loads((REPO / "Resources" / "Model" / "asfda_default.card.json").read_text())
    card.update(class_names=SPINE, name="spine-test")
    card.pop("source_stats")
    (root / "spine.card.json").write_text(json.dumps(card))
    out = root / "session"
    args = ["rank", "--model", str(root / "spine.pt"), "--images", str(root / "images"), "--out", str(out)]
    assert main([*args, "--budget", "1"]) == 0
    assert json.loads((out / "ranking.json").read_text())["selected"] == [MRI]
    return out


@pytest.fixture
def session(ranked, tmp_path) -> Path:
    """A fresh copy of the ranked session for each test (imports change it)."""
    return Path(shutil.copytree(ranked, tmp_path / "session"))


def _labels(session: Path) -> dict:
    return json.loads((session / "session.json").read_text())["labels"]


def _stored(session: Path, name: str) -> np.ndarray:
    return np.asarray(read_volume(session / _labels(session)[name][-1]["file"], allow_constant=True).array)


def _folder(tmp_path: Path, *names: str, sub: str = "gt") -> Path:
    folder = tmp_path / sub
    folder.mkdir()
    for name in names:
        shutil.copy(TPTBOX / name, folder / name)
    return folder


def _raw(name: str) -> np.ndarray:
    return np.asarray(nib.load(TPTBOX / name).dataobj)


# --- item 5: BIDS names pair; a label that pairs with nothing says what it expected --------------------------


def test_importing_the_same_label_again_adds_no_version_and_says_unchanged(session, tmp_path, capsys):
    gt = _folder(tmp_path, MRI_SUBREG)
    assert main(["labels", "import", str(session), "--from", str(gt), "--map", SPINE_MAP]) == 0
    capsys.readouterr()
    assert main(["labels", "import", str(session), "--from", str(gt), "--map", SPINE_MAP]) == 0
    out = capsys.readouterr().out
    assert f"unchanged {MRI}: the same as its current version" in out and "1 unchanged" in out
    assert len(_labels(session)[MRI]) == 1


def test_a_bids_segmentation_pairs_with_its_scan(session, tmp_path, capsys):
    gt = _folder(tmp_path, MRI_SUBREG)
    assert main(["labels", "import", str(session), "--from", str(gt), "--map", SPINE_MAP]) == 0
    out = capsys.readouterr().out
    assert f"imported {MRI} <- {gt / MRI_SUBREG}" in out
    entry = _labels(session)[MRI]
    assert len(entry) == 1 and entry[0]["source"] == f"import:{gt / MRI_SUBREG}"
    np.testing.assert_array_equal(_stored(session, MRI), _spine(_raw(MRI_SUBREG)))
    # session.json keeps how the file's values became classes (41-48 -> 2, 49/50 -> 1, 100 -> 3, the rest 0)
    recorded = entry[0]["map"]
    assert recorded["default"] == 0 and recorded["values"]["41"] == recorded["values"]["48"] == 2
    assert (recorded["values"]["49"], recorded["values"]["50"], recorded["values"]["100"]) == (1, 1, 3)


def test_a_label_with_no_matching_scan_names_the_expected_scan_and_the_closest(session, tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    shutil.copy(TPTBOX / MRI_SUBREG, tmp_path / "gt" / "sub-mri_seg-subreg_label-7_msk.nii.gz")
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt"), "--map", SPINE_MAP]) == 1
    out = capsys.readouterr().out
    assert (
        "sub-mri_seg-subreg_label-7_msk.nii.gz: no image has this case name "
        f"(expected 'sub-mri_label-7_<modality>.nii.gz'; closest: {MRI}"
    ) in out
    # the queried scan is still waiting for its label, and the line says where and how to name it
    said = " ".join(out.split())
    case = MRI.removesuffix(".nii.gz")
    assert f"no label file for {MRI} in {tmp_path / 'gt'} (a label is named by its scan's case name: e.g. " in said
    assert f"{case}_seg.nii.gz" in said
    assert _labels(session) == {}


def test_a_label_in_a_format_not_read_is_named_beside_the_scan_still_waiting_for_it(session, tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "sub-mri_label-6_msk.mgz").write_bytes(b"FreeSurfer")  # saved by another tool
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt")]) == 1  # nothing could be imported
    out = " ".join(capsys.readouterr().out.split())
    assert f"no label file for {MRI} in {tmp_path / 'gt'} (a label is named by" in out
    assert f".seg.nrrd) Passed over 1 file in {tmp_path / 'gt'} of no volume type" in out
    assert "(.mgz 1: e.g. sub-mri_label-6_msk.mgz); to import one of them, convert it to NIfTI" in out


def test_two_segmentations_of_one_scan_are_refused_until_one_is_chosen(session, tmp_path, capsys):
    gt = _folder(tmp_path, MRI_SUBREG, "sub-mri_seg-vert_label-6_msk.nii.gz")
    assert main(["labels", "import", str(session), "--from", str(gt), "--map", SPINE_MAP]) == 1
    out = capsys.readouterr().out
    assert f"refused {gt / MRI_SUBREG}: several label files fit image {MRI} (also sub-mri_seg-vert_label-6_msk" in out
    assert _labels(session) == {}
    # the fix the message names: import the one that is meant
    assert main(["labels", "import", str(session), "--from", str(gt / MRI_SUBREG), "--map", SPINE_MAP]) == 0
    np.testing.assert_array_equal(_stored(session, MRI), _spine(_raw(MRI_SUBREG)))


# --- item 6: ranges, names and a default in --map; a bad map is one line ----------------------------------------


def test_a_map_of_ranges_names_and_a_default_turns_14_raw_values_into_the_cards_classes(session, tmp_path, capsys):
    gt = _folder(tmp_path, MRI_SUBREG)
    raw = _raw(MRI_SUBREG)
    assert len(np.unique(raw)) == 14  # one term per value was the only way before
    assert main(["labels", "import", str(session), "--from", str(gt), "--map", SPINE_MAP]) == 0
    stored = _stored(session, MRI)
    assert sorted(np.unique(stored).tolist()) == [0, 1, 2, 3]
    assert int((stored == 1).sum()) == int(np.isin(raw, (49, 50)).sum()) > 0
    assert int((stored == 2).sum()) == int(((raw >= 41) & (raw <= 48)).sum()) > 0
    assert int((stored == 3).sum()) == int((raw == 100).sum()) > 0
    assert int((stored == 0).sum()) == int(np.isin(raw, (0, 60, 61, 62)).sum())  # '*=0': cord, canal, endplates


@pytest.mark.parametrize(
    ("bad", "term"),
    [
        ("41-48=2,49,50=vertebra", "'49,50=vertebra'"),
        ("48-41=2", "'48-41=2'"),
        ("41-48=2,100", "'100'"),
        ("41:48=2", "'41:48=2'"),
        ("41-48=7", "'41-48=7'"),
    ],
)
def test_a_malformed_map_is_one_line_naming_the_term_with_an_example(session, tmp_path, capsys, bad, term):
    gt = _folder(tmp_path, MRI_SUBREG)
    assert main(["labels", "import", str(session), "--from", str(gt), "--map", bad]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith(f"asfda labels: error: --map term {term}: ")
    assert lines[0].endswith('(example: --map "7=vertebral body,8,9=posterior elements,*=0")')  # its classes
    assert _labels(session) == {}


def test_a_misspelt_class_name_suggests_the_cards_name(session, tmp_path, capsys):
    gt = _folder(tmp_path, MRI_SUBREG)
    assert main(["labels", "import", str(session), "--from", str(gt), "--map", "49,50=vertebral bodies"]) == 1
    assert "did you mean 'vertebral body'?" in capsys.readouterr().err


# --- item 7: another storage order of the same grid is reoriented; another grid is refused ---------------------


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("S", "L", "A")])
def test_a_label_stored_in_another_axis_order_is_reoriented_onto_the_scan(session, tmp_path, capsys, codes):
    original = nib.load(TPTBOX / MRI_SUBREG)
    assert nib.aff2axcodes(original.affine) == ("P", "I", "R")
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(original.affine), nib.orientations.axcodes2ornt(codes)
    )
    turned = original.as_reoriented(transform)
    assert nib.aff2axcodes(turned.affine) == codes
    (tmp_path / "gt").mkdir()
    nib.save(turned, tmp_path / "gt" / MRI_SUBREG)
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt"), "--map", SPINE_MAP]) == 0
    assert f"(reoriented from {''.join(codes)} to the image's PIR storage order)" in capsys.readouterr().out
    stored = read_volume(session / _labels(session)[MRI][-1]["file"], allow_constant=True)
    np.testing.assert_array_equal(stored.array, _spine(_raw(MRI_SUBREG)))
    np.testing.assert_allclose(stored.affine, nib.load(TPTBOX / MRI).affine, atol=1e-4)


def test_a_label_on_a_truly_different_grid_is_still_refused(session, tmp_path, capsys):
    original = nib.load(TPTBOX / MRI_SUBREG)
    (tmp_path / "gt").mkdir()
    shifted = original.affine.copy()
    shifted[:3, 3] += shifted[:3, 0]  # one voxel along the first axis: same size, other voxels
    nib.save(nib.Nifti1Image(np.asanyarray(original.dataobj), shifted), tmp_path / "gt" / MRI_SUBREG)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(np.asanyarray(original.dataobj)[:, :, 1:], shifted))
    (tmp_path / "gt2").mkdir()
    nib.save(canonical, tmp_path / "gt2" / MRI_SUBREG)
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt"), "--map", SPINE_MAP]) == 1
    assert "label geometry differs from the image's: origin by 1.5 mm" in capsys.readouterr().out
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt2"), "--map", SPINE_MAP]) == 1
    out = capsys.readouterr().out
    assert "differs from the image's (68, 52, 67)" in out and "(after it was reoriented from RAS" in out
    assert _labels(session) == {}


# --- item 8: only the queried scans' labels are imported unless asked; the report says what is left -------------


def test_labels_of_scans_that_were_not_queried_are_skipped_and_the_pseudo_label_pool_is_reported(
    session, tmp_path, capsys
):
    gt = _folder(tmp_path, MRI_SUBREG, CT_SUBREG)
    assert main(["labels", "import", str(session), "--from", str(gt), "--map", SPINE_MAP]) == 0
    out = capsys.readouterr().out
    assert f"skipped {gt / CT_SUBREG}: image {CT} was not asked for (no round has queried it)" in out
    assert "Imported 1 of 1 queried volumes; skipped 1 (not asked for, or of no image), refused 0. " in out
    assert "1 of 2 volumes stay unlabeled for pseudo-labels." in out
    assert set(_labels(session)) == {MRI}
    # asked for explicitly, by its case name
    assert main(["labels", "import", str(session), "--from", str(gt), "--map", SPINE_MAP, "--cases", "sub-ct"]) == 1
    assert "--cases 'sub-ct' is not an image of the session" in capsys.readouterr().err
    args = ["labels", "import", str(session), "--from", str(gt), "--map", SPINE_MAP, "--cases", "sub-ct_label-22_ct"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"imported {CT} <- {gt / CT_SUBREG}" in out
    assert "No unlabeled volume is left for pseudo-labels; 'asfda finetune' will train on the labels only." in out
    assert set(_labels(session)) == {MRI, CT} and len(_labels(session)[MRI]) == 1
    np.testing.assert_array_equal(_stored(session, CT), _spine(_raw(CT_SUBREG)))


def test_all_imports_every_scans_label(session, tmp_path, capsys):
    gt = _folder(tmp_path, MRI_SUBREG, CT_SUBREG)
    assert main(["labels", "import", str(session), "--from", str(gt), "--map", SPINE_MAP, "--all"]) == 0
    assert "Imported 2 of 2 asked-for volumes; skipped 0" in capsys.readouterr().out
    assert set(_labels(session)) == {MRI, CT}


# --- item 9: evaluate on raw reference labels takes the map and the card's classes -----------------------------


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_on_raw_references_warns_and_keeps_to_the_models_classes(session, tmp_path, capsys):
    gt = _folder(tmp_path, MRI_SUBREG, CT_SUBREG)
    images = Path(json.loads((session / "session.json").read_text())["images"]["root"])
    assert main(["predict", str(session), "--images", str(images), "--out", str(tmp_path / "pred")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--labels", str(gt), "--session", str(session)]) == 0
    out = capsys.readouterr().out
    assert f"warning {MRI_SUBREG}: reference values [41-49,60-62,100] are not classes (0=background, " in out
    assert f"warning {CT_SUBREG}: reference values [41-50] are not classes" in out
    assert "e.g. --map 41-49=1,60-62=2,100=3 (VALUE=CLASS" in " ".join(out.split())  # every range, each to a class
    rows = _csv(tmp_path / "pred" / "evaluation.csv")
    dice_columns = [c for c in rows[0] if c.startswith("dice_")]
    assert dice_columns == ["dice_vertebral body", "dice_posterior elements", "dice_disc", "dice_mean"]
    assert rows[0]["reason"] == "not classes, left out: 41-50"


def test_evaluate_offers_the_map_the_session_imported_a_reference_file_with(session, tmp_path, capsys):
    assert (
        main(
            [
                "labels",
                "import",
                str(session),
                "--from",
                str(_folder(tmp_path, MRI_SUBREG, sub="imported")),
                "--map",
                SPINE_MAP,
            ]
        )
        == 0
    )
    gt = _folder(tmp_path, MRI_SUBREG, CT_SUBREG)  # the CT reference was never imported: no map to offer
    images = Path(json.loads((session / "session.json").read_text())["images"]["root"])
    assert main(["predict", str(session), "--images", str(images), "--out", str(tmp_path / "pred")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--labels", str(gt), "--session", str(session)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    offered = "49-50=1,41-48=2,100=3,*=0"  # SPINE_MAP as session.json records it, by class index
    assert f"Map them with --map {offered}, as the session's labels were imported" in out
    assert f"{CT_SUBREG}: reference values [41-50] are not classes" in out and "e.g. --map 41-50=1" in out
    assert parse_mapping(offered) == parse_mapping(SPINE_MAP, SPINE)


def test_evaluate_with_the_map_scores_a_perfect_prediction_as_one(session, tmp_path, capsys):
    gt = _folder(tmp_path, MRI_SUBREG, CT_SUBREG)
    (tmp_path / "pred").mkdir()
    for scan, subreg in ((MRI, MRI_SUBREG), (CT, CT_SUBREG)):
        reference = nib.load(TPTBOX / subreg)
        write_nifti(tmp_path / "pred" / scan, _spine(_raw(subreg)), reference.affine)
    model = Path(json.loads((session / "session.json").read_text())["model"]["path"])
    card = model.with_name("spine.card.json")
    for source in (["--session", str(session)], ["--card", str(card)]):
        args = ["evaluate", "--pred", str(tmp_path / "pred"), "--labels", str(gt), *source, "--map", SPINE_MAP]
        assert main(args) == 0
        printed = capsys.readouterr()
        assert "warning" not in printed.out and "Warning" not in printed.err  # MONAI's own deprecation stays quiet
        # the terminal: a row per class (full names, not cut), each with its Dice
        assert all(f"│ {name}" in printed.out for name in ("vertebral body", "posterior elements", "disc"))
        rows = {r["case"]: r for r in _csv(tmp_path / "pred" / "evaluation.csv")}
        assert set(rows) == {MRI_SUBREG, CT_SUBREG, "MEAN"}
        assert rows[MRI_SUBREG]["dice_vertebral body"] == "1.0000" and rows[MRI_SUBREG]["dice_disc"] == "1.0000"
        assert rows[CT_SUBREG]["dice_posterior elements"] == "1.0000"
        assert rows[CT_SUBREG]["dice_disc"] == "nan"  # the lumbar crop has no disc label: no score, not zero
        assert rows["MEAN"]["dice_mean"] == "1.0000"
