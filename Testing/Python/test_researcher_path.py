"""The researcher's command-line path, walked as a new user would (issue 15): wrong folders, wrong
arguments, a card that does not fit, an unadapted session, a log file instead of a terminal."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ASFDALib.app.cli import build_parser, main
from ASFDALib.data.volumes import content_hash, relative_name

CARD = "Resources/Model/asfda_default.card.json"


def _digests(folder):
    return {p.name: content_hash(p) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, mri_pool):
    """A session ranked on a copy of the MRI pool (its images/ and labels/), never fine-tuned."""
    root = tmp_path_factory.mktemp("path")
    shutil.copytree(mri_pool, root / "pool")
    session = root / "session"
    assert main(["rank", "--images", str(root / "pool" / "images"), "--out", str(session), "--budget", "2"]) == 0
    return root, session


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_predict_into_the_images_folder_is_refused_and_the_scans_stay_as_they_were(ranked, capsys):
    root, session = ranked
    images = root / "pool" / "images"
    before = _digests(images)
    assert main(["predict", str(session), "--images", str(images), "--out", str(images)]) == 1
    err = _one_line_error(capsys)
    assert "is the images folder itself" in err and "images_pred" in err
    # nor a folder inside it: the maps would mix with the scans, and a recursive rank would meet them
    assert main(["predict", str(session), "--images", str(images), "--out", str(images / "pred")]) == 1
    assert f"is inside the images folder {images}, where the maps would mix with the scans" in _one_line_error(capsys)
    assert _digests(images) == before and not (images / "pred").exists()


def test_for_scans_inside_the_session_predict_suggests_a_folder_beside_the_session_that_it_accepts(ranked, capsys):
    root, session = ranked
    scans = session / "scans"  # a user keeps the scans to segment inside the session folder
    shutil.copytree(root / "pool" / "images", scans)
    try:
        assert main(["predict", str(session), "--images", str(scans), "--out", str(session / "pred")]) == 1
        suggested = _one_line_error(capsys).rsplit("e.g. ", 1)[1]
        assert suggested == str(session.resolve().with_name("session_pred"))
        assert main(["predict", str(session), "--images", str(scans), "--out", suggested]) == 0
        assert sorted(p.name for p in (root / "session_pred").glob("*.nii.gz")) == sorted(
            p.name for p in scans.iterdir()
        )
    finally:
        shutil.rmtree(scans)
        shutil.rmtree(root / "session_pred", ignore_errors=True)


def test_predict_over_a_file_the_session_references_is_refused(ranked, capsys):
    root, session = ranked
    images = root / "pool" / "images"
    # another folder that holds the session's own pool under the same names: a symlink to the images
    alias = root / "alias"
    alias.symlink_to(images, target_is_directory=True)
    other = root / "other_scans"
    shutil.copytree(images, other)
    assert main(["predict", str(session), "--images", str(other), "--out", str(alias)]) == 1
    assert "would write over a file the session references" in _one_line_error(capsys)


def test_predict_refuses_to_write_over_reference_labels_it_did_not_write_and_replaces_its_own(ranked, capsys):
    root, session = ranked
    images, labels = root / "pool" / "images", root / "pool" / "labels"
    before = _digests(labels)
    assert main(["predict", str(session), "--images", str(images), "--out", str(labels)]) == 1
    err = _one_line_error(capsys)
    assert "exists and was not written by asfda predict" in err and "images_pred" in err
    assert _digests(labels) == before
    # its own earlier output is replaced on a second run, and says so
    out = root / "pred"
    assert main(["predict", str(session), "--images", str(images), "--out", str(out)]) == 0
    assert main(["evaluate", "--pred", str(out), "--labels", str(labels)]) == 0  # its table lands beside the maps
    capsys.readouterr()
    assert main(["predict", str(session), "--images", str(images), "--out", str(out)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"Replacing {len(before)} label maps an earlier asfda predict wrote" in said
    assert f"{out / 'evaluation.csv'} scores the label maps replaced: 'asfda evaluate --pred {out}" in said


def test_predict_refuses_a_folder_of_reference_labels_whose_names_would_not_collide(ranked, tmp_path, capsys):
    """Labels named case_seg.nii.gz beside maps named case.nii.gz: evaluate and labels import could no longer
    tell them apart (every reference would fit two files)."""
    root, session = ranked
    refs = tmp_path / "gt"
    refs.mkdir()
    for label in sorted((root / "pool" / "labels").iterdir()):
        shutil.copy(label, refs / label.name.replace(".nii.gz", "_seg.nii.gz"))
    before = _digests(refs)
    assert main(["predict", str(session), "--images", str(root / "pool" / "images"), "--out", str(refs)]) == 1
    said = _one_line_error(capsys)
    assert f"{refs}: holds 6 volume file(s) asfda predict did not write (mri_000_seg.nii.gz, ...)" in said
    assert _digests(refs) == before and sorted(p.name for p in refs.iterdir()) == sorted(before)


def test_predict_never_writes_over_a_map_it_skipped_or_one_corrected_since(ranked, tmp_path, capsys):
    """Its manifest holds each map's hash as written: a file under a name it claimed but never wrote (a label
    copied in) and a map changed since (corrected in place) are refused, not replaced."""
    from ASFDALib.data.volumes import read_volume, write_nifti

    root, session = ranked
    pool = root / "pool"
    out = tmp_path / "pred"
    assert main(["predict", str(session), "--images", str(pool / "labels"), "--out", str(out)]) == 1  # all skipped
    first = sorted((pool / "labels").iterdir())[0]
    shutil.copy(first, out / first.name)  # a reference label put where a map would go
    capsys.readouterr()
    assert main(["predict", str(session), "--images", str(pool / "images"), "--out", str(out)]) == 1
    assert f"{out / first.name}: exists and was not written by asfda predict" in _one_line_error(capsys)
    (out / first.name).unlink()
    assert main(["predict", str(session), "--images", str(pool / "images"), "--out", str(out)]) == 0
    volume = read_volume(out / first.name, allow_constant=True)
    corrected = volume.array.copy()
    corrected[0, 0, 0] = 1
    write_nifti(out / first.name, corrected, volume.affine)
    before = (out / first.name).read_bytes()
    capsys.readouterr()
    assert main(["predict", str(session), "--images", str(pool / "images"), "--out", str(out)]) == 1
    assert "was changed since asfda predict wrote it (a corrected map?" in _one_line_error(capsys)
    assert (out / first.name).read_bytes() == before


def test_a_predict_killed_between_writing_a_map_and_recording_it_is_replaced_by_the_same_command(
    ranked, tmp_path, monkeypatch, capsys
):
    """A map on disk whose hash the manifest does not hold yet (the process killed between the two writes) is
    predict's own: the same command replaces it and records every map, rather than refusing it as another's."""
    from ASFDALib import outputs

    root, session = ranked
    images, out = root / "pool" / "images", tmp_path / "pred"
    recorded = outputs.record_predictions

    def killed_at_the_second(folder, written, *args):
        if len(outputs.predictions_made_by(folder)) == 1:
            raise SystemExit(137)  # no record of the second map, as after SIGKILL
        recorded(folder, written, *args)

    monkeypatch.setattr(outputs, "record_predictions", killed_at_the_second)
    with pytest.raises(SystemExit):
        main(["predict", str(session), "--images", str(images), "--out", str(out)])
    second = sorted(images.iterdir())[1].name
    assert (out / second).is_file() and second not in outputs.predictions_made_by(out)
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["predict", str(session), "--images", str(images), "--out", str(out)]) == 0
    assert "Replacing 2 label maps an earlier asfda predict wrote" in " ".join(capsys.readouterr().out.split())
    manifest = json.loads((out / outputs.PREDICTIONS_MANIFEST).read_text())
    assert sorted(manifest["maps"]) == sorted(p.name for p in images.iterdir()) and "writing" not in manifest
    assert all(content_hash(out / name) == digest for name, digest in manifest["maps"].items())


def test_predict_segments_the_folder_it_is_run_in_given_as_a_dot(ranked, tmp_path, monkeypatch):
    """``--images .`` from inside the pool: its suggested other --out is built from the folder's own name."""
    root, session = ranked
    monkeypatch.chdir(root / "pool" / "images")
    assert main(["predict", str(session), "--images", ".", "--out", str(tmp_path / "pred")]) == 0
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.nii.gz")) == sorted(os.listdir("."))


def test_a_predict_run_again_removes_the_scratch_files_a_killed_write_of_its_maps_left(ranked, tmp_path):
    """SIGKILL mid-write leaves a map's hidden scratch file (atomic_write's, and SimpleITK's suffixed one for
    NRRD): the next run into the folder, holding its lock, removes those of the maps it writes, nothing else."""
    root, session = ranked
    images, out = root / "pool" / "images", tmp_path / "pred"
    first = sorted(images.iterdir())[0].name
    out.mkdir()
    left = [out / f".{first}.k2j4x.tmp", out / f".{first}.q8w1z.tmp.nrrd", out / ".asfda_predictions.json.e2f.tmp"]
    kept = out / ".notes.tmp"  # not a map's: another program's
    for path in (*left, kept):
        path.write_bytes(b"half a map")
    assert main(["predict", str(session), "--images", str(images), "--out", str(out)]) == 0
    assert not any(path.exists() for path in left) and kept.read_bytes() == b"half a map"
    assert (out / first).is_file()


def test_a_map_predict_wrote_is_imported_as_a_label_only_once_corrected(ranked, tmp_path, capsys):
    """The model's own prediction, unchanged, would teach it its own errors: refused; corrected, imported."""
    from ASFDALib.data.volumes import read_volume, write_nifti

    root, template = ranked
    session = tmp_path / "s"
    shutil.copytree(template, session)
    query = json.loads((session / "ranking.json").read_text())["selected"]
    out = tmp_path / "pred"
    assert main(["predict", str(session), "--images", str(root / "pool" / "images"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["labels", "import", str(session), "--from", str(out)]) == 1
    said = " ".join(capsys.readouterr().out.split())
    assert "is a map asfda predict wrote, unchanged since: the model's own prediction, not a label" in said
    volume = read_volume(out / query[0], allow_constant=True)
    corrected = volume.array.copy()
    corrected[0, 0, 0] = 1
    write_nifti(out / query[0], corrected, volume.affine)
    assert main(["labels", "import", str(session), "--from", str(out), "--cases", query[0]]) == 0


def _stop_at_the_save(monkeypatch) -> None:
    """Ctrl-C after a label import wrote its label files and before its save of session.json."""
    from ASFDALib.adaptation.session import Session

    def stopped(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Session, "save", stopped)


def test_a_label_import_stopped_before_its_save_is_recorded_by_the_same_command_with_one_save(
    ranked, tmp_path, monkeypatch, capsys
):
    """Its label files are on disk and session.json records none: the same command records them, each once at the
    version it holds (no second version beside an unrecorded one), and saves session.json once, so its .bak is the
    session as it was before the command."""
    root, template = ranked
    session = tmp_path / "s"
    shutil.copytree(template, session)
    before = json.loads((session / "session.json").read_text())
    query = before["rounds"][0]["query"]
    argv = ["labels", "import", str(session), "--from", str(root / "pool" / "labels")]
    _stop_at_the_save(monkeypatch)
    assert main(argv) == 130
    left = {p.name: content_hash(p) for p in (session / "labels").iterdir()}
    assert len(left) == len(query) and json.loads((session / "session.json").read_text())["labels"] == {}
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["labels", str(session)]) == 0
    assert f"{len(query)} label file(s) in {session / 'labels'} recorded by no version" in " ".join(
        capsys.readouterr().out.split()
    )
    assert main(argv) == 0
    assert "on disk and recorded by no version, holds this very label: recorded as it is" in " ".join(
        capsys.readouterr().out.split()
    )
    data = json.loads((session / "session.json").read_text())
    assert {p.name: content_hash(p) for p in (session / "labels").iterdir()} == left  # nothing beside them
    recorded = {Path(v["file"]).name: v["sha256"] for name in query for v in data["labels"][name]}
    assert recorded == left
    assert json.loads((session / "session.json.bak").read_text()) == before


def test_an_unrecorded_label_is_kept_and_named_when_another_label_of_its_case_is_imported(
    ranked, tmp_path, monkeypatch, capsys
):
    """A label file session.json does not record may be the only copy of someone's label (a session.json restored
    from its .bak forgets the versions saved after it): a different label imported for the case goes past it as a
    new version, and the import names the file it kept."""
    from ASFDALib.data.volumes import read_volume, write_nifti

    root, template = ranked
    session = tmp_path / "s"
    shutil.copytree(template, session)
    case = json.loads((session / "session.json").read_text())["rounds"][0]["query"][0]
    argv = ["labels", "import", str(session), "--cases", case, "--from"]
    _stop_at_the_save(monkeypatch)
    assert main([*argv, str(root / "pool" / "labels" / case)]) == 130
    (stray,) = (session / "labels").iterdir()
    kept = content_hash(stray)
    monkeypatch.undo()
    volume = read_volume(root / "pool" / "labels" / case, allow_constant=True)
    corrected = volume.array.copy()
    corrected[0, 0, 0] = 1
    write_nifti(tmp_path / "corrected.nii.gz", corrected, volume.affine)
    capsys.readouterr()
    assert main([*argv, str(tmp_path / "corrected.nii.gz")]) == 0
    (entry,) = json.loads((session / "session.json").read_text())["labels"][case]
    new = session / entry["file"]
    said = " ".join(capsys.readouterr().out.split())
    assert f"{stray.name} is on disk and recorded by no version" in said
    assert f"kept beside this label) as labels/{new.name}" in said
    assert content_hash(stray) == kept and new != stray and new.name.replace(".v2.", ".v1.") == stray.name
    assert entry["sha256"] == content_hash(new) and read_volume(new, allow_constant=True).array[0, 0, 0] == 1


def _ranked_with_a_model_of_its_own(mri_pool: Path, tmp_path: Path) -> tuple[Path, dict, Path, list[str]]:
    """The default model copied with its card beside it, a session ranked with it, and that rank command."""
    model = tmp_path / "model.pt"
    shutil.copy("Resources/Model/asfda_default.pt", model)
    card = json.loads(Path("Resources/Model/asfda_default.card.json").read_text())
    card.pop("source_stats", None)
    (tmp_path / "model.card.json").write_text(json.dumps(card))
    session = tmp_path / "s"
    rank = ["rank", "--model", str(model), "--images", str(mri_pool / "images"), "--out", str(session)]
    assert main(rank) == 0
    return model, card, session, rank


def test_another_model_for_a_session_is_refused_naming_what_changed(mri_pool, tmp_path, capsys):
    """The same checkpoint path with another card, or the file's weights replaced, is named as such."""
    model, card, session, rank = _ranked_with_a_model_of_its_own(mri_pool, tmp_path)
    (tmp_path / "other.card.json").write_text(json.dumps({**card, "name": "renamed"}))
    assert main([*rank, "--card", str(tmp_path / "other.card.json")]) == 1
    assert (
        "s: the card given with --card differs from the one it started with (in name); leave --card out to rank on "
        "with the session's, or rank into another session (--out)" in _one_line_error(capsys)
    )
    import torch

    state = torch.load(model, weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, model)
    assert main(rank) == 1
    assert f"{model}'s weights changed since it started; use another session" in _one_line_error(capsys)


def test_the_same_weights_whose_card_reads_otherwise_now_keep_the_sessions_card_and_say_so(mri_pool, tmp_path, capsys):
    """A card ASFDA reads from the model itself (beside it, or from a bundle's transforms and nnU-Net's plans,
    which a later ASFDA reads more closely) that differs from the session's: the same weights rank on with the
    session's card, and the ranking says so; a card the user gives that differs is still refused."""
    model, card, session, rank = _ranked_with_a_model_of_its_own(mri_pool, tmp_path)
    recorded = json.loads((session / "session.json").read_text())["model"]
    (tmp_path / "model.card.json").write_text(json.dumps({**card, "intensity": {"mode": "zscore", "nonzero": False}}))
    capsys.readouterr()
    assert main(rank) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert (
        f"{model}: its card as read now (" in said and "z-score over every voxel) differs from this session's" in said
    )
    assert json.loads((session / "session.json").read_text())["model"] == recorded  # the card it keeps, unchanged
    (tmp_path / "other.card.json").write_text(json.dumps({**card, "intensity": {"mode": "zscore"}}))
    assert main([*rank, "--card", str(tmp_path / "other.card.json")]) == 1
    assert "the card given with --card differs from the one it started with (in intensity); leave --card out" in (
        _one_line_error(capsys)
    )


def test_a_card_or_class_map_without_the_model_on_a_re_rank_is_refused_not_ignored(ranked, capsys):
    """They describe the model a session starts with: alone they would do nothing, so they are refused."""
    root, session = ranked
    for option, value in (("--card", CARD), ("--class-map", "liver=liver")):
        assert main(["rank", "--out", str(session), option, value]) == 1
        err = _one_line_error(capsys)
        assert f"{option} describe the model a session starts with" in err
        assert "asfda_default.pt's; leave them out, or give them with --model" in err
    # given with the session's own model, an unchanged card checks out and the re-rank runs
    recorded = json.loads((session / "session.json").read_text())["model"]["path"]
    assert main(["rank", "--out", str(session), "--model", recorded, "--card", CARD]) == 0


def test_evaluate_names_the_predictions_and_references_no_mean_includes(mri_pool, tmp_path, capsys):
    """A mean over 3 of 6 cases says which were left out and why, not only "Mean over 3 cases"."""
    names = sorted(p.name for p in (mri_pool / "labels").iterdir())
    (tmp_path / "gt").mkdir()
    for name in names[:3]:
        shutil.copy(mri_pool / "labels" / name, tmp_path / "gt" / name)
    (tmp_path / "pred").mkdir()
    for name in names[1:]:
        shutil.copy(mri_pool / "labels" / name, tmp_path / "pred" / name)
    card = "Resources/Model/asfda_default.card.json"
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--labels", str(tmp_path / "gt"), "--card", card]
    assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    assert f"3 predictions in {pred} have no reference of the same case in {gt}, left out: " in out
    assert ", ".join(names[3:]) in out
    assert f"1 reference in {gt} has no prediction of the same case in {pred}, left out: {names[0]}" in out
    # two predictions of one case: neither is scored, and they are not said to have no reference
    shutil.copy(pred / names[1], pred / names[1].replace(".nii.gz", "_seg.nii.gz"))
    assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"2 predictions in {pred} fit the same reference as another, or several references, left out: " in out
    assert f"1 reference in {gt} has no prediction" in out and "no prediction of the same case" in out
    assert f"left out: {names[0]}" in out


def test_evaluate_stats_and_rank_refuse_to_write_over_their_inputs(ranked, capsys, tmp_path):
    root, session = ranked
    pool = root / "pool"
    label = sorted((pool / "labels").iterdir())[0]
    before = content_hash(label)
    shutil.copytree(pool / "labels", tmp_path / "as_pred")
    assert (
        main(["evaluate", "--pred", str(tmp_path / "as_pred"), "--labels", str(pool / "labels"), "--out", str(label)])
        == 1
    )
    assert "would write over an input label map" in _one_line_error(capsys)
    assert content_hash(label) == before
    scan = sorted((pool / "images").iterdir())[0]
    before = content_hash(scan)
    assert main(["stats", "--images", str(pool / "images"), "--out", str(scan)]) == 1
    assert "would write over an input" in _one_line_error(capsys)
    assert content_hash(scan) == before
    # a folder where the summary file goes: refused at once, not after the whole pass
    assert main(["stats", "--images", str(pool / "images"), "--out", str(pool / "images")]) == 1
    said = _one_line_error(capsys)
    assert f"{pool / 'images'}: is a folder; give --out a file name, e.g. {pool / 'source_stats.npz'}" in said
    # nor over the model's card, given with --card (a card written over with npz data loses the model's classes)
    card = tmp_path / "card.json"
    shutil.copy("Resources/Model/asfda_default.card.json", card)
    before = content_hash(card)
    args = ["stats", "--card", str(card), "--images", str(pool / "images"), "--out", str(card)]
    assert main(args) == 1
    assert "would write over an input" in _one_line_error(capsys)
    assert content_hash(card) == before
    # nor over the card the loader found beside the model (the same places it looks: models.loading.card_candidates)
    shutil.copy("Resources/Model/asfda_default.pt", tmp_path / "net.pt")
    beside = tmp_path / "net.card.json"
    shutil.copy("Resources/Model/asfda_default.card.json", beside)
    before = content_hash(beside)
    args = ["stats", "--model", str(tmp_path / "net.pt"), "--images", str(pool / "images"), "--out", str(beside)]
    assert main(args) == 1
    assert "would write over an input" in _one_line_error(capsys)
    assert content_hash(beside) == before
    assert main(["rank", "--images", str(pool / "images"), "--out", str(pool / "images")]) == 1
    assert "--images folder itself" in _one_line_error(capsys)
    assert not (pool / "images" / "session.json").exists()


def test_evaluate_never_writes_over_a_file_it_did_not_write_and_replaces_its_own_table(ranked, capsys, tmp_path):
    """A card, a script given as --out: refused; the table an earlier evaluation wrote: replaced."""
    root, _ = ranked
    pool = root / "pool"
    card = tmp_path / "card.json"
    card.write_text('{"class_names": ["background", "liver"]}')
    shutil.copytree(pool / "labels", tmp_path / "as_pred")
    args = ["evaluate", "--pred", str(tmp_path / "as_pred"), "--labels", str(pool / "labels")]
    assert main([*args, "--out", str(card)]) == 1
    assert f"{card}: exists and is not a table asfda evaluate wrote; choose another --out file" in _one_line_error(
        capsys
    )
    assert card.read_text() == '{"class_names": ["background", "liver"]}'
    table = tmp_path / "evaluation.csv"
    assert main([*args, "--out", str(table)]) == 0
    assert main([*args, "--out", str(table)]) == 0 and table.read_text().startswith("case,reason,")


def test_evaluate_refuses_folders_given_the_wrong_way_round_or_scans_as_references(ranked, capsys, tmp_path):
    root, session = ranked
    pool = root / "pool"
    pred = tmp_path / "pred"
    assert main(["predict", str(session), "--images", str(pool / "images"), "--out", str(pred)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(pool / "labels"), "--labels", str(pred)]) == 1
    said = _one_line_error(capsys)
    assert f"{pred}: holds label maps asfda predict wrote (asfda_predictions.json), not reference labels" in said
    assert "swap --pred and --labels" in said and not (pool / "labels" / "evaluation.csv").exists()
    shutil.copytree(pred, tmp_path / "pred2")  # two predictions folders: a swap would only move the refusal
    assert main(["evaluate", "--pred", str(tmp_path / "pred2"), "--labels", str(pred)]) == 1
    assert "not reference labels; give the reference labels as --labels" in _one_line_error(capsys)
    assert main(["evaluate", "--pred", str(pred), "--labels", str(pool / "images")]) == 1
    assert "give --labels the folder of reference label maps" in _one_line_error(capsys)
    assert not (pred / "evaluation.csv").exists()


def test_an_unadapted_session_says_so_on_predict_and_refuses_export_unless_asked(ranked, capsys, tmp_path):
    root, session = ranked
    assert main(["predict", str(session), "--images", str(root / "pool" / "images"), "--out", str(tmp_path / "p")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "has not been fine-tuned yet: predicting with the source model" in out
    assert main(["export", str(session), "--out", str(tmp_path / "bundle")]) == 1
    err = _one_line_error(capsys)
    assert "not fine-tuned yet" in err and "--source-model" in err
    assert not (tmp_path / "bundle").exists()
    assert main(["export", str(session), "--out", str(tmp_path / "bundle"), "--source-model"]) == 0
    assert (tmp_path / "bundle" / "configs" / "inference.json").is_file()
    meta = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    assert "not adapted" in meta["description"] and "adapted with" not in meta["description"]


def test_export_into_the_session_folder_is_refused(ranked, capsys):
    _, session = ranked
    assert main(["export", str(session), "--out", str(session), "--source-model"]) == 1
    assert "holds a file the session references" in _one_line_error(capsys)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--alpha", "3"], "argument --alpha: 3 is outside [0, 1]"),
        (["--budget", "0"], "argument --budget: 0 is not a positive integer"),
        (["--budget", "-1"], "argument --budget: -1 is not a positive integer"),
        (["--network", "UNet", "--network-args", "{bad"], "argument --network-args: not valid JSON"),
        (["--device", "gpu0"], "argument --device: 'gpu0' is not a device"),
        (["--images", "/no/such/folder"], "argument --images: /no/such/folder is not a folder"),
    ],
)
def test_a_wrong_argument_is_one_line_before_any_work(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["rank", "--out", str(tmp_path / "s"), *args])
    assert exc.value.code == 2
    err = _one_line_error(capsys)
    assert message in err and "(see 'asfda rank --help')" in err
    assert not (tmp_path / "s").exists()  # nothing was started


def test_labels_from_a_missing_folder_is_an_argument_error_naming_the_labels(ranked, capsys):
    _, session = ranked
    with pytest.raises(SystemExit) as exc:
        main(["labels", "import", str(session), "--from", "/no/such/labels"])
    assert exc.value.code == 2
    err = _one_line_error(capsys)
    assert "argument --from: /no/such/labels does not exist (see 'asfda labels --help')" in err


def _usage_error(argv: list[str], capsys) -> str:
    """An argument error: exit 2 and one line, as the help's exit status says, before any session opens."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return _one_line_error(capsys)


def test_labels_without_a_session_or_with_import_options_but_no_import_say_how_it_is_used(ranked, capsys):
    root, session = ranked
    labels = str(root / "pool" / "labels")
    usage = "usage: asfda labels SESSION | asfda labels import SESSION --from DIR_OR_FILE"
    assert usage in _usage_error(["labels", "import"], capsys)
    before = (session / "session.json").read_text()
    err = _usage_error(["labels", str(session), "--from", labels], capsys)  # "import" forgotten
    assert f"are for importing: 'asfda labels import {session} ...'" in err
    assert "needs --from DIR_OR_FILE" in _usage_error(["labels", "import", str(session)], capsys)
    err = _usage_error(["labels", str(session), "import", "--from", labels], capsys)  # the action after the session
    assert f"'import' comes first: 'asfda labels import {session} ...'" in err
    assert "give --all or --cases, not both" in _usage_error(
        ["labels", "import", str(session), "--from", labels, "--all", "--cases", "a"], capsys
    )
    assert (session / "session.json").read_text() == before


def test_arguments_in_another_order_are_taken_or_named_with_the_order_that_works(ranked, tmp_path, capsys):
    root, template = ranked
    session = tmp_path / "s"
    shutil.copytree(template, session)
    labels = root / "pool" / "labels"
    assert main(["labels", "import", "--from", str(labels), str(session)]) == 0  # the session after the option
    assert main(["labels", "import", str(labels), "--from", str(session)]) == 1
    said = _one_line_error(capsys)
    assert (
        f"{session} is the session and {labels} the labels, the wrong way round: 'asfda labels import {session}" in said
    )
    for given in (root / "pool" / "images", root / "pool"):  # a dataset folder: its images/ is named
        with pytest.raises(SystemExit):
            main(["rank", str(given)])
        assert f"give scans as --images {root / 'pool' / 'images'}" in capsys.readouterr().err
    pool = root / "pool"
    for argv, said in (
        (
            ["predict", str(pool)],
            f"{pool} holds scans, not a session: asfda predict SESSION --images {pool / 'images'}",
        ),
        (
            ["stats", str(pool / "images"), "--out", "s.npz"],
            f"give the source-domain scans as --images {pool / 'images'}",
        ),
    ):
        with pytest.raises(SystemExit):
            main(argv)  # argparse alone would say "required: --images", with no word of the folder given
        assert said in " ".join(capsys.readouterr().err.split())
    # asked only where argparse found --images missing: its own forms of it are taken as they always were
    assert main(["predict", str(template), f"--images={pool / 'images'}", "--out", str(tmp_path / "p")]) == 0


def test_a_bundle_given_where_a_session_goes_is_named_as_a_model(tmp_path, capsys):
    (tmp_path / "bundle" / "configs").mkdir(parents=True)
    (tmp_path / "bundle" / "models").mkdir()
    assert main(["export", str(tmp_path / "bundle"), "--out", str(tmp_path / "x.ts"), "--format", "torchscript"]) == 1
    assert "it is a MONAI bundle (a model), not a session" in _one_line_error(capsys)


def test_evaluate_names_the_map_the_session_imported_these_references_with_when_none_is_given(ranked, tmp_path, capsys):
    """Labels whose values are the model's indices, but of other classes (liver and kidney swapped), imported with
    --map: evaluating against the same files without it compares other classes, and is said so, with the map."""
    from ASFDALib.data.volumes import read_volume, write_nifti

    root, template = ranked
    session = tmp_path / "s"
    shutil.copytree(template, session)
    gt = tmp_path / "gt"
    gt.mkdir()
    for label in sorted((root / "pool" / "labels").iterdir()):
        volume = read_volume(label, allow_constant=True)
        swapped = volume.array.copy()
        swapped[volume.array == 1], swapped[volume.array == 2] = 2, 1
        write_nifti(gt / label.name, swapped, volume.affine)
    assert main(["labels", "import", str(session), "--from", str(gt), "--map", "1=2,2=1"]) == 0
    capsys.readouterr()
    args = ["evaluate", "--pred", str(root / "pool" / "labels"), "--labels", str(gt), "--session", str(session)]
    assert main([*args, "--out", str(tmp_path / "e.csv")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "2 reference file(s) here" in said and "with --map 2=1,1=2: their values are not this model's" in said
    assert main([*args, "--out", str(tmp_path / "e2.csv"), "--map", "1=2,2=1"]) == 0
    assert "reference file(s) here" not in " ".join(capsys.readouterr().out.split())


def test_labels_of_volumes_not_asked_for_are_skipped_and_a_class_the_model_lacks_is_mapped_to_background(
    ranked, tmp_path, capsys
):
    """All six pool labels carry a value (4) that is no class of the card; two volumes were queried: those two
    are refused, the other four skipped, with the problem they would have when asked for."""
    from ASFDALib.data.volumes import read_volume, write_nifti

    root, template = ranked
    session = tmp_path / "s"
    shutil.copytree(template, session)
    query = json.loads((session / "ranking.json").read_text())["selected"]
    gt = tmp_path / "gt"
    gt.mkdir()
    for label in sorted((root / "pool" / "labels").iterdir()):
        volume = read_volume(label, allow_constant=True)
        values = volume.array.copy()
        values[0, 0, 0] = 4
        write_nifti(gt / label.name, values, volume.affine)
    assert main(["labels", "import", str(session), "--from", str(gt)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "Imported 0 of 2 queried volumes; skipped 4 (not asked for, or of no image), refused 2." in out
    unknown = "label values [4] are not classes of the model (0=background, 1=liver, 2=kidney, 3=gallbladder)"
    for name in query:
        assert (
            f"refused {gt / name}: {unknown} (give a mapping, e.g. --map 4=0 to make them background, "
            "or 4=1 if they are liver)" in out
        )
    for name in sorted({p.name for p in gt.iterdir()} - set(query)):
        assert (
            f"skipped {gt / name}: image {name} was not asked for (no round has queried it); import it with "
            f"--cases; as it is, it would be refused: {unknown}" in out
        )
    assert main(["labels", "import", str(session), "--from", str(gt), "--map", "4=0"]) == 0
    said = capsys.readouterr().out
    assert "Imported 2 of 2 queried volumes; skipped 4 (not asked for, or of no image), refused 0." in said
    # what the numbers were read as, so a label set numbered otherwise shows at once
    assert "label values read as the model's classes: 1=liver, 2=kidney, 3=gallbladder (after --map)" in said
    other = sorted({p.name for p in gt.iterdir()} - set(query))
    assert main(["labels", "import", str(session), "--from", str(gt), "--map", "4=0", "--cases", other[0]]) == 0
    hint = f"skipped {gt / other[1]}: image {other[1]} was not asked for (not among --cases); add it to --cases"
    assert hint in " ".join(capsys.readouterr().out.split())


def test_a_card_that_does_not_fit_the_model_is_refused_before_scoring_and_leaves_no_session(
    default_model, mri_pool, tmp_path, capsys
):
    """A TorchScript model's class count shows only when it runs: one probe window, before any volume."""
    import torch

    model = tmp_path / "net.ts"
    torch.jit.script(default_model.network.cpu().eval()).save(str(model))
    card = json.loads(open(CARD).read())
    card["class_names"] = card["class_names"][:3]
    (tmp_path / "net.card.json").write_text(json.dumps(card))
    session = tmp_path / "s"
    args = ["rank", "--model", str(model), "--trust", "--images", str(mri_pool / "images"), "--out", str(session)]
    assert main(args) == 1
    err = " ".join(_one_line_error(capsys).split())
    assert "net.ts: the network outputs 4 channels but its card lists 3 classes" in err
    assert "give the card that belongs to this model, with 4 class names" in err
    assert not session.exists()


def test_a_window_the_network_cannot_take_is_refused_in_one_line_and_leaves_no_session(mri_pool, tmp_path, capsys):
    """SwinUNETR's patch merging needs 64 voxels an axis or more: a card's 32³ window fails in the probe."""
    import torch
    from monai.networks.nets import SwinUNETR

    args = {"in_channels": 1, "out_channels": 4, "feature_size": 12, "spatial_dims": 3}
    model = tmp_path / "swin.pt"
    torch.save(SwinUNETR(**args).state_dict(), model)
    card = json.loads(open(CARD).read())
    card.update(roi_size=[32, 32, 32], network={"name": "SwinUNETR", "args": args})
    (tmp_path / "swin.card.json").write_text(json.dumps(card))
    session = tmp_path / "s"
    assert main(["rank", "--model", str(model), "--images", str(mri_pool / "images"), "--out", str(session)]) == 1
    err = " ".join(_one_line_error(capsys).split())
    assert "swin.pt: a window of the card's roi_size [32, 32, 32] does not run through the network" in err
    assert "SwinUNETR: a multiple of 32 and at least 64 per axis" in err
    assert not session.exists()


def test_long_commands_print_plain_progress_lines_when_stdout_is_not_a_terminal(mri_pool, tmp_path, capsys):
    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(tmp_path / "s")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Scoring ")]
    assert lines[0].startswith("Scoring 0/6 volumes (0%), elapsed")
    assert lines[-1].startswith("Scoring 6/6 volumes (100%), elapsed")


def test_staged_work_logs_each_new_stage_at_once_and_within_a_stage_a_line_at_most_every_10_s():
    from rich.console import Console

    from ASFDALib.app.progress import PlainProgress

    log, now = io.StringIO(), [0.0]
    plain = PlainProgress(Console(file=log, width=200), "Demo", "", clock=lambda: now[0])
    for t, stage, fraction, detail in (
        (0.0, "generating", 0.0, ""),
        (2.0, "ranking", 0.1, ""),  # a new stage 2 s later: printed
        (3.0, "ranking", 0.12, "volume 1/6"),  # the same stage within 10 s: held back
        (12.5, "ranking", 0.18, "volume 5/6"),
        (13.0, "fine-tuning", 0.3, ""),
        (14.0, "done", 1.0, ""),
    ):
        now[0] = t
        plain.stage(stage, fraction, detail)
    assert log.getvalue().splitlines() == [
        "Demo 0% generating, elapsed 0:00:00",
        "Demo 10% ranking, elapsed 0:00:02",
        "Demo 18% ranking; volume 5/6, elapsed 0:00:12",
        "Demo 30% fine-tuning, elapsed 0:00:13",
        "Demo 100% done, elapsed 0:00:14",
    ]


def test_the_demo_progress_is_plain_lines_in_a_log_file_and_a_live_bar_in_a_terminal():
    from rich.console import Console
    from rich.progress import Progress

    from ASFDALib.app.progress import PlainProgress, stage_progress

    log = io.StringIO()
    display, update = stage_progress(Console(file=log, width=200), "Demo")
    with display:
        update("ranking the pool", 0.1, "volume 0/6")
    assert isinstance(display, PlainProgress)
    assert log.getvalue() == "Demo 10% ranking the pool; volume 0/6, elapsed 0:00:00\n"
    display, _ = stage_progress(Console(file=io.StringIO(), force_terminal=True), "Demo")
    assert isinstance(display, Progress)


def test_the_help_shows_the_workflow_and_every_option_says_what_it_does():
    parser = build_parser()
    text = parser.format_help()
    steps = ["asfda rank", "asfda labels import", "asfda finetune", "asfda predict", "asfda export"]
    positions = [text.index(step) for step in steps]
    assert positions == sorted(positions)
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("predict", "export", "evaluate", "finetune"):
        for action in sub.choices[name]._actions:
            assert action.help, f"asfda {name} {action.option_strings or action.dest} has no help"
    lr = next(a for a in sub.choices["finetune"]._actions if a.dest == "lr")
    assert "default: 0.003; --resume keeps the run's own" in lr.help and "0.3x" in lr.help


def test_a_misspelt_option_is_refused_by_its_command_pointing_to_that_commands_help(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "--pred", str(tmp_path), "--labels", str(tmp_path), "--sesion", "s"])
    assert stop.value.code == 2
    assert _one_line_error(capsys) == (
        "asfda evaluate: error: unrecognized arguments: --sesion s (see 'asfda evaluate --help')"
    )


def test_the_ranking_table_explains_each_pick_in_80_columns_without_cutting_a_number(mri_pool, tmp_path):
    from rich.console import Console

    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.loading import load_model
    from ASFDALib.query.ranking import RankConfig, rank_folder
    from ASFDALib.query.report import ranking_table

    ranking = rank_folder(mri_pool / "images", load_model(default_model_path()), tmp_path / "c", RankConfig())
    console = Console(width=80, record=True, color_system=None)
    console.print(ranking_table(ranking))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for row in ranking.rows:
        for value in (row.pick_score, row.knowledge_gap, row.diversity, row.asd):
            assert f"{value:.3f}" in text
        assert f"{row.foreground_ml:.1f}" in text
    assert "the first pick's DKD (gap x div)" in " ".join(text.split())  # the default gap-first fusion
    # with a volume labelled, gap-first gates every pick, the first too: the caption says that formula
    labelled = {ranking.rows[0].file}
    again = rank_folder(mri_pool / "images", load_model(default_model_path()), tmp_path / "c", RankConfig(), None,
                        labelled)  # fmt: skip
    console.print(ranking_table(again))
    text = " ".join(console.export_text().split())
    assert "score = div x (a*pct(gap) + (1-a)*pct(ASD))" in text and "first pick's DKD" not in text


def _ranked_table_at_80_columns(images, cache):
    """The ranking of ``images`` and its table as an 80-column terminal without colour shows it."""
    from rich.console import Console

    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.loading import load_model
    from ASFDALib.query.ranking import RankConfig, rank_folder
    from ASFDALib.query.report import ranking_table

    ranking = rank_folder(images, load_model(default_model_path()), cache, RankConfig())
    console = Console(width=80, record=True, color_system=None)
    console.print(ranking_table(ranking))
    return ranking, console.export_text()


def test_skipped_files_are_listed_below_the_ranking_table_which_keeps_names_and_numbers_whole(mri_pool, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(mri_pool / "images", images)
    whole = (images / "mri_000.nii.gz").read_bytes()
    (images / "mri_truncated_in_transfer.nii.gz").write_bytes(whole[: len(whole) // 10])
    (images / "notes.nii.gz").write_text("not a volume")
    ranking, text = _ranked_table_at_80_columns(images, tmp_path / "c")
    assert {r.file for r in ranking.skipped} == {"mri_truncated_in_transfer.nii.gz", "notes.nii.gz"}
    assert max(len(line) for line in text.splitlines()) <= 80
    table, below = text.split("every column in ranking.csv")
    for row in ranking.rows:
        if row.status == "scored":
            assert f" {row.file} " in table
            for value in (row.pick_score, row.knowledge_gap, row.diversity, row.asd):
                assert f" {value:.3f} " in table
    flat = " ".join(below.split())
    assert "skipped mri_truncated_in_transfer.nii.gz: unreadable or corrupt" in flat
    assert "skipped notes.nii.gz: unreadable or corrupt" in flat
    assert "skipped" not in table


def test_a_file_name_too_long_for_80_columns_folds_whole_after_its_separators(mri_pool, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(mri_pool / "images", images)
    long_name = "sub-0001_ses-01_T1w_abdomen_axial_fat_suppressed.nii.gz"
    (images / "mri_000.nii.gz").rename(images / long_name)
    ranking, text = _ranked_table_at_80_columns(images, tmp_path / "c")
    assert max(len(line) for line in text.splitlines()) <= 80
    file_cells = [line.split("│")[2].strip() for line in text.splitlines() if line.count("│") == 9]
    assert long_name in "".join(file_cells)
    start = next(i for i, cell in enumerate(file_cells) if cell.startswith("sub-"))
    folded = []
    while "".join(folded) != long_name:
        folded.append(file_cells[start + len(folded)])
    assert len(folded) > 1 and all(line[-1] in "_-." for line in folded[:-1])  # never mid-word: each part fits
    row = next(r for r in ranking.rows if r.file == long_name)
    assert f" {row.pick_score:.3f} " in text and f" {row.foreground_ml:.1f} " in text


def test_outputs_inside_a_session_folder_or_over_an_existing_export_are_refused_before_work(ranked, capsys, tmp_path):
    root, session = ranked
    images = root / "pool" / "images"
    assert main(["predict", str(session), "--images", str(images), "--out", str(session / "labels")]) == 1
    assert "is inside the session folder" in _one_line_error(capsys)
    labels = root / "pool" / "labels"
    shutil.copytree(labels, tmp_path / "as_pred")
    pred = tmp_path / "as_pred"
    out = session / "session.json"
    before = content_hash(out)
    assert main(["evaluate", "--pred", str(pred), "--labels", str(labels), "--out", str(out)]) == 1
    assert "is inside the session folder" in _one_line_error(capsys)
    assert content_hash(out) == before
    assert main(["evaluate", "--pred", str(pred), "--labels", str(labels), "--out", str(images)]) == 1
    assert "is a folder; give --out a file name" in _one_line_error(capsys)
    existing = tmp_path / "existing_bundle"
    existing.mkdir()
    (existing / "keep.txt").write_text("someone's work")
    assert main(["export", str(session), "--out", str(existing), "--source-model"]) == 1
    assert "a folder with files in it already exists" in _one_line_error(capsys)
    assert (existing / "keep.txt").read_text() == "someone's work"


def test_network_args_without_a_network_is_an_argument_error(mri_pool, tmp_path, capsys):
    """Exit 2, as every argument that does not parse (README: 'malformed --network-args: one line, exit 2')."""
    args = ["rank", "--images", str(mri_pool / "images"), "--out", str(tmp_path / "s")]
    with pytest.raises(SystemExit) as exited:
        main([*args, "--network-args", '{"channels": [8]}'])
    assert exited.value.code == 2
    assert "asfda rank: error: --network-args needs --network NAME" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_refused_restart_changes_nothing_and_ctrl_c_records_what_the_checkpoint_holds(ranked, tmp_path, capsys):
    """A --restart refused for memory leaves the finished run where it was; a Ctrl-C in the middle of a
    run records the iterations its newest checkpoint holds, as an interrupted run that --resume continues."""
    import threading

    from ASFDALib.adaptation.pipeline import finetune_session
    from ASFDALib.adaptation.recipe import FinetuneConfig
    from ASFDALib.adaptation.runs import read_run
    from ASFDALib.adaptation.session import Session

    root, template = ranked
    session = tmp_path / "s"
    shutil.copytree(template, session)
    query = json.loads((session / "ranking.json").read_text())["selected"][0]
    (tmp_path / "gt").mkdir()
    shutil.copy(root / "pool" / "labels" / query, tmp_path / "gt" / query)
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt")]) == 0
    base = ["finetune", str(session), "--no-pseudo", "--checkpoint-every", "2", "--batch-size", "1"]
    assert main([*base, "--iterations", "2"]) == 0
    capsys.readouterr()
    assert main([*base, "--iterations", "2", "--restart", "--batch-size", "100000"]) == 1
    assert "use --batch-size" in _one_line_error(capsys)
    assert (session / "checkpoints" / "round1" / "final.pt").is_file()
    assert not (session / "checkpoints" / "round1-replaced-1").exists()
    assert Session.open(session).rounds[-1]["metrics"]["iterations"] == {"stage1": 2, "stage2": 0}

    def interrupt(p) -> None:
        if p.iteration == 5:
            raise KeyboardInterrupt

    config = FinetuneConfig(iterations=8, pseudo_iterations=0, batch_size=1, checkpoint_every=2, device="cpu")
    with Session.open(session) as s, pytest.raises(KeyboardInterrupt):
        finetune_session(s, config, False, "restart", threading.Event(), interrupt)
    run = read_run(session / "checkpoints" / "round1")
    assert run["done"]["stage1"] == 4 and not run["finished"]  # the checkpoint at 4; iteration 5 is lost
    assert run["history"][-1]["status"] == "interrupted" and run["history"][-1]["stage1"] == [0, 4]
    assert Session.open(session).rounds[-1]["replaced"][0]["iterations"] == {"stage1": 2, "stage2": 0}
    assert main([*base, "--resume"]) == 0
    assert Session.open(session).rounds[-1]["metrics"]["iterations"] == {"stage1": 8, "stage2": 0}


def test_a_long_class_list_is_shortened_to_one_line():
    from ASFDALib.app.commands import _names

    assert _names(["liver", "kidney"]) == "liver, kidney"
    assert _names([f"c{i}" for i in range(1, 200)]) == "c1, c2, c3, c4, c5, c6, c7, c8 and 191 more"


def test_a_second_predict_into_the_folder_keeps_the_record_of_the_maps_it_did_not_replace(ranked, tmp_path):
    root, session = ranked
    images = root / "pool" / "images"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    names = sorted(p.name for p in images.iterdir())
    for name in names[:2]:
        shutil.copy(images / name, first / name)
    shutil.copy(images / names[2], second / names[2])
    out = tmp_path / "pred"
    assert main(["predict", str(session), "--images", str(first), "--out", str(out)]) == 0
    assert main(["predict", str(session), "--images", str(second), "--out", str(out)]) == 0
    manifest = json.loads((out / "asfda_predictions.json").read_text())
    assert len(manifest["files"]) == len(manifest["made_by"]) == 3
    assert {m["model"] for m in manifest["made_by"].values()} == {"source"}  # this session is not fine-tuned


def test_phantoms_never_replace_a_volume_and_say_so_before_writing_any(tmp_path, capsys):
    """A pool a session ranks may be where phantoms are asked for: a second run into it is refused, whole."""
    assert main(["phantoms", "--count", "2", "--out", str(tmp_path)]) == 0
    # what the label values are, for the card a benchmark on these folders needs
    assert "(1 liver, 2 kidney, 3 gallbladder)" in capsys.readouterr().out
    before = {p: content_hash(p) for p in tmp_path.rglob("*.nii.gz")}
    assert main(["phantoms", "--count", "3", "--seed", "5", "--out", str(tmp_path)]) == 1
    said = _one_line_error(capsys)
    assert f"{tmp_path / 'images' / 'mri_000.nii.gz'}: already exists (4 of the files to write do)" in said
    assert "choose a new folder" in said
    assert {p: content_hash(p) for p in tmp_path.rglob("*.nii.gz")} == before  # not even mri_002 was added
    assert main(["phantoms", "--domain", "ct", "--count", "1", "--out", str(tmp_path)]) == 0  # other names: beside


@pytest.mark.parametrize("printer", ["plain print", "rich console"])
def test_a_command_whose_output_reader_left_stops_quietly_as_a_unix_tool_does(tmp_path, printer):
    """`asfda evaluate ... | head -1`: the reader closes the pipe; no traceback, the SIGPIPE status (141), whether
    the command prints plainly (phantoms) or through rich's console (evaluate), which handles it its own way."""
    if printer == "plain print":
        argv = ["phantoms", "--out", str(tmp_path / "p")]
    else:
        assert main(["phantoms", "--count", "1", "--out", str(tmp_path / "p")]) == 0
        labels = str(tmp_path / "p" / "labels")
        shutil.copytree(labels, tmp_path / "as_pred")  # the labels as predictions, in a folder of their own
        card = "Resources/Model/asfda_default.card.json"
        pred = str(tmp_path / "as_pred")
        argv = ["evaluate", "--pred", pred, "--labels", labels, "--card", card, "--out", str(tmp_path / "e.csv")]
    code = f"import sys; from ASFDALib.app.cli import main; sys.exit(main({argv!r}))"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader leaves before a line is written
    assert process.wait(timeout=120) == 141
    assert process.stderr.read().decode() == ""
    if printer == "rich console":  # its table file is written before the terminal's output, which the pipe cut
        assert (tmp_path / "e.csv").is_file()


def test_an_hd95_mean_over_fewer_cases_than_the_dice_says_over_how_many(tmp_path, capsys):
    """A class the map misses in a case has no surface distance: its HD95 mean is over the other cases, and the
    table says so rather than passing one case's distance off as the mean of all."""
    import numpy as np

    from ASFDALib.data.volumes import write_nifti

    (tmp_path / "pred").mkdir(), (tmp_path / "ref").mkdir()
    reference = np.zeros((16, 16, 16), np.uint8)
    reference[4:12, 4:12, 4:12] = 1  # liver in both cases
    for case, found in (("a.nii.gz", True), ("b.nii.gz", False)):
        write_nifti(tmp_path / "ref" / case, reference, np.eye(4))
        write_nifti(tmp_path / "pred" / case, reference if found else np.zeros_like(reference), np.eye(4))
    for folder in ("ref", "pred"):  # a case without the organ at all: in neither mean, so not in the count
        write_nifti(tmp_path / folder / "c.nii.gz", np.zeros_like(reference), np.eye(4))
    card = "Resources/Model/asfda_default.card.json"
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--labels", str(tmp_path / "ref"), "--card", card]
    assert main(args) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "│ liver │ 0.500 │ 0.000 (1 of 2) │" in said
    assert "│ kidney │ │ │" in said  # in no case: neither a Dice nor a distance, and no count
    assert "HD95 (n of N): over the n cases where both the map and the reference hold the class" in said


def test_the_command_line_parses_and_teaches_without_loading_the_network_libraries():
    """`asfda --help`, a subcommand's help and an argument error answer at once: building the parser reads only
    the light modules of defaults and choices, never torch or MONAI (which take seconds to load)."""

    code = (
        "import sys; from ASFDALib.app.cli import build_parser; build_parser(); "
        "print(' '.join(m for m in ('torch', 'monai', 'nibabel', 'numpy') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == ""


def test_a_command_a_message_suggests_for_a_path_with_a_space_runs_as_copied(tmp_path, capsys):
    """'asfda labels import my session --from ...' would be two arguments: the path goes in double quotes."""
    import shlex

    from ASFDALib.errors import as_arg

    assert as_arg("/data/pool") == "/data/pool"  # nothing a shell reads: as it is
    for path in ("my session", 'a"b c', "/data/run$1/s", "it's here"):  # each comes back whole through a shell
        assert shlex.split(f"asfda finetune {as_arg(path)}")[2] == path
    assert main(["phantoms", "--count", "2", "--out", str(tmp_path / "my scans")]) == 0
    session = tmp_path / "my session"
    images = tmp_path / "my scans" / "images"
    assert main(["rank", "--images", str(images), "--out", str(session), "--budget", "1"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"'asfda labels import {as_arg(session)} --from LABEL_DIR' and 'asfda finetune {as_arg(session)}'" in said


def test_an_interrupted_first_rank_resumes_with_the_same_command(ranked, tmp_path, monkeypatch, capsys):
    """Ctrl-C, a scheduler's time limit or `| head` during the first rank leaves the score cache and no
    session.json: the same command goes on from the cache, as its interruption message says."""
    from ASFDALib.app import commands

    root, _ = ranked
    session, argv = tmp_path / "s", ["rank", "--images", str(root / "pool" / "images"), "--budget", "1"]
    made = commands.volume_progress

    def stopped_at_the_third(console, label, unit="volumes"):
        bar, update = made(console, label, unit)

        def stop(done, total, name):
            if done == 3:
                raise KeyboardInterrupt
            update(done, total, name)

        return bar, stop

    monkeypatch.setattr(commands, "volume_progress", stopped_at_the_third)
    assert main([*argv, "--out", str(session)]) == 130
    assert "finished volumes are cached and a re-run resumes" in capsys.readouterr().err
    assert not (session / "session.json").exists() and len(list((session / "cache").glob("*.npz"))) == 3
    monkeypatch.setattr(commands, "volume_progress", made)
    assert main([*argv, "--out", str(session)]) == 0
    assert "6 volumes swept (3 from cache)" in " ".join(capsys.readouterr().out.split())


def test_a_first_rank_stopped_after_its_ranking_files_resumes_with_the_same_command(
    ranked, tmp_path, monkeypatch, capsys
):
    """Stopped between writing ranking.csv/json and session.json (Ctrl-C, SIGKILL), a first rank leaves its
    ranking files beside its cache: the same command goes on from them, as its message says, not refusing them
    as another's files."""
    from ASFDALib.adaptation import rounds

    root, _ = ranked
    session, argv = tmp_path / "s", ["rank", "--images", str(root / "pool" / "images"), "--budget", "1"]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rounds, "record_round", stopped)
    assert main([*argv, "--out", str(session)]) == 130
    assert "a re-run resumes from there" in capsys.readouterr().err
    assert (session / "ranking.csv").is_file() and not (session / "session.json").exists()
    monkeypatch.undo()
    assert main([*argv, "--out", str(session)]) == 0
    assert "6 volumes swept (6 from cache)" in " ".join(capsys.readouterr().out.split())
    assert json.loads((session / "session.json").read_text())["rounds"][0]["query"]
    (tmp_path / "notes").mkdir()  # a ranking.csv of someone's own, in a folder no rank has been into, stays refused
    (tmp_path / "notes" / "ranking.csv").write_text("mine")
    assert main([*argv, "--out", str(tmp_path / "notes")]) == 1
    assert "ranking.csv: exists" in _one_line_error(capsys)


def test_a_later_round_rank_stopped_after_its_ranking_files_is_not_the_sessions_query_until_the_same_command_records_it(
    ranked, tmp_path, monkeypatch, capsys
):
    """Round 2's rank stopped between its ranking files and session.json (Ctrl-C, SIGKILL): the labels status, a
    labels import and the panel hold to the query session.json records, saying how to go on; the same command then
    records the round its files show, and keeps a copy of them as that round's."""
    from ASFDALib.adaptation import rounds
    from ASFDALib.app.workflow import PanelSettings, Workflow

    root, template = ranked
    session = tmp_path / "s"
    shutil.copytree(template, session)
    first = json.loads((session / "session.json").read_text())["rounds"][0]["query"]
    assert main(["labels", "import", str(session), "--from", str(root / "pool" / "labels")]) == 0
    finetune = ["finetune", str(session), "--iterations", "2", "--no-pseudo", "--batch-size", "1"]
    assert main(finetune) == 0
    argv = ["rank", "--out", str(session), "--budget", "2"]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rounds, "record_round", stopped)
    assert main(argv) == 130
    monkeypatch.undo()
    shown = json.loads((session / "ranking.json").read_text())["selected"]
    recorded = json.loads((session / "session.json").read_text())["rounds"]
    assert len(shown) == 2 and not set(shown) & set(first) and [r["query"] for r in recorded] == [first]
    capsys.readouterr()
    assert main(["labels", str(session)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"ranking.json shows a query session.json does not record ({', '.join(shown)})" in said
    assert f"'asfda rank --out {session}' again records it" in said
    gt = tmp_path / "gt"
    gt.mkdir()
    shutil.copy(root / "pool" / "labels" / shown[0], gt / shown[0])
    assert main(["labels", "import", str(session), "--from", str(gt)]) == 1
    said = " ".join(capsys.readouterr().out.split())
    assert f"image {shown[0]} was not asked for (a rank stopped before session.json recorded its query" in said
    assert shown[0] not in json.loads((session / "session.json").read_text())["labels"]
    panel = Workflow(PanelSettings(session=str(session)))
    assert panel.reopen()
    assert panel.query == first and {r.case for r in panel.rows if r.selected} == set(first)  # round 1's own
    assert main(argv) == 0
    data = json.loads((session / "session.json").read_text())
    assert [r["query"] for r in data["rounds"]] == [first, shown]
    assert json.loads((session / "ranking.json").read_text())["selected"] == shown
    for name in ("ranking.csv", "ranking.json"):
        assert content_hash(session / "rankings" / "round2" / name) == content_hash(session / name)
    assert json.loads((session / "rankings" / "round1" / "ranking.json").read_text())["selected"] == first
    capsys.readouterr()
    assert main(["labels", str(session)]) == 0
    assert "does not record" not in capsys.readouterr().out


def test_a_first_rank_refused_by_a_rank_beside_it_leaves_that_ranks_folder_and_lock(
    ranked, tmp_path, monkeypatch, capsys
):
    """Two first ranks into one new folder: the one the lock refuses removes nothing (it made nothing there): the
    other's score cache and lock file stay, so a third command is refused too, not let in beside it."""
    from ASFDALib.adaptation.session import LOCK_FILE, Session
    from ASFDALib.app import commands

    root, _ = ranked
    session = tmp_path / "s"
    other = Session(session)
    made = commands._rank

    def beside(*args, **kwargs):  # the other rank starts after this one looked at the folder (none yet)
        other.lock()
        (session / "cache").mkdir()
        (session / "cache" / "index.json").write_text("{}")
        return made(*args, **kwargs)

    monkeypatch.setattr(commands, "_rank", beside)
    try:
        assert main(["rank", "--images", str(root / "pool" / "images"), "--out", str(session)]) == 1
        assert "session is held by another Session object of this very process" in _one_line_error(capsys)
        assert (session / LOCK_FILE).is_file() and (session / "cache" / "index.json").is_file()
        monkeypatch.undo()
        assert main(["rank", "--images", str(root / "pool" / "images"), "--out", str(session)]) == 1
        assert "session is held by" in _one_line_error(capsys)
    finally:
        other.unlock()


def test_a_first_rank_where_no_volume_scores_leaves_nothing_behind(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "empty.nii.gz").write_bytes(b"")
    (scans / "notes.nii.gz").write_text("not an image")
    assert main(["rank", "--images", str(scans), "--out", str(tmp_path / "s")]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "No volume could be scored" in out and "Nothing kept in" in out and "Wrote" not in out
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("recursive", [[], ["--recursive"]])
def test_a_session_folder_given_as_the_scans_is_named_as_one(ranked, tmp_path, capsys, recursive):
    """With --recursive too: the walk would reach the session's label versions, which rank refused only after
    scoring them as label maps and predict answered with an empty manifest."""
    pool, root, session = ranked[0] / "pool", tmp_path, tmp_path / "session"
    shutil.copytree(ranked[1], session)
    assert main(["labels", "import", str(session), "--from", str(pool / "labels")]) == 0
    assert list((session / "labels").iterdir())
    assert main(["rank", "--images", str(session), *recursive, "--out", str(root / "elsewhere")]) == 1
    err = _one_line_error(capsys)
    assert err.endswith("DICOM folders); it is an ASFDA session: give --images the scans' folder")
    assert main(["predict", str(session), "--images", str(session), *recursive, "--out", str(root / "maps")]) == 1
    # predict's refusal is the same line (volumes.no_volumes_message), after its own command's name
    assert _one_line_error(capsys) == err.replace("asfda rank:", "asfda predict:")
    assert not (root / "elsewhere").exists() and not (root / "maps").exists()


def test_export_never_writes_among_the_sessions_scans(ranked, capsys):
    root, session = ranked
    images = root / "pool" / "images"
    before = _digests(images)
    target = images / "model.pt2"
    assert main(["export", str(session), "--source-model", "--format", "pt2", "--out", str(target)]) == 1
    assert f"{target}: is inside the session's images folder" in _one_line_error(capsys)
    assert _digests(images) == before


def test_a_first_rank_into_the_scans_own_folder_is_refused(ranked, tmp_path, capsys):
    """`asfda rank --out scans` (--images forgotten) wrote the demo's sample data and a session among the scans."""
    root, _ = ranked
    scans = root / "pool" / "images"
    before = sorted(p.name for p in scans.iterdir())
    assert main(["rank", "--out", str(scans)]) == 1
    said = _one_line_error(capsys)
    assert f"{scans}: holds 6 volume file(s)" in said and f"give --images {scans} --out a new folder" in said
    assert sorted(p.name for p in scans.iterdir()) == before
    labels = root / "pool" / "labels"  # a clinician's labels: no scans to name as --images
    assert main(["rank", "--out", str(labels)]) == 1
    said = _one_line_error(capsys)
    assert f"{labels}: holds 6 label map(s)" in said and "; give --out a new folder" in said


def test_a_first_rank_never_writes_into_a_folder_holding_files_a_session_would_write(ranked, tmp_path, capsys):
    """A folder of notes named ranking.csv, or a dataset whose labels/ the session's label versions would join."""
    root, _ = ranked
    notes = tmp_path / "u"
    notes.mkdir()
    (notes / "ranking.csv").write_text("my notes")
    assert main(["rank", "--images", str(root / "pool" / "images"), "--out", str(notes), "--budget", "1"]) == 1
    assert f"{notes / 'ranking.csv'}: exists, and {notes} is no session" in _one_line_error(capsys)
    assert (notes / "ranking.csv").read_text() == "my notes" and not (notes / "session.json").exists()
    assert main(["rank", "--images", str(root / "pool" / "images"), "--out", str(root / "pool"), "--budget", "1"]) == 1
    assert f"{root / 'pool' / 'labels'}: exists" in _one_line_error(capsys)


def test_labels_import_counts_only_readable_volumes_as_left_for_pseudo_labels(tmp_path, capsys):
    """An empty or 4D file of the pool can never be pseudo-labelled: counted, it promised volumes finetune lacked."""
    from ASFDALib.bench.phantoms import write_phantoms

    write_phantoms(tmp_path / "pool", 3, "mri", seed=2)
    (tmp_path / "pool" / "images" / "empty.nii.gz").write_bytes(b"")
    session = tmp_path / "s"
    assert main(["rank", "--images", str(tmp_path / "pool" / "images"), "--out", str(session), "--budget", "1"]) == 0
    assert json.loads((session / "session.json").read_text())["images"]["unreadable"] == ["empty.nii.gz"]
    capsys.readouterr()
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "pool" / "labels")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "2 of 4 volumes stay unlabeled for pseudo-labels (1 unreadable left out: see 'asfda rank')" in said


def test_a_session_follows_its_model_to_another_install_or_folder(ranked, tmp_path, capsys):
    """A colleague's copy, a reinstall, a renamed models folder: the same model file at another path."""
    from ASFDALib.models.defaults import default_model_path

    root, template = ranked
    images = root / "pool" / "images"
    session = tmp_path / "s"
    shutil.copytree(template, session)
    data = json.loads((session / "session.json").read_text())
    data["model"]["path"] = "/old/install/Resources/Model/asfda_default.pt"  # the built-in model, installed elsewhere
    (session / "session.json").write_text(json.dumps(data))
    assert main(["predict", str(session), "--images", str(images), "--out", str(tmp_path / "p1")]) == 0
    # a model of one's own, whose folder was renamed after the session started
    models = tmp_path / "models"
    models.mkdir()
    for part in default_model_path().parent.iterdir():
        shutil.copy(part, models / part.name.replace("asfda_default", "mine"))
    own = tmp_path / "own"
    argv = ["rank", "--images", str(images), "--budget", "1", "--model", str(models / "mine.pt")]
    assert main([*argv, "--out", str(own)]) == 0
    models.rename(tmp_path / "models2")
    capsys.readouterr()
    assert main(["rank", "--out", str(own)]) == 1
    said = _one_line_error(capsys)
    assert f"{models / 'mine.pt'}: the model this session started with is not there" in said
    assert f"'asfda rank --out {own} --model NEW_PATH'" in said
    # a predict refused as the model loads leaves no --out behind (its claim waits for the model)
    assert main(["predict", str(own), "--images", str(images), "--out", str(tmp_path / "never")]) == 1
    assert "the model this session started with is not there" in _one_line_error(capsys)
    assert not (tmp_path / "never").exists()
    assert main(["rank", "--out", str(own), "--model", str(tmp_path / "models2" / "mine.pt")]) == 0
    recorded = json.loads((own / "session.json").read_text())["model"]["path"]
    assert recorded == str((tmp_path / "models2" / "mine.pt").resolve())
    assert main(["predict", str(own), "--images", str(images), "--out", str(tmp_path / "p2")]) == 0


def test_a_label_file_deleted_by_hand_is_named_and_training_waits_for_it(ranked, tmp_path, capsys):
    """Training without it (or on an older version) would not be what session.json records."""
    root, template = ranked
    session = tmp_path / "s"
    shutil.copytree(template, session)
    assert main(["labels", "import", str(session), "--from", str(root / "pool" / "labels")]) == 0
    labels = json.loads((session / "session.json").read_text())["labels"]
    name = sorted(labels)[0]
    stored = session / labels[name][-1]["file"]
    stored.unlink()
    capsys.readouterr()
    assert main(["labels", str(session)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"labels/{stored.name} ({name}'s label, recorded in session.json) is missing: fine-tuning refuses" in said
    assert main(["finetune", str(session), "--iterations", "2"]) == 1
    refused = _one_line_error(capsys)
    assert f"{stored}: {name}'s label, recorded in session.json, is missing" in refused and f"--cases {name}" in refused
    assert main(["labels", "import", str(session), "--from", str(root / "pool" / "labels"), "--cases", name]) == 0
    assert main(["labels", str(session)]) == 0 and "ready for 'asfda finetune'" in capsys.readouterr().out


def test_labels_import_after_the_pool_moved_names_the_rank_that_follows_it(ranked, tmp_path, capsys):
    """A colleague's copy of the session: every label was refused as if its scan were corrupt."""
    root, template = ranked
    session = tmp_path / "s"
    shutil.copytree(template, session)
    data = json.loads((session / "session.json").read_text())
    data["images"]["root"] = str(tmp_path / "where the pool was")
    (session / "session.json").write_text(json.dumps(data))
    assert main(["labels", "import", str(session), "--from", str(root / "pool" / "labels")]) == 1
    said = _one_line_error(capsys)
    assert "the session's pool folder is gone (moved, or another machine)" in said
    assert f"'asfda rank --out {session} --images NEW_FOLDER', then import again" in said


@pytest.mark.parametrize("lost", ["images", "model"])
def test_a_session_whose_model_or_pool_record_was_deleted_is_refused_not_refilled(ranked, tmp_path, capsys, lost):
    """Without them rank fell back to the sample pool or the built-in model and recorded it as the session's."""
    _, template = ranked
    session = tmp_path / "s"
    shutil.copytree(template, session)
    data = json.loads((session / "session.json").read_text())
    del data[lost]
    (session / "session.json").write_text(json.dumps(data))
    assert main(["rank", "--out", str(session)]) == 1
    assert f"session.json: '{lost}' is missing (edited by hand?); " in _one_line_error(capsys)
    assert not (session / "sample_data").exists()


@contextlib.contextmanager
def _held_by_another_process(setup: str, path):
    """Another process that runs ``setup`` (defining ``hold``), holds ``hold(path)`` until the block ends, then
    dies without releasing it (the OS does)."""
    code = f"import sys, time; {setup}; held = hold(sys.argv[1]); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_second_predict_into_a_folder_another_is_writing_is_refused(ranked, tmp_path, capsys):
    """Two runs at once (the adapted and the source model) interleaved their maps under one manifest."""
    root, session = ranked
    out = tmp_path / "pred"
    out.mkdir()
    argv = ["predict", str(session), "--images", str(root / "pool" / "images"), "--out", str(out)]
    with _held_by_another_process("from ASFDALib.outputs import hold_predictions as hold", out):  # as predict does
        assert main(argv) == 1
        assert f"{out}: another asfda predict is writing into this folder" in _one_line_error(capsys)
        assert not list(out.glob("*.nii.gz"))
    assert main(argv) == 0  # free once the other run ends, however it ended


def test_export_during_a_first_fine_tune_says_it_is_running(ranked, tmp_path, capsys):
    """ "Not fine-tuned yet: run asfda finetune first" was wrong advice while that very fine-tune ran."""
    _, session = ranked
    fine_tune = "from ASFDALib.adaptation.session import Session; hold = lambda p: Session.open(p).lock()"
    with _held_by_another_process(fine_tune, session):  # the fine-tune's process, holding the session's lock
        assert main(["export", str(session), "--out", str(tmp_path / "b")]) == 1
        said = _one_line_error(capsys)
        assert "not fine-tuned yet, and in use by pid" in said and "export when it ends" in said


def test_the_panels_export_of_a_session_without_a_fine_tuned_model_says_why_as_asfda_export_does(ranked, tmp_path):
    """The panel's Export runs the command's checks (its button can be stale: a fine-tune started elsewhere), worded
    for the panel: it has no --source-model."""
    from ASFDALib.app.workflow import PanelSettings, Workflow
    from ASFDALib.errors import ASFDAError

    _, session = ranked
    flow = Workflow(PanelSettings(session=str(session)))
    with pytest.raises(ASFDAError) as refused:
        flow.export(tmp_path / "m.pt2", "pt2")
    said = str(refused.value)
    assert said == f"{session}: not fine-tuned yet, so there is no adapted model to export; fine-tune it first"
    fine_tune = "from ASFDALib.adaptation.session import Session; hold = lambda p: Session.open(p).lock()"
    with _held_by_another_process(fine_tune, session), pytest.raises(ASFDAError) as refused:
        flow.export(tmp_path / "m.pt2", "pt2")
    said = str(refused.value)
    assert "not fine-tuned yet, and in use by pid" in said and said.endswith("running?); export when it ends")
    assert not list(tmp_path.iterdir())


def test_a_session_holding_its_pool_keeps_it_when_moved_or_copied(tmp_path, capsys):
    """The demo's sample_data lies inside the session: a plain mv lost it, a cp -r kept ranking the original."""
    session = tmp_path / "demo"
    assert main(["rank", "--out", str(session), "--budget", "1"]) == 0  # the sample pool, inside the session
    assert json.loads((session / "session.json").read_text())["images"]["in_session"] == "sample_data/images"
    moved = session.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["rank", "--out", str(moved)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "pool's folder is now" not in said and "volumes swept (12 from cache)" in said
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    shutil.rmtree(moved / "sample_data")  # the original's scans gone: the copy ranks its own
    assert main(["rank", "--out", str(copy)]) == 0
    from ASFDALib.adaptation.session import Session

    assert Session.open(copy).image_root == copy / "sample_data" / "images"


def test_rank_and_predict_say_which_files_of_the_folder_are_no_volume_and_how_to_include_them(ranked, tmp_path, capsys):
    root, session = ranked
    shutil.copytree(root / "pool" / "images", tmp_path / "scans")
    first = sorted((tmp_path / "scans").iterdir())[0]
    (tmp_path / "scans" / "brain.mgz").write_bytes(b"FreeSurfer")  # a scan in a format not read
    first.with_name(first.name.replace(".nii.gz", ".json")).write_text("{}")  # a BIDS sidecar: no scan
    capsys.readouterr()
    assert main(["rank", "--images", str(tmp_path / "scans"), "--out", str(tmp_path / "s"), "--budget", "1"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    line = f"Passed over 1 file in {tmp_path / 'scans'} of no volume type (.mgz 1: e.g. brain.mgz); to rank one"
    assert line in said and "convert it to NIfTI, NRRD or MetaImage" in said
    assert any("brain.mgz" in n for n in json.loads((tmp_path / "s" / "ranking.json").read_text())["notes"])
    assert main(["predict", str(session), "--images", str(tmp_path / "scans"), "--out", str(tmp_path / "maps")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "(.mgz 1: e.g. brain.mgz); to segment one of them" in said
    assert not (tmp_path / "maps" / "brain.mgz").exists()


def test_a_folder_of_scans_in_formats_not_read_is_answered_with_what_it_holds(ranked, tmp_path, capsys):
    """rank and predict refuse it in the same line (volumes.no_volumes_message): what it holds, and the fix."""
    _, session = ranked
    (tmp_path / "fs").mkdir()
    for name in ("sub1.mgz", "sub2.mgz", "notes.txt"):
        (tmp_path / "fs" / name).write_bytes(b"x")
    assert main(["rank", "--images", str(tmp_path / "fs"), "--out", str(tmp_path / "s")]) == 1
    err = _one_line_error(capsys)
    assert err.endswith(
        f"{tmp_path / 'fs'}: no volumes found (looked for .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd and DICOM folders); "
        "found files of other types only (.mgz 2, .txt 1: e.g. sub1.mgz): convert the scans to NIfTI, NRRD or MetaImage"
    )
    assert main(["predict", str(session), "--images", str(tmp_path / "fs"), "--out", str(tmp_path / "o")]) == 1
    assert _one_line_error(capsys) == err.replace("asfda rank:", "asfda predict:")
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine with CUDA runs it")
@pytest.mark.parametrize("command", [["rank", "--out"], ["demo", "--out"]])
def test_a_gpu_asked_for_on_a_machine_without_one_is_one_line_before_anything_is_written(tmp_path, capsys, command):
    from ASFDALib.errors import ASFDAError
    from ASFDALib.inference.device import resolve_device

    with pytest.raises(SystemExit) as stop:
        main([*command, str(tmp_path / "s"), "--device", "cuda"])
    assert stop.value.code == 2 and not (tmp_path / "s").exists()
    assert "argument --device: cuda was asked for, but this machine has no CUDA device" in _one_line_error(capsys)
    with pytest.raises(ASFDAError, match="use --device cpu or auto"):  # from Python (the panel's setting) alike
        resolve_device("cuda:1")


def test_phantoms_are_not_written_into_a_session(ranked, capsys):
    _, session = ranked
    before = sorted(p.relative_to(session) for p in session.rglob("*"))
    assert main(["phantoms", "--out", str(session), "--count", "1"]) == 1
    err = _one_line_error(capsys)
    assert (
        f"is inside the session folder {session.resolve()}" in err
        and f"e.g. {session.resolve().parent / 'phantoms'}" in err
    )
    assert sorted(p.relative_to(session) for p in session.rglob("*")) == before


def test_a_path_pasted_with_a_space_at_its_end_is_named_not_made_anew(ranked, tmp_path, capsys, monkeypatch):
    _, session = ranked
    monkeypatch.chdir(session.parent)
    spaced = f"{session.name} "
    err = _usage_error(["rank", "--out", f"new {spaced}"], capsys)  # a new session: a name no one meant
    assert "the name ends with a space (a pasted path?); give it without" in err and not Path(f"new {spaced}").exists()
    err = _usage_error(["finetune", spaced], capsys)
    assert f"its name ends with a space, and {session.name} exists: give that" in err
    assert main(["labels", spaced]) == 1
    assert f'"{spaced}": not an ASFDA session, but {session.name} is: give that' in _one_line_error(capsys)


def test_mc_passes_without_the_epistemic_strategy_is_refused_not_ignored(ranked, capsys):
    _, session = ranked
    err = _usage_error(["rank", "--out", str(session), "--mc-passes", "3"], capsys)
    assert "--mc-passes is for --strategy epistemic (MC dropout); leave it out" in err


def test_another_librarys_error_is_quoted_in_a_line_cut_at_a_word():
    from ASFDALib.errors import brief

    gloo = RuntimeError("Read error [127.0.0.1]:4242: Connection reset by peer. " + "This is typically caused " * 12)
    cut = brief(gloo, 80)
    assert cut.startswith("Read error [127.0.0.1]:4242: Connection reset by peer.") and cut.endswith(" …")
    assert len(cut) <= 82 and not cut[:-2].endswith(("caus", "typicall"))  # a whole word before the ellipsis
    assert brief(RuntimeError("first line\nsecond")) == "first line" and brief(KeyError()) == "KeyError"


def test_predict_on_a_pool_of_sub_folders_names_them_and_suggests_recursive(ranked, tmp_path, capsys):
    """A pool ranked with --recursive (one folder a site): predict without it names the sub-folders and the option."""
    root, session = ranked
    scans = sorted((root / "pool" / "images").iterdir())
    for site, scan in (("site1", scans[0]), ("site2", scans[1])):
        (tmp_path / "pool" / site).mkdir(parents=True)
        shutil.copy(scan, tmp_path / "pool" / site / scan.name)
    argv = ["predict", str(session), "--images", str(tmp_path / "pool"), "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = _one_line_error(capsys)
    assert err.endswith("; found volumes only in 2 sub-folders (site1, site2): add --recursive to segment them")
    assert not (tmp_path / "o").exists()
    assert main([*argv, "--recursive"]) == 0  # as it says
    assert sorted(p.relative_to(tmp_path / "o").as_posix() for p in (tmp_path / "o").rglob("*.nii.gz")) == [
        f"site1/{scans[0].name}",
        f"site2/{scans[1].name}",
    ]


def test_predict_without_recursive_names_what_it_left_out_and_never_a_session_kept_in_the_pool(
    ranked, tmp_path, capsys
):
    """A CD's patient folders beside a series folder: predict without --recursive segments the series one level
    down and names the others with the option, as rank does (it left them out unsaid); a pool of sub-folders with
    a session kept in it: the hint names the scans' sub-folders, not the session's labels."""
    from conftest import write_dicom_series

    from ASFDALib.bench.phantoms import domain_config, make_phantom

    root, session = ranked
    image, _, _ = make_phantom(11, domain_config("mri"))
    series = np.round(image[:, :, ::2]).astype(np.int16)
    cd = tmp_path / "cd"
    write_dicom_series(cd / "PT000002", series, spacing=(2.0, 2.0, 4.0))
    write_dicom_series(cd / "PT000000" / "ST000000" / "SE000000", series, spacing=(2.0, 2.0, 4.0))
    assert main(["predict", str(session), "--images", str(cd), "--out", str(tmp_path / "o")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "Not segmented: DICOM series deeper than one sub-folder, in PT000000; add --recursive to segment" in said
    assert main(["predict", str(session), "--images", str(cd), "--recursive", "--out", str(tmp_path / "r")]) == 0
    assert "Not segmented" not in capsys.readouterr().out
    pool, kept = tmp_path / "pool", tmp_path / "pool" / "sess"
    scans = sorted((root / "pool" / "images").iterdir())
    (pool / "site1").mkdir(parents=True)
    shutil.copy(scans[0], pool / "site1" / scans[0].name)
    shutil.copytree(session, kept)
    (kept / "labels").mkdir(exist_ok=True)
    shutil.copy(root / "pool" / "labels" / scans[0].name, kept / "labels" / "stand-in.v1.nii.gz")
    assert main(["predict", str(kept), "--images", str(pool), "--out", str(tmp_path / "o2")]) == 1
    err = _one_line_error(capsys)
    assert err.endswith("; found volumes only in 1 sub-folder (site1): add --recursive to segment them")
    # --recursive: another session met in the pool is left out and named; the predicting session's own, unsaid
    assert main(["predict", str(session), "--images", str(pool), "--recursive", "--out", str(tmp_path / "o3")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"Left out 1 ASFDA session folder in {pool} (sess): their label versions and predictions are no " in said
    assert sorted(p.relative_to(tmp_path / "o3").as_posix() for p in (tmp_path / "o3").rglob("*.nii.gz")) == [
        f"site1/{scans[0].name}"
    ]
    assert main(["predict", str(kept), "--images", str(pool), "--recursive", "--out", str(tmp_path / "o4")]) == 0
    assert "Left out" not in capsys.readouterr().out


def _nested_pool(ranked, folder: Path) -> dict[str, Path]:
    """A pool of sub-folders as sites and BIDS lay scans out, one scan of ``ranked``'s pool each, two of them of
    one file name (site1/a, site2/anat/a) and one in NRRD: name under the pool -> the scan it copies."""
    from ASFDALib.data.volumes import read_volume, write_volume

    scans = sorted((ranked[0] / "pool" / "images").iterdir())
    names = {"site1/a.nii.gz": scans[0], "site2/anat/a.nrrd": scans[1], "top.nii.gz": scans[2]}
    for name, scan in names.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        volume = read_volume(scan)
        write_volume(folder / name, volume.array, volume.affine)
    return names


def test_predict_recursive_writes_each_map_at_its_scans_path_in_its_own_grid_and_format(ranked, tmp_path, capsys):
    """A nested pool, ranked with --recursive into a session kept inside it: predict --recursive walks it as rank
    did (the session's own files are no scans), each map at its scan's path under --out, named so in the
    manifest; a second run replaces its own maps and says so."""
    from ASFDALib.data.volumes import read_volume

    pool, out = tmp_path / "pool", tmp_path / "pred"
    names = _nested_pool(ranked, pool)
    session = pool / "sess"  # rank leaves the session out of the pool; so must predict
    assert main(["rank", "--images", str(pool), "--recursive", "--out", str(session), "--budget", "1"]) == 0
    argv = ["predict", str(session), "--images", str(pool), "--recursive", "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 0
    assert "Passed over" not in capsys.readouterr().out  # the session's cache and records: not looked at
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["asfda_predictions.json", *sorted(names)]
    for name in names:  # each in its scan's own grid and format
        scan, label = read_volume(pool / name), read_volume(out / name, allow_constant=True)
        assert label.array.shape == scan.array.shape and np.allclose(label.affine, scan.affine, atol=1e-4)
        assert set(np.unique(label.array)) <= {0, 1, 2, 3}
    manifest = json.loads((out / "asfda_predictions.json").read_text())
    assert manifest["files"] == sorted(manifest["maps"]) == sorted(manifest["made_from"]) == sorted(names)
    assert manifest["made_from"] == {name: content_hash(pool / name) for name in names}
    assert manifest["maps"] == {name: content_hash(out / name) for name in names}
    capsys.readouterr()
    assert main(argv) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"Replacing 3 label maps an earlier asfda predict wrote to {out}" in said and "Wrote 3 label maps" in said


def test_labels_import_pairs_a_folder_that_mirrors_a_recursive_pool_by_each_files_path(ranked, tmp_path, capsys):
    """A label folder laid out as the recursive pool (as predict --recursive writes its maps, for a clinician to
    correct): each label pairs with the scan at its own path (site1/a with site1/a, never site2/anat/a), and such
    maps unchanged are refused as the model's own; before, sub-folders were not searched: 'no label file'."""
    from ASFDALib.data.volumes import read_volume, write_volume

    pool, labels, pred = tmp_path / "pool", tmp_path / "labels", tmp_path / "pred"
    names = _nested_pool(ranked, pool)
    session = pool / "sess"
    assert main(["rank", "--images", str(pool), "--recursive", "--out", str(session), "--budget", "1"]) == 0
    assert main(["predict", str(session), "--images", str(pool), "--recursive", "--out", str(pred)]) == 0
    capsys.readouterr()
    assert main(["labels", "import", str(session), "--from", str(pred), "--all"]) == 1
    said = " ".join(capsys.readouterr().out.split())
    assert said.count("is a map asfda predict wrote, unchanged since") == 3, said
    for name, scan in names.items():  # each scan's own reference, at its path
        reference = read_volume(ranked[0] / "pool" / "labels" / scan.name, allow_constant=True)
        (labels / name).parent.mkdir(parents=True, exist_ok=True)
        write_volume(labels / name, reference.array, reference.affine)
    assert main(["labels", "import", str(session), "--from", str(labels), "--all"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"imported site1/a.nii.gz <- {labels / 'site1' / 'a.nii.gz'}" in said
    assert f"imported site2/anat/a.nrrd <- {labels / 'site2' / 'anat' / 'a.nrrd'}" in said
    recorded = json.loads((session / "session.json").read_text())["labels"]
    assert sorted(recorded) == sorted(names)
    for name, scan in names.items():
        stored = read_volume(session / recorded[name][-1]["file"], allow_constant=True).array
        reference = read_volume(ranked[0] / "pool" / "labels" / scan.name, allow_constant=True).array
        assert np.array_equal(stored, reference)


@pytest.mark.parametrize("escaping", ["../outside.nii.gz", "site1\\..\\..\\outside.nii.gz"])
def test_predict_recursive_never_writes_outside_its_output_folder_nor_among_the_scans(
    ranked, tmp_path, capsys, escaping
):
    """An output folder inside the pool, a sub-folder of the output folder linked elsewhere, a manifest naming a
    map outside its folder (by .., or as Windows would write it): refused in one line, nothing written."""
    _, session = ranked
    pool, out, elsewhere = tmp_path / "pool", tmp_path / "pred", tmp_path / "elsewhere"
    _nested_pool(ranked, pool)
    before = {p: content_hash(p) for p in pool.rglob("*") if p.is_file()}
    argv = ["predict", str(session), "--images", str(pool), "--recursive", "--out"]
    assert main([*argv, str(pool / "site1" / "pred")]) == 1
    assert f"is inside the images folder {pool}, where the maps would mix with the scans" in _one_line_error(capsys)
    elsewhere.mkdir()
    out.mkdir()
    (out / "site1").symlink_to(elsewhere, target_is_directory=True)
    assert main([*argv, str(out)]) == 1
    err = _one_line_error(capsys)
    assert f"{pool / 'site1' / 'a.nii.gz'}: path 'site1/a.nii.gz' points outside the output folder {out}" in err
    (out / "site1").unlink()
    manifest = {"files": [escaping], "maps": {escaping: "0" * 64}}
    (out / "asfda_predictions.json").write_text(json.dumps(manifest))
    assert main([*argv, str(out)]) == 1
    err = _one_line_error(capsys)
    named = escaping.replace("\\", "/")  # a name written on Windows, read as every system names it
    assert f"{out / 'asfda_predictions.json'}: path '{named}' points outside the predictions folder {out}" in err
    assert "remove that name from it, or choose another --out folder" in err
    assert not list(elsewhere.iterdir()) and sorted(p.name for p in out.iterdir()) == ["asfda_predictions.json"]
    assert {p: content_hash(p) for p in pool.rglob("*") if p.is_file()} == before


def test_evaluate_pairs_nested_maps_with_the_references_of_their_own_sub_folder(ranked, tmp_path, capsys):
    """Maps of a nested pool against a reference folder mirroring it: site1/a and site2/anat/a pair each with its
    own sub-folder's reference (a _seg one too), cases named as the pool names them; a flat reference folder pairs
    by file name, and refuses the two maps one reference would fit."""
    import csv

    _, session = ranked
    pool, out, refs, flat = tmp_path / "pool", tmp_path / "pred", tmp_path / "refs", tmp_path / "flat"
    _nested_pool(ranked, pool)
    assert main(["predict", str(session), "--images", str(pool), "--recursive", "--out", str(out)]) == 0
    # each reference is its case's map itself: a map paired with another case's reference would score below 1
    for name, ref in (("site1/a.nii.gz", "site1/a.nii.gz"), ("site2/anat/a.nrrd", "site2/anat/a_seg.nrrd")):
        (refs / ref).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / name, refs / ref)
    shutil.copy(out / "top.nii.gz", refs / "top.nii.gz")
    assert main(["evaluate", "--pred", str(out), "--labels", str(refs), "--card", CARD]) == 0
    with open(out / "evaluation.csv", newline="") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == ["MEAN", "site1/a.nii.gz", "site2/anat/a_seg.nrrd", "top.nii.gz"]
    assert all(float(row["dice_mean"]) == 1.0 for row in rows.values())
    flat.mkdir()
    shutil.copy(out / "site1" / "a.nii.gz", flat / "a.nii.gz")
    shutil.copy(out / "top.nii.gz", flat / "top.nii.gz")
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(out),
                "--labels",
                str(flat),
                "--card",
                CARD,
                "--out",
                str(flat.with_suffix(".csv")),
            ]
        )
        == 0
    )
    said = " ".join(capsys.readouterr().out.split())
    assert "2 predictions in" in said and "fit the same reference as another" in said
    assert "left out: site1/a.nii.gz, site2/anat/a.nrrd (keep one prediction per case)" in said


# A BIDS derivatives tree's names for each scan's label: the source's name then dseg, with a desc- entity, and a
# mask named by its structure (label-) as the specification writes a derivative: the source's entities, no suffix
BIDS_LABELS = {
    "sub-01/anat/sub-01_T1w.nii.gz": "sub-01/anat/sub-01_T1w_dseg.nii.gz",
    "sub-02/anat/sub-02_T1w.nii.gz": "sub-02/anat/sub-02_T1w_desc-tumor_dseg.nii.gz",
    "sub-03/anat/sub-03_T1w.nii.gz": "sub-03/anat/sub-03_label-liver_mask.nii.gz",
}


def _bids_dataset(ranked, folder: Path) -> Path:
    """A BIDS dataset of ``ranked``'s scans (sub-0N/anat/sub-0N_T1w) with a sub-02 T2w beside its T1w, and the
    scans' reference labels in derivatives/manual under BIDS_LABELS' names."""
    from ASFDALib.data.volumes import read_volume, write_volume

    scans = sorted((ranked[0] / "pool" / "images").iterdir())
    for (scan, label), source in zip(BIDS_LABELS.items(), scans):
        volume = read_volume(source)
        write_volume(folder / scan, volume.array, volume.affine)
        reference = read_volume(ranked[0] / "pool" / "labels" / source.name, allow_constant=True)
        write_volume(folder / "derivatives" / "manual" / label, reference.array, reference.affine)
    t2 = read_volume(scans[3])
    write_volume(folder / "sub-02" / "anat" / "sub-02_T2w.nii.gz", t2.array, t2.affine)
    (folder / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    return folder / "derivatives" / "manual"


def test_labels_import_pairs_a_bids_derivatives_tree_with_the_scans_of_its_own_sub_folders(ranked, tmp_path, capsys):
    """A BIDS dataset ranked from its root with --recursive: derivatives/ holds no scans (BIDS keeps it for derived
    maps), and its labels pair each with the scan of its own sub-folder by the BIDS entities (_dseg, desc-,
    label-): sub-02's tumour label with its T1w, not the T2w beside it."""
    from ASFDALib.data.volumes import read_volume

    bids, session = tmp_path / "bids", tmp_path / "sess"
    derivatives = _bids_dataset(ranked, bids)
    assert main(["rank", "--images", str(bids), "--recursive", "--out", str(session), "--budget", "1"]) == 0
    recorded = json.loads((session / "session.json").read_text())
    assert sorted(f["name"] for f in recorded["images"]["files"]) == sorted(
        [*BIDS_LABELS, "sub-02/anat/sub-02_T2w.nii.gz"]
    )
    capsys.readouterr()
    assert main(["labels", "import", str(session), "--from", str(derivatives), "--cases", ",".join(BIDS_LABELS)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    for scan, label in BIDS_LABELS.items():
        assert f"imported {scan} <- {derivatives / label}" in said
    labels = json.loads((session / "session.json").read_text())["labels"]
    assert sorted(labels) == sorted(BIDS_LABELS)
    for scan, label in BIDS_LABELS.items():
        stored = read_volume(session / labels[scan][-1]["file"], allow_constant=True).array
        assert np.array_equal(stored, read_volume(derivatives / label, allow_constant=True).array)


@pytest.fixture(scope="module")
def bids_ranked(ranked, tmp_path_factory) -> tuple[Path, Path]:
    """A BIDS dataset (:func:`_bids_dataset`) ranked from its root with --recursive, each of its 4 scans queried:
    its derivatives/manual folder (no label for sub-02's T2w) and the session."""
    root = tmp_path_factory.mktemp("bids")
    derivatives = _bids_dataset(ranked, root / "bids")
    args = ["rank", "--images", str(root / "bids"), "--recursive", "--out", str(root / "session"), "--budget", "4"]
    assert main(args) == 0
    return derivatives, root / "session"


def _t2w_label(ranked, path: Path) -> None:
    """The reference label of _bids_dataset's sub-02 T2w (the MRI pool's fourth scan), written at ``path``."""
    label = sorted((ranked[0] / "pool" / "labels").iterdir())[3]
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(label, path)


T2W = "sub-02/anat/sub-02_T2w.nii.gz"


def test_a_bids_pools_missing_label_is_named_by_its_derivatives_path_where_it_then_pairs(
    ranked, bids_ranked, tmp_path, capsys
):
    """A labels folder that mirrors a BIDS dataset (derivatives/<pipeline>): the scan left without a label is
    named with the path its derivative would have there, not a flat name of its path with / as _."""
    derivatives, ranked_session = bids_ranked
    session = shutil.copytree(ranked_session, tmp_path / "session")
    labels = shutil.copytree(derivatives, tmp_path / "derivatives" / "manual")
    main(["labels", "import", str(session), "--from", str(labels)])
    said = " ".join(capsys.readouterr().out.split())
    expected = labels / "sub-02" / "anat" / "sub-02_T2w_dseg.nii.gz"
    assert (
        f"no label file for {T2W} in {labels} (a label lies at its scan's path in the labels folder, named as the "
        f"scan plus _dseg: e.g. {expected})"
    ) in said
    hint = said.partition("no label file for ")[2].partition(")")[0]
    assert "_anat_" not in hint and "at the folder's top" not in hint  # the folder's labels lie in sub-folders
    _t2w_label(ranked, expected)
    assert main(["labels", "import", str(session), "--from", str(labels)]) == 0
    assert f"imported {T2W} <- {expected}" in " ".join(capsys.readouterr().out.split())


def test_a_bids_pools_missing_label_in_a_flat_labels_folder_is_named_by_its_flat_name_too(
    ranked, bids_ranked, tmp_path, capsys
):
    """A flat labels folder for a recursive BIDS pool (each label at its top, by its file name): the derivative's
    path is named, and the flat name beside it, by which it then pairs."""
    derivatives, ranked_session = bids_ranked
    session = shutil.copytree(ranked_session, tmp_path / "session")
    flat = tmp_path / "flat"
    flat.mkdir()
    for label in derivatives.rglob("*.nii.gz"):
        shutil.copy(label, flat / label.name)
    main(["labels", "import", str(session), "--from", str(flat)])
    said = " ".join(capsys.readouterr().out.split())
    assert (
        f"no label file for {T2W} in {flat} (a label lies at its scan's path in the labels folder, named as the "
        f"scan plus _dseg: e.g. {flat / 'sub-02' / 'anat' / 'sub-02_T2w_dseg.nii.gz'}, or at the folder's top as its "
        "labels lie, sub-02_T2w_dseg.nii.gz)"
    ) in said
    _t2w_label(ranked, flat / "sub-02_T2w_dseg.nii.gz")
    assert main(["labels", "import", str(session), "--from", str(flat)]) == 0
    assert f"imported {T2W} <- {flat / 'sub-02_T2w_dseg.nii.gz'}" in " ".join(capsys.readouterr().out.split())


def test_a_bids_roots_metadata_is_no_file_to_convert_and_its_subject_folders_are_named_with_recursive(
    ranked, tmp_path, capsys
):
    """dataset_description.json, participants.tsv, a README and a subject's scans.tsv are BIDS' metadata, not scans
    of a type to convert: predict on the root without --recursive names the sub-folders that hold the scans and
    the option, as rank does, and a recursive rank passes over none of them."""
    _, session = ranked
    bids = tmp_path / "bids"
    _bids_dataset(ranked, bids)
    (bids / "participants.tsv").write_text("participant_id\nsub-01\n")
    (bids / "README").write_text("a dataset")
    (bids / "sub-01" / "sub-01_scans.tsv").write_text("filename\n")
    capsys.readouterr()
    assert main(["predict", str(session), "--images", str(bids), "--out", str(tmp_path / "pred")]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert "add --recursive to segment them" in said and ".json" not in said and "convert" not in said
    assert main(["rank", "--images", str(bids), "--recursive", "--out", str(tmp_path / "s"), "--budget", "1"]) == 0
    assert "Passed over" not in capsys.readouterr().out


def test_evaluate_pairs_maps_of_a_bids_dataset_with_its_derivatives_references(ranked, tmp_path):
    """predict --recursive over a BIDS root writes no map for derivatives/; evaluate pairs each map with the
    reference of its own sub-folder in derivatives/<pipeline> by its BIDS name (each reference is the case's map
    itself, so a map paired with another case's would score below 1)."""
    import csv

    _, session = ranked
    bids, out = tmp_path / "bids", tmp_path / "pred"
    derivatives = _bids_dataset(ranked, bids)
    assert main(["predict", str(session), "--images", str(bids), "--recursive", "--out", str(out)]) == 0
    maps = sorted(relative_name(p, out) for p in out.rglob("*.nii.gz"))
    assert maps == sorted([*BIDS_LABELS, "sub-02/anat/sub-02_T2w.nii.gz"])
    for scan, label in BIDS_LABELS.items():
        shutil.copy(out / scan, derivatives / label)
    assert main(["evaluate", "--pred", str(out), "--labels", str(derivatives), "--card", CARD]) == 0
    with open(out / "evaluation.csv", newline="") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == sorted(["MEAN", *BIDS_LABELS.values()])
    assert all(float(row["dice_mean"]) == 1.0 for row in rows.values())


def test_evaluate_pairs_nested_maps_with_flat_references_named_by_their_path(ranked, tmp_path):
    """A flat reference folder named as labels import names a recursive pool's scans (the path, / as _, as a CD's
    PT0/ST0/SE0 series must be): each nested map pairs with its own reference, not by its file name alone."""
    from ASFDALib.evaluation.evaluate import pair_cases

    _, session = ranked
    pool, out, flat = tmp_path / "pool", tmp_path / "pred", tmp_path / "flat"
    _nested_pool(ranked, pool)
    assert main(["predict", str(session), "--images", str(pool), "--recursive", "--out", str(out)]) == 0
    flat.mkdir()
    shutil.copy(out / "site1" / "a.nii.gz", flat / "site1_a.nii.gz")
    shutil.copy(out / "site2" / "anat" / "a.nrrd", flat / "site2_anat_a.nrrd")
    pairing, _, _ = pair_cases(out, flat)
    assert pairing.pairs == {"site1_a.nii.gz": "site1/a.nii.gz", "site2_anat_a.nrrd": "site2/anat/a.nrrd"}
