"""The second half of the mission end to end through the command line: rank -> label -> fine-tune ->
predict -> evaluate -> export -> next round, on real files."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ASFDALib.adaptation.recipe import FinetuneConfig
from ASFDALib.adaptation.session import Session
from ASFDALib.app.cli import main
from ASFDALib.data.volumes import content_hash


@pytest.fixture(scope="module")
def adapted_session(tmp_path_factory, mri_pool):
    """A session ranked on the MRI pool, its query labelled with ground truth, then fine-tuned briefly.

    The confidence gate, not the default: the default model segments nothing on these MRI phantoms, so the
    default rounds gate would keep no volume (see the test of the default below), and this session is the
    one whose pseudo-labels the later tests record, resume and export.
    """
    root = tmp_path_factory.mktemp("adapt")
    session = root / "session"
    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(session), "--budget", "2"]) == 0
    query = json.loads((session / "ranking.json").read_text())["selected"]
    (root / "gt").mkdir()
    for name in query:
        shutil.copy(mri_pool / "labels" / name, root / "gt" / name.replace(".nii.gz", "_seg.nii.gz"))
    assert main(["labels", "import", str(session), "--from", str(root / "gt")]) == 0
    assert (
        main(
            [
                "finetune",
                str(session),
                "--iterations",
                "60",
                "--pseudo-iterations",
                "30",
                "--checkpoint-every",
                "30",
                "--batch-size",
                "2",
                "--lr",
                "3e-3",
                "--pseudo-gate",
                "confidence",
            ]
        )
        == 0
    )
    return root, session, query


@pytest.fixture
def labelled_session(tmp_path, mri_pool):
    """A fresh session ranked on the MRI pool with one queried volume labelled (ground truth)."""
    session = tmp_path / "session"
    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(session), "--budget", "1"]) == 0
    query = json.loads((session / "ranking.json").read_text())["selected"]
    (tmp_path / "gt").mkdir()
    shutil.copy(mri_pool / "labels" / query[0], tmp_path / "gt" / query[0])
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt")]) == 0
    return session


def _mean_dice(csv_path):
    import csv

    rows = list(csv.DictReader(open(csv_path)))
    return float(next(r for r in rows if r["case"] == "MEAN")["dice_mean"])


def test_fine_tuning_really_improves_target_dice(adapted_session, mri_pool):
    root, session, _ = adapted_session
    card = "Resources/Model/asfda_default.card.json"
    for flag, out in (([], "adapted"), (["--source-model"], "source")):
        assert (
            main(["predict", str(session), "--images", str(mri_pool / "images"), "--out", str(root / out), *flag]) == 0
        )
        assert main(["evaluate", "--pred", str(root / out), "--labels", str(mri_pool / "labels"), "--card", card]) == 0
    source, adapted = _mean_dice(root / "source" / "evaluation.csv"), _mean_dice(root / "adapted" / "evaluation.csv")
    assert adapted > source + 0.2, (source, adapted)


def test_evaluating_with_the_session_leaves_the_cases_it_trained_on_out_of_the_mean(
    adapted_session, mri_pool, tmp_path, capsys
):
    import csv

    _, session, query = adapted_session
    pseudo = json.loads((session / "session.json").read_text())["rounds"][0]["metrics"]["pseudo_labelled"]
    pred = tmp_path / "pred"
    assert main(["predict", str(session), "--images", str(mri_pool / "images"), "--out", str(pred)]) == 0
    assert main(["evaluate", "--pred", str(pred), "--labels", str(mri_pool / "labels"), "--session", str(session)]) == 0
    assert "Mean over 2 cases (not the 4 the session trained on), per class" in " ".join(
        capsys.readouterr().out.split()
    )
    rows = {r["case"]: r for r in csv.DictReader(open(pred / "evaluation.csv"))}
    assert {c for c in rows if rows[c]["reason"]} == {*query, *pseudo, "MEAN"}
    assert (
        rows[query[0]]["reason"]
        == f"labelled in the session (same image as its {query[0]}): trained on, not in the mean"
    )
    assert rows[pseudo[0]]["reason"] == (
        f"pseudo-labelled in the session (same image as its {pseudo[0]}): trained on, not in the mean"
    )
    assert rows["MEAN"]["reason"] == "without the 4 cases the session trained on"
    held_out = [float(r["dice_mean"]) for c, r in rows.items() if c != "MEAN" and not r["reason"]]
    assert float(rows["MEAN"]["dice_liver"]) == pytest.approx(
        np.mean([float(rows[c]["dice_liver"]) for c in rows if c != "MEAN" and not rows[c]["reason"]]), abs=1e-4
    )
    assert len(held_out) == 2


def test_cases_labelled_after_the_round_that_made_the_maps_stay_held_out_for_them(
    adapted_session, mri_pool, tmp_path, capsys
):
    """Round 1's maps, evaluated after a later label came in: round 1's model never trained on that case."""
    import csv

    _, original, _ = adapted_session
    session = tmp_path / "session"
    shutil.copytree(original, session)
    pred = tmp_path / "pred"
    assert main(["predict", str(session), "--images", str(mri_pool / "images"), "--out", str(pred)]) == 0
    rows = {r["case"]: r for r in csv.DictReader(open(_evaluate(pred, mri_pool, session, capsys)))}
    later = next(c for c, r in rows.items() if c != "MEAN" and not r["reason"])  # held out from round 1
    (tmp_path / "more").mkdir()
    shutil.copy(mri_pool / "labels" / later, tmp_path / "more" / later)
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "more"), "--cases", later]) == 0
    rows = {r["case"]: r for r in csv.DictReader(open(_evaluate(pred, mri_pool, session, capsys)))}
    assert not rows[later]["reason"] and rows["MEAN"]["reason"] == "without the 4 cases the session trained on"


def _evaluate(pred: Path, pool: Path, session: Path, capsys) -> Path:
    args = ["evaluate", "--pred", str(pred), "--labels", str(pool / "labels"), "--session", str(session)]
    assert main([*args, "--out", str(pred.parent / "evaluation.csv")]) == 0
    capsys.readouterr()
    return pred.parent / "evaluation.csv"


def test_evaluate_takes_the_session_that_made_the_maps_and_warns_where_another_is_named(
    adapted_session, labelled_session, mri_pool, tmp_path, capsys
):
    """Predict records which session made a folder's maps: without --session evaluate judges the held-out cases by
    that session's labels; naming another is said, since its trained cases are not the ones that made the maps."""
    _, session, _ = adapted_session
    pred, labels = tmp_path / "pred", str(mri_pool / "labels")
    assert main(["predict", str(session), "--images", str(mri_pool / "images"), "--out", str(pred)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(pred), "--labels", labels, "--out", str(tmp_path / "a.csv")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"session {session.resolve()}: the one that made these label maps (--session names another)" in said
    assert "Mean over 2 cases (not the 4 the session trained on)" in said and "no class names" not in said
    other = ["--session", str(labelled_session), "--out", str(tmp_path / "b.csv")]
    assert main(["evaluate", "--pred", str(pred), "--labels", labels, *other]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"warning {session.resolve()} made these label maps, not {labelled_session}" in said
    # a maker's session file that cannot be read is noted, and the maps are evaluated without it
    (session / "session.json").rename(session / "session.json.aside")
    (session / "session.json").write_text("{oops")
    try:
        assert main(["evaluate", "--pred", str(pred), "--labels", labels, "--out", str(tmp_path / "c.csv")]) == 0
        assert "unreadable session file" in " ".join(capsys.readouterr().out.split())
    finally:
        (session / "session.json.aside").replace(session / "session.json")
    # and predict's hint, after replacing maps an evaluation scored, names the session
    assert main(["evaluate", "--pred", str(pred), "--labels", labels]) == 0
    assert main(["predict", str(session), "--images", str(mri_pool / "images"), "--out", str(pred)]) == 0
    hint = f"'asfda evaluate --pred {pred} --labels DIR --session {session}' again"
    assert hint in " ".join(capsys.readouterr().out.split())


def test_the_source_models_maps_are_evaluated_on_the_same_held_out_cases_and_say_why(
    adapted_session, mri_pool, tmp_path, capsys
):
    import csv

    _, session, query = adapted_session
    pred, labels = tmp_path / "source", str(mri_pool / "labels")
    assert (
        main(["predict", str(session), "--images", str(mri_pool / "images"), "--out", str(pred), "--source-model"]) == 0
    )
    assert main(["evaluate", "--pred", str(pred), "--labels", labels, "--session", str(session)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "Mean over 2 cases (not the 4 the session trained on, as for the adapted model), per class" in said
    rows = {r["case"]: r for r in csv.DictReader(open(pred / "evaluation.csv"))}
    assert rows[query[0]]["reason"] == (
        f"labelled in the session (same image as its {query[0]}): not in the mean, as for the adapted model"
    )
    assert rows["MEAN"]["reason"] == (
        "without the 4 cases the session trained on (the source model did not: left out so the mean compares "
        "with the adapted model's)"
    )


def test_a_prediction_folder_records_which_model_made_each_map(adapted_session, mri_pool, tmp_path, capsys):
    _, session, _ = adapted_session
    images = str(mri_pool / "images")
    assert main(["predict", str(session), "--images", images, "--out", str(tmp_path / "p")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "Wrote 6 label maps to" in said and "with round 1's fine-tuned model (checkpoints/round1/final.pt)" in said
    made_by = json.loads((tmp_path / "p" / "asfda_predictions.json").read_text())["made_by"]
    assert len(made_by) == 6 and made_by["mri_000.nii.gz"] == {
        "session": str(session.resolve()),
        "model": "adapted",
        "round": 1,
        "checkpoint": "checkpoints/round1/final.pt",
        "sha256": content_hash(session / "checkpoints" / "round1" / "final.pt"),
    }
    assert main(["predict", str(session), "--images", images, "--out", str(tmp_path / "p"), "--source-model"]) == 0
    assert "with the source model" in " ".join(capsys.readouterr().out.split())
    made_by = json.loads((tmp_path / "p" / "asfda_predictions.json").read_text())["made_by"]
    assert made_by["mri_000.nii.gz"]["model"] == "source" and "digest" in made_by["mri_000.nii.gz"]
    made_from = json.loads((tmp_path / "p" / "asfda_predictions.json").read_text())["made_from"]
    assert made_from == {p.name: content_hash(p) for p in sorted((mri_pool / "images").iterdir())}


def test_maps_predicted_from_python_record_the_sessions_model_as_the_command_does(adapted_session, mri_pool, tmp_path):
    """The README's Python path (predict_folder on session_model) names the adapted checkpoint that ran, so
    evaluate finds the session and its training cases by itself."""
    from ASFDALib.adaptation.pipeline import predict_folder, session_model

    _, session, _ = adapted_session
    predict_folder(session_model(Session.open(session)), mri_pool / "images", tmp_path / "py", "cpu")
    made_by = json.loads((tmp_path / "py" / "asfda_predictions.json").read_text())["made_by"]["mri_000.nii.gz"]
    assert made_by == {
        "session": str(session.resolve()),
        "model": "adapted",
        "round": 1,
        "checkpoint": "checkpoints/round1/final.pt",
        "sha256": content_hash(session / "checkpoints" / "round1" / "final.pt"),
    }


@pytest.fixture
def test_set(adapted_session, mri_pool, tmp_path):
    """A test folder beside the session's pool (images/ and labels/): a new volume under the name of a volume
    the session labelled, a labelled and a pseudo-labelled volume of the pool renamed, and a pseudo-labelled
    one under its own name; and the adapted model's maps of it (pred/)."""
    from ASFDALib.bench.phantoms import write_phantoms

    _, session, query = adapted_session
    pseudo = json.loads((session / "session.json").read_text())["rounds"][0]["metrics"]["pseudo_labelled"]
    new = tmp_path / "new"
    write_phantoms(new, 1, "mri", seed=11, prefix="new")
    sources = {  # name in the test folder -> the folder (images/ and labels/ below it) and name copied
        query[0]: (new, "new_000.nii.gz"),
        "renamed_labelled.nii.gz": (mri_pool, query[1]),
        "renamed_pseudo.nii.gz": (mri_pool, pseudo[0]),
        pseudo[1]: (mri_pool, pseudo[1]),
    }
    for kind in ("images", "labels"):
        (tmp_path / "test" / kind).mkdir(parents=True)
        for name, (root, source) in sources.items():
            shutil.copy(root / kind / source, tmp_path / "test" / kind / name)
    pred = tmp_path / "pred"
    assert main(["predict", str(session), "--images", str(tmp_path / "test" / "images"), "--out", str(pred)]) == 0
    return tmp_path / "test", pred, query, pseudo


def _evaluation(session, pred, labels) -> dict[str, dict]:
    import csv

    assert main(["evaluate", "--pred", str(pred), "--labels", str(labels), "--session", str(session)]) == 0
    with open(pred / "evaluation.csv", newline="") as handle:
        return {r["case"]: r for r in csv.DictReader(handle)}


def test_evaluate_knows_the_sessions_training_volumes_by_the_image_a_map_was_made_from_not_by_name(
    adapted_session, test_set, capsys
):
    _, session, _ = adapted_session
    test, pred, query, pseudo = test_set
    rows = _evaluation(session, pred, test / "labels")
    assert rows[query[0]]["reason"] == ""  # the pool's name, another volume: a test case
    assert rows["renamed_labelled.nii.gz"]["reason"] == (
        f"labelled in the session (same image as its {query[1]}): trained on, not in the mean"
    )
    assert rows["renamed_pseudo.nii.gz"]["reason"] == (
        f"pseudo-labelled in the session (same image as its {pseudo[0]}): trained on, not in the mean"
    )
    assert rows[pseudo[1]]["reason"] == (
        f"pseudo-labelled in the session (same image as its {pseudo[1]}): trained on, not in the mean"
    )
    assert rows["MEAN"]["dice_mean"] == rows[query[0]]["dice_mean"]
    assert "Mean over 1 cases (not the 3 the session trained on), per class" in " ".join(
        capsys.readouterr().out.split()
    )


def test_another_tools_maps_are_known_by_their_reference_label_file_and_pseudo_labelled_ones_by_name(
    adapted_session, test_set
):
    """Without asfda predict's record of the images, the reference label is the content to compare: the same
    file as one the session imported. A pseudo-labelled volume has no label in the session, nor has a label
    imported before its source was recorded, so there only the name can tell; the note says so."""
    _, session, _ = adapted_session
    test, pred, query, pseudo = test_set
    other = pred.parent / "other_tool"
    other.mkdir()
    for name in (query[0], "renamed_labelled.nii.gz", pseudo[1]):
        shutil.copy(pred / name, other / name)
    rows = _evaluation(session, other, test / "labels")
    assert rows[query[0]]["reason"] == ""  # its label is not the one the session imported for its name
    assert rows["renamed_labelled.nii.gz"]["reason"] == (
        f"labelled in the session (same label file as its {query[1]}): trained on, not in the mean"
    )
    assert rows[pseudo[1]]["reason"] == (
        "pseudo-labelled in the session (by name: nothing recorded to compare contents): trained on, not in the mean"
    )
    assert rows["MEAN"]["dice_mean"] == rows[query[0]]["dice_mean"]
    # a session whose labels were imported before their source was recorded: there the name decides
    data = json.loads((session / "session.json").read_text())
    for versions in data["labels"].values():
        for version in versions:
            version.pop("source_sha256", None)
    (session / "session.json").write_text(json.dumps(data))
    rows = _evaluation(session, other, test / "labels")
    assert rows[query[0]]["reason"] == (
        "labelled in the session (by name: nothing recorded to compare contents): trained on, not in the mean"
    )


def test_the_session_records_the_round_and_its_pseudo_labels(adapted_session):
    _, session, query = adapted_session
    data = json.loads((session / "session.json").read_text())
    entry = data["rounds"][0]
    assert entry["query"] == query and entry["checkpoint"] == "checkpoints/round1/final.pt"
    assert sorted(entry["metrics"]["labelled"]) == sorted(query)
    assert len(entry["metrics"]["pseudo_labelled"]) == 2  # half of the four unlabeled volumes
    assert set(entry["metrics"]["seconds"]) == {"stage1", "pseudo_labels", "stage2"}
    pseudo = json.loads((session / "checkpoints" / "round1" / "pseudo" / "pseudo.json").read_text())
    assert pseudo["kept"] == entry["metrics"]["pseudo_labelled"]
    assert pseudo["gate"] == {"reliability": "confidence", "keep_fraction": 0.5, "confidence": 0.9}


def test_a_round_gated_by_agreement_with_its_starting_model_records_that_gate(labelled_session, capsys):
    """Round 1 starts from the source model: its pseudo-labels are where the stage-1 model agrees with it."""
    args = ["--iterations", "4", "--pseudo-iterations", "2", "--batch-size", "1", "--pseudo-gate", "rounds"]
    assert main(["finetune", str(labelled_session), *args, "--min-agreement", "0"]) == 0
    pseudo = json.loads((labelled_session / "checkpoints" / "round1" / "pseudo" / "pseudo.json").read_text())
    assert pseudo["gate"] == {"reliability": "rounds", "keep_fraction": 0.5, "min_agreement": 0.0, "fallback": "flips"}
    assert len(pseudo["kept"]) == 2 and all(0.0 <= r <= 1.0 for r in pseudo["reliability"].values())
    # the gate asked for judged, so its labels teach as they are: the fixed teacher
    run = json.loads((labelled_session / "checkpoints" / "round1" / "run.json").read_text())
    assert run["history"][0]["teacher"] == "fixed"
    # and its patches are strongly augmented without intensity curves: what was asked, and what ran
    assert (run["history"][0]["pseudo_augment_asked"], run["history"][0]["pseudo_augment"]) == (
        "remap-if-fallback",
        "strong",
    )
    gate = {"reliability": "rounds", "keep_fraction": 0.5, "min_agreement": 0.0, "fallback": "flips"}
    assert gate.items() <= run["recipe"].items()  # with a stage 2, the run's recipe holds its gate
    metrics = json.loads((labelled_session / "session.json").read_text())["rounds"][0]["metrics"]
    assert (metrics["pseudo_teacher"], metrics["pseudo_augment"]) == ("fixed", "strong")
    said = " ".join(capsys.readouterr().out.split())
    assert (
        "the pseudo-labelled patches get more intensity change than the labelled ones (--pseudo-augment), no "
        "intensity curves: the gate asked for judged, so the contrast is the round's starting model's"
    ) in said


def test_a_round_its_starting_model_vouched_for_hands_over_a_blend_and_last_pt_keeps_the_tuned_weights(
    labelled_session, capsys
):
    """The rounds gate kept volumes, so final.pt is 0.8 x the tuned weights + 0.2 x the round's start (the
    source model), every loaded tensor; an extension goes on from last.pt's tuned weights and blends again,
    with the run's own share."""
    from ASFDALib.adaptation.blend import blend_state
    from ASFDALib.adaptation.pipeline import session_model

    args = ["--iterations", "4", "--pseudo-iterations", "2", "--batch-size", "1", "--min-agreement", "0"]
    assert main(["finetune", str(labelled_session), *args]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "handing over the tuned weights blended with 20% of the round's starting weights" in said
    folder = labelled_session / "checkpoints" / "round1"
    source = session_model(Session.open(labelled_session), adapted=False)
    start, fresh = source.network.state_dict(), source.load_report.new

    def handed_over_blend(share: float = 0.2) -> None:
        tuned = torch.load(folder / "last.pt", weights_only=True)["network"]
        final = torch.load(folder / "final.pt", weights_only=True)
        expected = blend_state(tuned, start, share, fresh)
        assert all(torch.allclose(final[k].float(), expected[k].float(), atol=1e-6) for k in final)
        moved = [k for k in final if final[k].is_floating_point() and not torch.equal(final[k], tuned[k])]
        assert moved and not any(k in fresh for k in moved)  # blended, a fresh head never

    handed_over_blend()
    run = json.loads((folder / "run.json").read_text())
    # the share applied beside the one asked for (the run's recipe, which a resume and an extension go on with)
    assert (run["history"][0]["handover_blend"], run["recipe"]["blend_start"]) == (0.2, 0.2)
    # and what its stage 2 trained on: the gate that judged and the volumes it kept, as session.json has them
    metrics = json.loads((labelled_session / "session.json").read_text())["rounds"][0]["metrics"]
    assert run["history"][0]["pseudo_gate"] == metrics["pseudo_gate"]["reliability"] == "rounds"
    assert run["history"][0]["pseudo_labelled"] == metrics["pseudo_labelled"] != []
    assert json.loads((labelled_session / "session.json").read_text())["rounds"][0]["metrics"]["handover_blend"] == 0.2
    extend = ["finetune", str(labelled_session), "--extend", "--batch-size", "1"]
    assert main([*extend, "--pseudo-iterations", "4", "--blend-start", "0.3"]) == 0  # an extension may change it
    handed_over_blend(0.3)
    assert main([*extend, "--pseudo-iterations", "5"]) == 0  # and the next goes on with the run's own
    assert json.loads((folder / "run.json").read_text())["done"]["stage2"] == 5
    handed_over_blend(0.3)
    # asked for none, the tuned weights go as they are
    assert main(["finetune", str(labelled_session), "--restart", *args, "--blend-start", "0"]) == 0
    final, tuned = torch.load(folder / "final.pt", weights_only=True), torch.load(folder / "last.pt", weights_only=True)
    assert all(torch.equal(final[k], tuned["network"][k]) for k in final)
    assert json.loads((labelled_session / "session.json").read_text())["rounds"][0]["metrics"]["handover_blend"] == 0.0
    assert "handing over the tuned weights as they are (--blend-start 0)" in capsys.readouterr().out


def test_an_extend_with_only_another_share_hands_the_tuned_weights_over_anew_without_training(labelled_session, capsys):
    """The share acts after training, so trying another needs no more iterations: last.pt is untouched,
    final.pt is its blend at the new share, and the records say no iteration ran and which share applies."""
    from ASFDALib.adaptation.blend import blend_state
    from ASFDALib.adaptation.pipeline import session_model

    args = ["--iterations", "4", "--pseudo-iterations", "2", "--batch-size", "1", "--min-agreement", "0"]
    assert main(["finetune", str(labelled_session), *args]) == 0
    folder = labelled_session / "checkpoints" / "round1"
    last = (folder / "last.pt").read_bytes()
    before = json.loads((labelled_session / "session.json").read_text())["rounds"][0]["metrics"]
    capsys.readouterr()
    assert main(["finetune", str(labelled_session), "--extend", "--blend-start", "0.4"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert (
        "stage 2 has run its 2 iterations, so nothing trains: the tuned weights (last.pt) are handed over blended "
        "with 40% of the round's starting weights"
    ) in said
    assert "Round 1 handed over anew, no iteration run" in said and "learning rates" not in said
    assert (folder / "last.pt").read_bytes() == last  # nothing trained
    source = session_model(Session.open(labelled_session), adapted=False)
    tuned = torch.load(folder / "last.pt", weights_only=True)["network"]
    expected = blend_state(tuned, source.network.state_dict(), 0.4, source.load_report.new)
    final = torch.load(folder / "final.pt", weights_only=True)
    assert all(torch.allclose(final[k].float(), expected[k].float(), atol=1e-6) for k in final)
    run = json.loads((folder / "run.json").read_text())
    assert run["done"] == {"stage1": 4, "stage2": 2} and run["finished"]
    assert (run["history"][-1]["mode"], run["history"][-1]["handover_blend"]) == ("extend", 0.4)
    assert run["history"][-1]["handover_anew"]
    assert "stage2" not in run["history"][-1]  # no iteration ran
    # the run's recipe is what trained it, with the new share (which a later extension goes on with)
    assert run["recipe"] == run["history"][0]["recipe"] | {"blend_start": 0.4}
    metrics = json.loads((labelled_session / "session.json").read_text())["rounds"][0]["metrics"]
    assert (metrics["handover_blend"], metrics["iterations"]) == (0.4, {"stage1": 4, "stage2": 2})
    kept = ("pseudo_teacher", "pseudo_augment", "pseudo_labelled", "pseudo_gate", "labelled")
    assert all(metrics[k] == before[k] for k in kept)  # what trained it, still
    # the share final.pt holds again: already as asked, so it succeeds, writing and recording nothing
    files = {p: p.read_bytes() for p in (folder / "final.pt", folder / "run.json", labelled_session / "session.json")}
    assert main(["finetune", str(labelled_session), "--extend", "--blend-start", "0.4"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "final.pt already holds 40% of round 1's start (--blend-start 0.4): nothing to do" in said
    assert all(p.read_bytes() == content for p, content in files.items())
    # but options it would ignore are refused whatever the share, as with another
    for option in (["--pseudo-gate", "flips"], ["--keep-fraction", "0.1"], ["--lr", "1e-3"]):
        assert main(["finetune", str(labelled_session), "--extend", "--blend-start", "0.4", *option]) == 1
        assert f"so {option[0]} would do nothing" in " ".join(capsys.readouterr().err.split())
    assert main(["finetune", str(labelled_session), "--extend"]) == 1
    assert "or --blend-start S to hand its stage 2 over anew" in " ".join(capsys.readouterr().err.split())
    # training options with it would do nothing
    assert main(["finetune", str(labelled_session), "--extend", "--blend-start", "0.1", "--lr", "1e-3"]) == 1
    assert "--extend with only --blend-start trains nothing, so --lr would do nothing" in capsys.readouterr().err
    # none at all: the tuned weights as they are
    assert main(["finetune", str(labelled_session), "--extend", "--blend-start", "0"]) == 0
    assert all(torch.equal(v, tuned[k]) for k, v in torch.load(folder / "final.pt", weights_only=True).items())


def test_a_resume_with_another_share_hands_over_with_it_and_keeps_it_for_the_next_extension(labelled_session, capsys):
    base = ["finetune", str(labelled_session), "--batch-size", "1", "--min-agreement", "0", "--checkpoint-every", "1"]
    assert main([*base, "--iterations", "4", "--pseudo-iterations", "2"]) == 0
    path = labelled_session / "checkpoints" / "round1" / "run.json"
    run = json.loads(path.read_text())
    run["targets"]["stage2"], run["finished"] = 3, False  # as if killed on the way to 3
    path.write_text(json.dumps(run))
    assert main(["finetune", str(labelled_session), "--resume", "--blend-start", "0.4"]) == 0
    run = json.loads(path.read_text())
    assert (run["history"][-1]["handover_blend"], run["recipe"]["blend_start"]) == (0.4, 0.4)
    capsys.readouterr()
    assert main(["finetune", str(labelled_session), "--extend", "--pseudo-iterations", "4"]) == 0
    assert "blended with 40% of the round's starting weights" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "gate, asked, pseudo_iterations, hint",
    [
        ("rounds", 0.2, 2, "; its final.pt already holds 20% of the round's start, another --blend-start hands it"),
        ("rounds", 0.3, 1, "; --blend-start S without --pseudo-iterations hands it over anew"),
        ("flips", 0.4, 2, "(no --blend-start applies to this round: the flips gate judged the pool, not the round's"),
        ("flips", 0.2, 2, "or --restart"),  # the run's own share, not asked for: nothing said of it
    ],
)
def test_an_extension_refused_for_no_new_iterations_says_what_a_handover_anew_could_do(
    tmp_path, gate, asked, pseudo_iterations, hint
):
    from dataclasses import replace

    from ASFDALib.adaptation.pipeline import check_mode
    from ASFDALib.adaptation.session import SessionError

    (tmp_path / "pseudo").mkdir()
    (tmp_path / "pseudo" / "pseudo.json").write_text(json.dumps({"gate": {"reliability": gate}, "kept": ["a"]}))
    run = {"finished": True, "done": {"stage1": 4, "stage2": 2}, "targets": {"stage1": 4, "stage2": 2}}
    held = 0.2 if gate == "rounds" else 0.0
    run["recipe"] = {"blend_start": 0.2}
    run["history"] = [{"mode": "new", "status": "done", "stage2_lr": "cosine", "handover_blend": held}]
    config = replace(FinetuneConfig(), iterations=4, pseudo_iterations=pseudo_iterations, blend_start=asked)
    with pytest.raises(SessionError) as refused:
        check_mode("extend", run, config, tmp_path, 1)
    said = str(refused.value)
    assert hint in said and ("applies" in hint or "no --blend-start applies" not in said)


def test_a_blend_asked_of_a_round_another_gate_made_points_to_a_restart():
    from ASFDALib.app.commands import check_gate_options
    from ASFDALib.errors import ASFDAError

    with pytest.raises(
        ASFDAError, match="this round.s gate is flips; leave it out, or add --restart --pseudo-gate rounds"
    ):
        check_gate_options("flips", None, None, None, 0.4, runs_gate=True)


@pytest.mark.parametrize(
    "options, refused",
    [
        (["--no-pseudo"], "--no-pseudo skips stage 2, so --blend-start would do nothing"),
        (["--pseudo-iterations", "0"], "--pseudo-iterations 0 skips stage 2, and the blend follows it"),
        (["--pseudo-gate", "flips"], "where the rounds gate keeps volumes (the start vouched for them), and the gate"),
    ],
)
def test_a_blend_share_the_run_would_not_use_is_refused_before_any_work(labelled_session, capsys, options, refused):
    assert main(["finetune", str(labelled_session), *options, "--blend-start", "0.3"]) == 1
    assert refused in " ".join(capsys.readouterr().err.split())
    assert not (labelled_session / "checkpoints" / "round1").exists()


@pytest.mark.parametrize("asked, teacher", [([], "ema"), (["--pseudo-teacher", "fixed"], "fixed")])
def test_where_the_fallback_judged_an_ema_teacher_labels_the_patches_and_an_extend_keeps_it(
    labelled_session, capsys, asked, teacher
):
    """The source model vouches for no MRI phantom, so the fallback judges (the confidence gate here, which
    always keeps some volumes): by default an EMA teacher then relabels the kept volumes' patches online, and
    the default copy-paste mix mixes only the fixed teacher's labels (named on an extension of an EMA teacher's
    run, it is refused)."""
    from ASFDALib.adaptation.pipeline import MIX_LINES

    args = ["--iterations", "4", "--pseudo-iterations", "2", "--batch-size", "1", "--pseudo-fallback", "confidence"]
    assert main(["finetune", str(labelled_session), *args, *asked]) == 0
    said = " ".join(capsys.readouterr().out.split())
    folder = labelled_session / "checkpoints" / "round1"
    pseudo = json.loads((folder / "pseudo" / "pseudo.json").read_text())
    assert pseudo["gate"]["asked"] == "rounds" and len(pseudo["kept"]) == 2
    stage2 = json.loads((folder / "run.json").read_text())["history"][0]  # the gate that judged, not the one asked
    assert (stage2["pseudo_gate"], stage2["pseudo_labelled"], stage2["recipe"]["reliability"]) == (
        "confidence",
        pseudo["kept"],
        "rounds",
    )
    ema = "an EMA teacher (the model's moving average) relabels the pseudo-labelled patches online; the fallback "
    fixed = "the gate's pseudo-labels teach as they were made (the fixed teacher, --pseudo-teacher)"
    assert (ema in said, fixed in said) == (teacher == "ema", teacher == "fixed")
    assert ("teacher" in torch.load(folder / "last.pt", weights_only=True)) == (teacher == "ema")
    # the fallback judged: contrast may be what changed, so half the patches go through intensity curves
    curves = "half the pseudo-labelled patches go through random intensity curves (--pseudo-augment): the fallback"
    assert curves in said
    # and the round's starting model vouched for none of it: the tuned weights are handed over unblended
    assert "handing over the tuned weights as they are: the confidence gate judged the pool, not the round's" in said
    final, last = torch.load(folder / "final.pt", weights_only=True), torch.load(folder / "last.pt", weights_only=True)
    assert all(torch.equal(final[k], last["network"][k]) for k in final)
    # an extension keeps the round's pseudo-labels and the teacher that labels them: it refuses another
    other = "fixed" if teacher == "ema" else "ema"
    extend = ["finetune", str(labelled_session), "--extend", "--pseudo-iterations", "4", "--batch-size", "1"]
    assert main([*extend, "--pseudo-teacher", other]) == 1
    assert (
        f"--extend keeps the round's pseudo-labels and the teacher that labels them, so --pseudo-teacher {other} "
        f"(it had {teacher}) would change it part-way; leave it out, or --restart to train the round with it"
    ) in " ".join(capsys.readouterr().err.split())
    # and goes on with the teacher the run had, whatever the default
    assert main(extend) == 0
    run = json.loads((folder / "run.json").read_text())
    assert [h["teacher"] for h in run["history"]] == [teacher, teacher] and run["done"]["stage2"] == 4
    assert [h["pseudo_augment"] for h in run["history"]] == ["remap", "remap"]
    # an EMA teacher's voxel gate is recorded with it, and kept
    assert [h.get("confidence") for h in run["history"]] == [0.9, 0.9] if teacher == "ema" else [None, None]
    metrics = json.loads((labelled_session / "session.json").read_text())["rounds"][0]["metrics"]
    assert (metrics["pseudo_teacher"], metrics["pseudo_augment"]) == (teacher, "remap")
    # the default mix (copy-paste) mixes only the fixed teacher's labels: the EMA teacher's patches are not mixed
    assert metrics["pseudo_mix"] == ("copy-paste" if teacher == "fixed" else "none")
    assert (MIX_LINES["copy-paste"] in said, MIX_LINES["none"] in said) == (teacher == "fixed", teacher == "ema")
    # an extension may augment and mix otherwise, and says so; under the run's EMA teacher a mix named would do
    # nothing and is refused before any work
    capsys.readouterr()
    more = ["finetune", str(labelled_session), "--extend", "--pseudo-iterations", "6", "--batch-size", "1"]
    if teacher == "ema":  # the way on it names is a restart: the extension refuses another teacher
        assert main([*more, "--pseudo-mix", "copy-paste"]) == 1
        assert (
            f"{labelled_session}: the run's stage 2 has the EMA teacher, which --extend keeps, and it labels each "
            "patch online, so --pseudo-mix copy-paste would do nothing; leave it out, or --restart with "
            "--pseudo-teacher fixed to mix the fixed teacher's labels"
        ) in " ".join(capsys.readouterr().err.split())
    assert main([*more, "--pseudo-augment", "strong", *(["--pseudo-mix", "none"] * (teacher == "fixed"))]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "the extension augments them as strong, where the run's stage 2 had remap; run.json lists both" in said
    assert MIX_LINES["copy-paste"] not in said
    changed = "the extension's mix of them is none, where the run's stage 2 had copy-paste; run.json lists both"
    assert (changed in said) == (teacher == "fixed")
    metrics = json.loads((labelled_session / "session.json").read_text())["rounds"][0]["metrics"]
    assert metrics["pseudo_mix"] == "none"
    # and the next extension goes on with that mix, whatever the default
    assert main([*more[:-4], "--pseudo-iterations", "8", "--batch-size", "1"]) == 0
    run = json.loads((folder / "run.json").read_text())
    ran = ("copy-paste", "none") if teacher == "ema" else ("none", "none")  # asked, and what ran
    assert [(h["pseudo_mix_asked"], h["pseudo_mix"]) for h in run["history"][1:]] == [
        ("copy-paste", "copy-paste" if teacher == "fixed" else "none"),
        ran,
        ran,
    ]
    # a restart sets the run aside, and the record still says who taught it and how its patches were augmented
    assert main(["finetune", str(labelled_session), "--restart", "--iterations", "2", "--no-pseudo"]) == 0
    replaced = json.loads((labelled_session / "session.json").read_text())["rounds"][0]["replaced"]
    assert (replaced[0]["pseudo_teacher"], replaced[0]["pseudo_augment"]) == (teacher, "strong")
    assert replaced[0]["pseudo_mix"] == "none"


RAN = {"stage2_lr": "cosine", "pseudo_augment": "strong", "teacher": "ema"}
# what a resume also keeps: the run's targets and the batch size, learning rate and seed it started with
STARTED = {
    "iterations": 6,
    "pseudo_iterations": 4,
    "batch_size": 2,
    "lr": 0.001,
    "seed": 3,
    "reliability": "rounds",
    "blend_start": 0.2,
}


@pytest.mark.parametrize(
    "mode, options, refused",
    [
        (
            "resume",
            {"stage2_lr": "constant"},
            "--resume continues the run as it ran, so --stage2-lr constant (it had cosine)",
        ),
        (
            "resume",
            {"pseudo_teacher": "fixed"},
            "--resume continues the run as it ran, so --pseudo-teacher fixed (it had ema)",
        ),
        ("resume", {"pseudo_teacher": "ema-if-fallback"}, ""),  # the fallback judged: the same teacher
        ("resume", {"pseudo_mix": "copy-paste"}, ""),  # the EMA teacher labels online: nothing is mixed either way
        ("extend", {"pseudo_mix": "copy-paste"}, ""),  # an extension may change it
        ("resume", {"stage2_lr": "cosine", "pseudo_augment": "strong"}, ""),  # the run's own, named
        ("extend", {"stage2_lr": "constant", "pseudo_augment": "weak"}, ""),  # an extension may change them
        ("extend", {"pseudo_teacher": "fixed"}, "--extend keeps the round's pseudo-labels and the teacher"),
        ("new", {"pseudo_teacher": "fixed"}, ""),
        ("resume", {"lr": 0.1, "batch_size": 1}, "so --batch-size 1 (it had 2) and --lr 0.1 (it had 0.001)"),
        ("resume", {"iterations": 8}, "so --iterations 8 (it had 6) would change it part-way"),
        ("resume", {"pseudo_iterations": 2}, "so --pseudo-iterations 2 (it had 4)"),
        ("resume", {"seed": 0}, "so --seed 0 (it had 3)"),
        ("resume", {"reliability": "flips"}, "so --pseudo-gate flips (it had rounds)"),  # killed before it judged
        ("resume", {"no_pseudo": True}, "so --no-pseudo (it has a stage 2 of 4 iterations) would change it"),
        ("resume", {"iterations": 6, "lr": 0.001, "seed": 3}, ""),  # the run's own, named
        ("extend", {"lr": 0.1, "iterations": 8}, ""),  # an extension trains on with what it is given
        ("resume", {"blend_start": 0.5}, ""),  # the share acts at the handover: a resume may take another
        ("extend", {"blend_start": 0.0}, ""),
    ],
)
def test_a_resume_refuses_another_length_rate_seed_or_stage_2_recipe_and_an_extend_another_teacher(
    tmp_path, mode, options, refused
):
    import argparse
    import re

    from ASFDALib.app.commands import refuse_changes_part_way
    from ASFDALib.errors import ASFDAError

    pseudo = tmp_path / "pseudo.json"
    made = {"gate": {"reliability": "flips", "asked": "rounds"}, "kept": ["a"], "reliability": {"a": 0.6}}
    pseudo.write_text(json.dumps(made))
    args = argparse.Namespace(
        session="S", mode=mode, **({"stage2_lr": None, "pseudo_augment": None, "pseudo_teacher": None} | options)
    )
    if refused:
        with pytest.raises(ASFDAError, match=re.escape(refused)):
            refuse_changes_part_way(args, RAN | STARTED, pseudo)
    else:
        refuse_changes_part_way(args, RAN | STARTED, pseudo)


@pytest.mark.parametrize(
    "change, refused",
    [
        ({"stage2_lr": "constant"}, "stage2_lr constant (it had cosine)"),
        ({"pseudo_augment": "weak"}, "pseudo_augment weak (it had strong)"),
        ({"teacher": "fixed"}, "teacher fixed (it had ema)"),
        ({"ema_weight": 1.0}, "ema_weight 1.0 (it had 0.5)"),
        ({"teacher": "ema-if-fallback"}, ""),  # the fallback judged: the same teacher labels
        ({"teacher": "ema"}, ""),
        ({"pseudo_mix": "copy-paste"}, ""),  # the EMA teacher labels online: nothing is mixed either way
        ({"blend_start": 0.5}, ""),  # the blend acts at the handover, after the training
    ],
)
def test_the_engine_refuses_a_resume_with_another_stage_2_recipe_as_the_command_line_does(tmp_path, change, refused):
    """API and panel callers pass a config, not options: the engine holds a resume to stage 2's own recipe."""
    from dataclasses import replace

    from ASFDALib.adaptation.pipeline import check_mode
    from ASFDALib.adaptation.recipe import FinetuneConfig
    from ASFDALib.adaptation.session import SessionError

    (tmp_path / "pseudo").mkdir()
    made = {"gate": {"reliability": "flips", "asked": "rounds"}, "kept": ["a"]}
    (tmp_path / "pseudo" / "pseudo.json").write_text(json.dumps(made))
    ran = {"stage2_lr": "cosine", "pseudo_augment": "strong", "teacher": "ema", "confidence": 0.9, "ema_weight": 0.5}
    run = {"finished": False, "done": {"stage1": 6, "stage2": 2}, "targets": {"stage1": 6, "stage2": 4}}
    run["history"] = [{"mode": "new", "status": "interrupted", **ran}]
    config = replace(FinetuneConfig(), **({k: v for k, v in ran.items() if k != "teacher"} | change))
    if refused:
        with pytest.raises(SessionError, match=re.escape(refused)):
            check_mode("resume", run, config, tmp_path, 1)
    else:
        assert check_mode("resume", run, config, tmp_path, 1) == "resume"


def test_a_teacher_named_with_a_resume_is_compared_as_it_would_label_the_rounds_pseudo_labels(tmp_path):
    import argparse

    from ASFDALib.app.commands import refuse_changes_part_way

    pseudo = tmp_path / "pseudo.json"
    args = argparse.Namespace(session="S", mode="resume", stage2_lr=None, pseudo_augment=None)
    asked = {"stage2_lr": "cosine", "pseudo_augment": "strong", "teacher": "ema-if-fallback"}  # killed unresolved
    pseudo.write_text(json.dumps({"gate": {"reliability": "flips", "asked": "rounds"}, "kept": ["a"]}))
    refuse_changes_part_way(argparse.Namespace(**vars(args), pseudo_teacher="ema-if-fallback"), asked, pseudo)
    refuse_changes_part_way(argparse.Namespace(**vars(args), pseudo_teacher="ema"), asked, pseudo)  # the same here
    # with no volume kept no teacher labels anything, so none named changes the run
    pseudo.write_text(json.dumps({"gate": {"reliability": "flips", "asked": "rounds"}, "kept": []}))
    refuse_changes_part_way(argparse.Namespace(**vars(args), pseudo_teacher="fixed"), RAN, pseudo)


@pytest.mark.parametrize(
    "history, recipe",
    [
        ([{"mode": "new"}], {}),  # stage 2 never ran
        # recorded before the augmentation, the teacher and the mix were choices: weak, fixed, none
        (
            [{"stage2_lr": "constant", "stage2": [0, 2]}],
            {"stage2_lr": "constant", "pseudo_augment": "weak", "teacher": "fixed", "pseudo_mix": "none"},
        ),
        # killed before the gate judged: the teacher as asked
        (
            [{"stage2_lr": "cosine", "pseudo_augment": "strong", "teacher_asked": "fixed"}],
            {"stage2_lr": "cosine", "pseudo_augment": "strong", "teacher": "fixed", "pseudo_mix": "none"},
        ),
        # an extension after a run whose fallback judged: the teacher that ran
        (
            [
                {"stage2_lr": "cosine", "pseudo_augment": "strong", "teacher": "ema", "stage2": [0, 2]},
                {"stage2_lr": "constant", "pseudo_augment": "strong", "teacher": "ema", "stage2": [2, 4]},
            ],
            {"stage2_lr": "constant", "pseudo_augment": "strong", "teacher": "ema", "pseudo_mix": "none"},
        ),
        # nothing passed the gate, so none ran: a continued run goes on with the ones asked for
        (
            [
                {
                    "stage2_lr": "cosine",
                    "pseudo_augment": "none",
                    "pseudo_augment_asked": "remap-if-fallback",
                    "teacher": "none",
                    "teacher_asked": "ema-if-fallback",
                    "pseudo_mix": "none",
                    "pseudo_mix_asked": "copy-paste",
                    "stage2": [0, 2],
                }
            ],
            {
                "stage2_lr": "cosine",
                "pseudo_augment": "remap-if-fallback",
                "teacher": "ema-if-fallback",
                "pseudo_mix": "copy-paste",
            },
        ),
        # the mix asked for, which resolves by the teacher (here the EMA one, so none ran)
        (
            [{"stage2_lr": "cosine", "teacher": "ema", "pseudo_mix": "none", "pseudo_mix_asked": "copy-paste"}],
            {"stage2_lr": "cosine", "pseudo_augment": "weak", "teacher": "ema", "pseudo_mix": "copy-paste"},
        ),
        # an EMA teacher's voxel gate, from the run that recorded it; recorded before its weight was a choice: 1
        (
            [
                {"stage2_lr": "cosine", "teacher": "ema", "confidence": 0.8, "stage2": [0, 2]},
                {"stage2_lr": "cosine", "teacher_asked": "ema"},
            ],
            {"stage2_lr": "cosine", "pseudo_augment": "weak", "teacher": "ema", "pseudo_mix": "none"}
            | {"confidence": 0.8, "ema_weight": 1.0},
        ),
        # and its weight, once recorded
        (
            [{"stage2_lr": "cosine", "teacher": "ema", "confidence": 0.9, "ema_weight": 0.5, "stage2": [0, 2]}],
            {"stage2_lr": "cosine", "pseudo_augment": "weak", "teacher": "ema", "pseudo_mix": "none"}
            | {"confidence": 0.9, "ema_weight": 0.5},
        ),
    ],
)
def test_a_continued_run_reads_how_its_stage_2_ran_from_the_record(history, recipe):
    from ASFDALib.adaptation.runs import stage2_recipe

    assert stage2_recipe({"history": history}) == recipe


def test_a_run_whose_stage_2_ran_before_its_recipe_was_recorded_goes_on_as_it_ran_then():
    """Records made before 2026-12-04 name no stage-2 recipe: such a run's stage 2 held its rate and trained on
    weakly augmented, unmixed patches the fixed teacher labelled, and a resume or extension keeps that."""
    from ASFDALib.adaptation.runs import stage2_recipe

    history = [{"mode": "new", "status": "done", "stage1": [0, 200], "stage2": [0, 200]}]
    assert stage2_recipe({"history": history, "done": {"stage1": 200, "stage2": 200}}) == {
        "stage2_lr": "constant",
        "pseudo_augment": "weak",
        "teacher": "fixed",
        "pseudo_mix": "none",
    }
    # killed in stage 1 or early in stage 2 (``done`` behind): the stage 2 it planned is the one it would have run
    killed = {"history": history, "done": {"stage1": 200, "stage2": 0}, "targets": {"stage1": 200, "stage2": 200}}
    assert stage2_recipe(killed)["pseudo_mix"] == "none"
    # no stage 2 planned or run: nothing to keep, today's defaults apply
    assert stage2_recipe({"history": history[:1], "done": {"stage1": 200, "stage2": 0}}) == {}


def test_where_the_source_model_vouches_for_no_volume_the_flipped_views_judge_by_default(labelled_session, capsys):
    """The default gate is agreement with the round's starting model: the default model finds little on MRI
    phantoms, so no volume reaches the floor, and its fallback, agreement under flips, judges instead (here a
    model trained for 4 iterations is not consistent enough under flips either)."""
    args = ["--iterations", "4", "--pseudo-iterations", "2", "--batch-size", "1"]
    assert main(["finetune", str(labelled_session), *args]) == 0
    said = " ".join(capsys.readouterr().out.split())
    pseudo = json.loads((labelled_session / "checkpoints" / "round1" / "pseudo" / "pseudo.json").read_text())
    gate, best = pseudo["gate"], max(pseudo["reliability"].values())
    assert gate == {"reliability": "flips", "keep_fraction": 0.5, "min_agreement": 0.5} | {
        "asked": "rounds",
        "asked_best": gate["asked_best"],
        "asked_floor": 0.5,
    }
    assert 0 < gate["asked_best"] < 0.5 and pseudo["kept"] == [] and best < 0.5
    n = len(pseudo["reliability"])  # how far each gate got: its first and last volume at least
    for told in ("the rounds gate: 1 of", f"the rounds gate: {n} of {n}", f"the flips gate: {n} of {n}"):
        assert told in said
    assert (
        "no unlabeled volume passed the flips gate: stage 2 trains on the labels alone (the adapted model's flipped "
        f"views agree at most {best:.2f} on any volume, class-balanced Dice, below the floor of 0.5, "
        "--min-agreement; no volume reached the rounds gate's floor (the adapted model agrees with the model the "
        f"round started from at most {gate['asked_best']:.2f}), so the flips gate judged instead (--pseudo-fallback))"
    ) in said
    metrics = json.loads((labelled_session / "session.json").read_text())["rounds"][0]["metrics"]
    assert metrics["pseudo_gate"] == gate and metrics["pseudo_labelled"] == []
    # no pseudo-label, so no teacher labelled anything and nothing was augmented: the record says none ran
    run = json.loads((labelled_session / "checkpoints" / "round1" / "run.json").read_text())
    ran = {k: run["history"][0][k] for k in ("teacher_asked", "teacher", "pseudo_augment_asked", "pseudo_augment")}
    assert ran == {
        "teacher_asked": "ema-if-fallback",
        "teacher": "none",
        "pseudo_augment_asked": "remap-if-fallback",
        "pseudo_augment": "none",
    }
    assert "pseudo_teacher" not in metrics and metrics["handover_blend"] == 0.0  # the share applied: none
    assert run["recipe"]["blend_start"] == 0.2  # though asked for


@pytest.mark.parametrize(
    "gate, kept, said",
    [
        (
            {"reliability": "flips", "min_agreement": 0.5, "asked": "rounds", "asked_best": 0.12},
            2,
            "no volume reached the rounds gate's floor (the adapted model agrees with the model the round started "
            "from at most 0.12), so the flips gate judged instead (--pseudo-fallback): 2 of 3 unlabeled volumes "
            "reached the flips gate's floor (0.5); the 2 that agree most get pseudo-labels (--keep-fraction 0.5)",
        ),
        (  # a confidence fallback has no floor of its own: the asked gate's is recorded beside it
            {"reliability": "confidence", "confidence": 0.9, "asked": "flips", "asked_best": 0.498, "asked_floor": 0.5},
            1,
            "no volume reached the flips gate's floor (the adapted model's flipped views agree at most 0.498), so "
            "the confidence gate judged instead (--pseudo-fallback): 1 of 3 unlabeled volumes get pseudo-labels: "
            "the most reliable by the confidence gate (--keep-fraction 0.5)",
        ),
    ],
)
def test_a_fallback_that_judged_says_which_gate_was_asked_and_how_near_it_came(gate, kept, said):
    from ASFDALib.adaptation.pipeline import AdaptResult, _passed

    result = AdaptResult(status="done", checkpoint=None, gate={"keep_fraction": 0.5, **gate})
    result.reliability = {"a": 0.9, "b": 0.7, "c": 0.2}
    assert _passed(result, kept) == said


def test_without_a_fallback_no_volume_gets_pseudo_labels_where_the_source_model_vouches_for_none(
    labelled_session, capsys
):
    args = ["--iterations", "4", "--pseudo-iterations", "2", "--batch-size", "1", "--pseudo-fallback", "none"]
    assert main(["finetune", str(labelled_session), *args]) == 0
    said = " ".join(capsys.readouterr().out.split())
    pseudo = json.loads((labelled_session / "checkpoints" / "round1" / "pseudo" / "pseudo.json").read_text())
    assert pseudo["gate"] == {"reliability": "rounds", "keep_fraction": 0.5, "min_agreement": 0.5, "fallback": "none"}
    best = max(pseudo["reliability"].values())
    assert pseudo["kept"] == [] and best < 0.5
    assert (
        "no unlabeled volume passed the rounds gate: stage 2 trains on the labels alone (the adapted model agrees "
        f"with the model the round started from at most {best:.2f} on any volume, class-balanced Dice, below the "
        "floor of 0.5, --min-agreement; no fallback gate judged: --pseudo-fallback none). To judge by the adapted "
        "model's confidence instead: --restart --pseudo-gate confidence (in the panel: Pseudo-label gate "
        "confidence, then Train again); --no-pseudo skips stage 2"
    ) in said


def test_a_round_says_how_many_volumes_reached_the_floor_and_how_many_the_kept_share_took(labelled_session, capsys):
    args = ["--iterations", "4", "--pseudo-iterations", "2", "--batch-size", "1", "--min-agreement", "0"]
    assert main(["finetune", str(labelled_session), *args]) == 0
    pseudo = json.loads((labelled_session / "checkpoints" / "round1" / "pseudo" / "pseudo.json").read_text())
    reached = sum(score > 0 for score in pseudo["reliability"].values())
    assert (
        f"{reached} of 5 unlabeled volumes reached the rounds gate's floor (0); the {len(pseudo['kept'])} that "
        "agree most get pseudo-labels (--keep-fraction 0.5)"
    ) in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--no-pseudo", "--pseudo-gate", "confidence"],
            "--no-pseudo skips stage 2, so --pseudo-gate would do nothing",
        ),
        (["--no-pseudo", "--min-agreement", "0.7"], "--no-pseudo skips stage 2, so --min-agreement would do nothing"),
        (
            ["--confidence", "0.95"],
            "--confidence is the voxel threshold of the confidence gate, and the gate is rounds",
        ),
        (["--pseudo-gate", "confidence", "--min-agreement", "0.7"], "--min-agreement is the floor of the flips and"),
        (
            ["--no-pseudo", "--pseudo-augment", "weak"],
            "--no-pseudo skips stage 2, so --pseudo-augment would do nothing",
        ),
        (
            ["--no-pseudo", "--pseudo-teacher", "ema", "--pseudo-mix", "copy-paste"],
            "--no-pseudo skips stage 2, so --pseudo-mix and --pseudo-teacher would do nothing",
        ),
        (
            ["--pseudo-gate", "confidence", "--pseudo-fallback", "flips"],
            "--pseudo-fallback judges when the gate keeps no volume, and the confidence gate always keeps some",
        ),
        (["--pseudo-gate", "flips", "--pseudo-fallback", "flips"], "--pseudo-fallback flips is the gate itself"),
        (
            ["--pseudo-teacher", "ema", "--pseudo-mix", "copy-paste"],
            "--pseudo-mix copy-paste mixes the labels a fixed teacher made before stage 2, and the EMA teacher labels",
        ),
        (
            ["--no-pseudo", "--pseudo-iterations", "50", "--keep-fraction", "0.3", "--stage2-lr", "constant"],
            "--no-pseudo skips stage 2, so --keep-fraction and --pseudo-iterations and --stage2-lr would do nothing",
        ),
    ],
)
def test_a_pseudo_label_option_that_would_do_nothing_is_refused_before_any_work(
    labelled_session, capsys, options, message
):
    assert main(["finetune", str(labelled_session), "--iterations", "2", *options]) == 1
    assert message in capsys.readouterr().err
    assert not (labelled_session / "checkpoints").exists()


def test_a_round_with_no_reliable_volume_spends_stage_2_on_the_labels_alone(labelled_session, capsys):
    args = ["--iterations", "4", "--pseudo-iterations", "2", "--batch-size", "1", "--pseudo-gate", "rounds"]
    assert main(["finetune", str(labelled_session), *args, "--min-agreement", "1", "--pseudo-fallback", "none"]) == 0
    assert "no unlabeled volume passed the rounds gate: stage 2 trains on the labels alone" in capsys.readouterr().out
    run = json.loads((labelled_session / "checkpoints" / "round1" / "run.json").read_text())
    assert run["done"] == {"stage1": 4, "stage2": 2}
    entry = json.loads((labelled_session / "session.json").read_text())["rounds"][0]
    assert entry["metrics"]["pseudo_labelled"] == []
    assert entry["metrics"]["pseudo_gate"] == {
        "reliability": "rounds",
        "keep_fraction": 0.5,
        "min_agreement": 1.0,
        "fallback": "none",
    }


def test_a_round_says_that_stage_2_decays_its_rate(labelled_session, capsys):
    args = ["--iterations", "2", "--pseudo-iterations", "2", "--batch-size", "1", "--stage2-lr", "cosine"]
    assert main(["finetune", str(labelled_session), *args]) == 0
    assert "stage 2 decays them to zero along a cosine over its 2 iterations" in " ".join(
        capsys.readouterr().out.split()
    )
    run = json.loads((labelled_session / "checkpoints" / "round1" / "run.json").read_text())
    assert run["history"][0]["stage2_lr"] == "cosine" and run["history"][0]["pseudo_augment"] == "strong"


def test_an_extend_keeps_the_stage_2_schedule_the_run_had_and_records_the_base_rates(labelled_session):
    from ASFDALib.adaptation.recipe import AUGMENTS, STAGE2_LR, FinetuneConfig

    other = next(s for s in STAGE2_LR if s != FinetuneConfig.stage2_lr)  # not the default, so it must be kept
    augment = next(a for a in AUGMENTS if a != FinetuneConfig.pseudo_augment)  # likewise
    args = ["--iterations", "2", "--pseudo-iterations", "2", "--batch-size", "1", "--stage2-lr", other]
    assert main(["finetune", str(labelled_session), *args, "--pseudo-augment", augment]) == 0
    assert main(["finetune", str(labelled_session), "--extend", "--pseudo-iterations", "4", "--batch-size", "1"]) == 0
    run = json.loads((labelled_session / "checkpoints" / "round1" / "run.json").read_text())
    first, extend = run["history"]
    assert first["stage2_lr"] == extend["stage2_lr"] == other and run["done"] == {"stage1": 2, "stage2": 4}
    assert first["pseudo_augment"] == extend["pseudo_augment"] == augment
    # the base rates, not the rate a checkpoint's optimizer held at its last step
    assert extend["learning_rates"] == first["learning_rates"]


def test_an_extend_keeps_the_rounds_pseudo_labels_and_a_restart_makes_them_with_another_gate(labelled_session, capsys):
    pseudo = labelled_session / "checkpoints" / "round1" / "pseudo" / "pseudo.json"
    args = ["--iterations", "4", "--pseudo-iterations", "2", "--batch-size", "1"]
    assert main(["finetune", str(labelled_session), *args, "--pseudo-gate", "rounds", "--min-agreement", "0"]) == 0
    made = json.loads(pseudo.read_text())
    # an extend trains on what the round made: naming a gate for it is refused before any work, naming none
    # trains on the round's pseudo-labels and says so
    extend = ["--extend", "--pseudo-iterations", "4", "--batch-size", "1"]
    capsys.readouterr()
    assert main(["finetune", str(labelled_session), *extend, "--pseudo-gate", "confidence"]) == 1
    assert (
        "round 1's pseudo-labels are made, and --extend keeps them, so --pseudo-gate would do nothing; leave it out, "
        "or --restart to make them anew"
    ) in " ".join(capsys.readouterr().err.split())
    assert json.loads((labelled_session / "checkpoints" / "round1" / "run.json").read_text())["done"]["stage2"] == 2
    assert main(["finetune", str(labelled_session), *extend]) == 0
    said = " ".join(capsys.readouterr().out.split())
    kept = len(made["kept"])
    assert f"stage 2 keeps this round's {kept} pseudo-labelled volumes, made by the rounds gate" in said
    assert "reached the" not in said  # the gate did not run again
    assert json.loads(pseudo.read_text()) == made
    # a restart makes them anew, with the gate asked for
    assert main(["finetune", str(labelled_session), *args, "--restart", "--pseudo-gate", "confidence"]) == 0
    assert json.loads(pseudo.read_text())["gate"]["reliability"] == "confidence"
    entry = json.loads((labelled_session / "session.json").read_text())["rounds"][0]
    assert entry["metrics"]["pseudo_gate"]["reliability"] == "confidence"
    # the set-aside run's record says what its stage 2 trained on
    aside = entry["replaced"][0]
    assert aside["pseudo_gate"]["reliability"] == "rounds" and aside["pseudo_labelled"] == made["kept"]


def test_the_run_records_the_learning_rates_the_optimizer_used(adapted_session):
    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.loading import load_model

    _, session, _ = adapted_session
    run = json.loads((session / "checkpoints" / "round1" / "run.json").read_text())
    rates = {r["group"]: r for r in run["history"][0]["learning_rates"]}
    recipe, parameters = FinetuneConfig(), len(list(load_model(default_model_path()).network.parameters()))
    # the built-in model loads whole: every parameter is pre-trained and takes the lower rate
    lower = recipe.lr * recipe.encoder_lr_scale
    assert rates == {"pretrained": {"group": "pretrained", "lr": lower, "tensors": parameters}}
    assert run["history"][0]["lower_rate_for"] == "loaded"
    assert run["history"][0]["stage2_lr"] == recipe.stage2_lr


def test_predictions_are_in_the_input_grid_and_format(adapted_session, tmp_path):
    import SimpleITK as sitk

    from ASFDALib.bench.phantoms import make_phantom
    from ASFDALib.data.volumes import read_volume

    _, session, _ = adapted_session
    image, _, _ = make_phantom(77, __import__("ASFDALib.bench.phantoms", fromlist=["x"]).domain_config("mri"))
    nrrd = sitk.GetImageFromArray(np.round(image[:, :, ::2]).astype(np.int16).transpose(2, 1, 0))
    nrrd.SetSpacing((2.0, 2.0, 4.0))
    nrrd.SetOrigin((5.0, -3.0, 10.0))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(nrrd, str(tmp_path / "in" / "scan.nrrd"))
    assert main(["predict", str(session), "--images", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    pred, src = read_volume(tmp_path / "out" / "scan.nrrd"), read_volume(tmp_path / "in" / "scan.nrrd")
    assert pred.array.shape == src.array.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
    assert set(np.unique(pred.array)) <= {0, 1, 2, 3} and pred.array.any()
    # a header with its data in a second file (.nhdr, .mhd): the map is the one-file form, and the record knows it
    (tmp_path / "detached").mkdir()
    sitk.WriteImage(nrrd, str(tmp_path / "detached" / "case 4.nhdr"))
    sitk.WriteImage(nrrd, str(tmp_path / "detached" / "y.mhd"))
    out = tmp_path / "out2"
    assert main(["predict", str(session), "--images", str(tmp_path / "detached"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["asfda_predictions.json", "case 4.nrrd", "y.mha"]
    record = json.loads((out / "asfda_predictions.json").read_text())
    assert set(record["made_from"]) == {"case 4.nrrd", "y.mha"} and set(record["made_by"]) == {"case 4.nrrd", "y.mha"}
    assert read_volume(out / "y.mha").array.shape == src.array.shape
    sitk.WriteImage(nrrd, str(tmp_path / "detached" / "y.mha"))  # y.mhd's map would be y.mha's too: refused first
    assert main(["predict", str(session), "--images", str(tmp_path / "detached"), "--out", str(tmp_path / "o3")]) == 1
    assert not (tmp_path / "o3").exists()


def test_predict_skips_a_link_that_loops_with_its_reason_as_rank_does(adapted_session, mri_pool, tmp_path, capsys):
    _, session, _ = adapted_session
    (tmp_path / "in").mkdir()
    shutil.copy(sorted((mri_pool / "images").iterdir())[0], tmp_path / "in" / "a.nii.gz")
    os.symlink(tmp_path / "in" / "loop b.nii.gz", tmp_path / "in" / "loop a.nii.gz")
    os.symlink(tmp_path / "in" / "loop a.nii.gz", tmp_path / "in" / "loop b.nii.gz")
    capsys.readouterr()
    assert main(["predict", str(session), "--images", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "Wrote 1 label maps" in said and "skipped" in said and "loop a.nii.gz" in said
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "asfda_predictions.json"]


def test_exported_bundle_loads_through_monai_and_predicts_the_same_labels(adapted_session, mri_pool, tmp_path):
    from monai.bundle import ConfigParser

    from ASFDALib.adaptation.pipeline import session_model
    from ASFDALib.data.preprocess import preprocess
    from ASFDALib.data.volumes import read_volume
    from ASFDALib.inference.predict import predict_label
    from ASFDALib.models.loading import load_model

    _, session, _ = adapted_session
    assert main(["export", str(session), "--format", "bundle", "--out", str(tmp_path / "bundle")]) == 0
    parser = ConfigParser()
    parser.read_config(str(tmp_path / "bundle" / "configs" / "inference.json"))
    parser.read_meta(str(tmp_path / "bundle" / "configs" / "metadata.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(tmp_path / "bundle" / "models" / "model.pt", weights_only=True))
    data = parser.get_parsed_content("preprocessing")({"image": str(sorted((mri_pool / "images").iterdir())[0])})
    inferer = parser.get_parsed_content("inferer")
    with torch.no_grad():
        monai_label = inferer(data["image"][None].float(), network.eval()).argmax(1)[0].numpy()
    model = session_model(Session.open(session))
    ours = preprocess(read_volume(sorted((mri_pool / "images").iterdir())[0]), model.card)
    our_label = predict_label(model.network, ours, model.card, "cpu")
    assert monai_label.shape == our_label.shape
    # MONAI averages overlapping windows; ASFDA takes each voxel from its most central window (the sweep's
    # rule, so prediction equals the scored segmentation). They differ only near window borders.
    assert (monai_label == our_label).mean() > 0.97
    assert load_model(tmp_path / "bundle").card.class_names == model.card.class_names  # and ASFDA reads it back


def test_torchscript_export_needs_trust_to_load_back(adapted_session, tmp_path):
    from ASFDALib.errors import TrustRequiredError
    from ASFDALib.models.loading import load_model

    _, session, _ = adapted_session
    assert main(["export", str(session), "--format", "torchscript", "--out", str(tmp_path / "m.ts")]) == 0
    with pytest.raises(TrustRequiredError):
        load_model(tmp_path / "m.ts")
    assert load_model(tmp_path / "m.ts", trust=True).card.num_classes == 4


def test_next_round_ranks_with_the_adapted_model_and_counts_labels_in_diversity(adapted_session, capsys):
    _, session, query = adapted_session
    assert main(["rank", "--out", str(session), "--budget", "1"]) == 0
    assert "adapted in this session" in capsys.readouterr().out
    report = json.loads((session / "ranking.json").read_text())
    statuses = {r["file"]: r["status"] for r in report["rows"]}
    assert {f for f, s in statuses.items() if s == "labelled"} == set(query)
    assert report["selected"][0] not in query
    assert report["knowledge"] == "bn"  # the base model's BatchNorm statistics, not the adapted ones
    rounds = json.loads((session / "session.json").read_text())["rounds"]
    assert len(rounds) == 2 and rounds[1]["query"] == report["selected"]
    # ranking.* are round 2's now; each round keeps its own
    kept = {i: json.loads((session / "rankings" / f"round{i}" / "ranking.json").read_text()) for i in (1, 2)}
    assert kept[1]["selected"] == rounds[0]["query"] and kept[2] == report
    assert (session / "rankings" / "round1" / "ranking.csv").is_file()


def test_labels_status_lists_missing_labels(adapted_session, capsys):
    _, session, _ = adapted_session
    assert main(["labels", str(session)]) == 0
    assert "missing" in capsys.readouterr().out  # the round-2 query is not labelled yet


def test_finetune_without_labels_says_what_to_do(tmp_path, mri_pool, capsys):
    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(tmp_path / "s")]) == 0
    assert main(["finetune", str(tmp_path / "s")]) == 1
    assert "no labels yet" in capsys.readouterr().err


def test_a_refused_label_import_keeps_the_session_intact(tmp_path, mri_pool, capsys):
    from ASFDALib.data.volumes import write_nifti

    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(tmp_path / "s")]) == 0
    before = (tmp_path / "s" / "session.json").read_text()
    name = sorted((mri_pool / "images").iterdir())[0].name
    (tmp_path / "bad").mkdir()
    write_nifti(tmp_path / "bad" / name, np.zeros((5, 5, 5), np.uint8), np.eye(4))
    assert main(["labels", "import", str(tmp_path / "s"), "--from", str(tmp_path / "bad")]) == 1
    assert "differs from the image's" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "session.json").read_text())["labels"] == json.loads(before)["labels"]
    assert not (tmp_path / "s" / "labels").exists() or not list((tmp_path / "s" / "labels").iterdir())


def test_a_re_rank_counts_what_it_swept_as_its_progress_does_then_what_it_ranked_and_what_is_labelled(
    labelled_session, capsys
):
    capsys.readouterr()
    assert main(["rank", "--out", str(labelled_session)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "6 volumes swept (6 from cache): 5 ranked, 1 labelled; 0 skipped;" in out


def test_a_label_import_of_only_unqueried_labels_once_the_query_is_labelled_says_so_and_succeeds(
    tmp_path, mri_pool, capsys
):
    """Every queried volume labelled already, a second folder holding only other cases' labels: nothing of the
    query is left to import, which is said (the other files are named as not asked for) and no failure."""
    session = tmp_path / "s"
    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(session), "--budget", "2"]) == 0
    query = json.loads((session / "ranking.json").read_text())["selected"]
    assert main(["labels", "import", str(session), "--from", str(mri_pool / "labels")]) == 0
    other = next(p for p in sorted((mri_pool / "labels").iterdir()) if p.name not in query)
    (tmp_path / "more").mkdir()
    shutil.copy(other, tmp_path / "more" / other.name)
    capsys.readouterr()
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "more")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "every queried volume (2) is labelled already: none of theirs is left to import" in out
    assert "Imported 0 of 2 queried volumes (each labelled already); skipped 1" in out
    assert f"skipped {tmp_path / 'more' / other.name}: image {other.name} was not asked for" in out


def test_a_label_import_with_some_labels_refused_exits_1_and_keeps_the_good_ones(tmp_path, mri_pool, capsys):
    """A script that imports then fine-tunes must not go on as if every label had come in."""
    from ASFDALib.data.volumes import write_nifti

    session = tmp_path / "s"
    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(session), "--budget", "2"]) == 0
    good, bad = json.loads((session / "ranking.json").read_text())["selected"]
    (tmp_path / "gt").mkdir()
    shutil.copy(mri_pool / "labels" / good, tmp_path / "gt" / good)
    write_nifti(tmp_path / "gt" / bad, np.zeros((5, 5, 5), np.uint8), np.eye(4))
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt")]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert f"imported {good}" in out and f"refused {tmp_path / 'gt' / bad}" in out
    assert "Imported 1 of 2 queried volumes; skipped 0 (not asked for, or of no image), refused 1." in out
    assert list(json.loads((session / "session.json").read_text())["labels"]) == [good]
    # a file of no volume in the pool (a folder holding more cases than the session) is said, not an error
    (tmp_path / "gt" / bad).unlink()
    shutil.copy(mri_pool / "labels" / bad, tmp_path / "gt" / bad)
    shutil.copy(mri_pool / "labels" / good, tmp_path / "gt" / "case_from_another_study.nii.gz")
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "skipped" in out and "case_from_another_study.nii.gz: no image has this case name" in out
    assert "refused 0." in out  # not an error: the word says so, as the exit status does
    assert f"imported {bad}" in out and f"unchanged {good}" in out


def _iterations(session) -> dict:
    return json.loads((session / "session.json").read_text())["rounds"][-1]["metrics"]["iterations"]


def test_finetuning_again_offers_the_real_choices_and_records_what_ran(labelled_session, capsys):
    """A finished round is not silently re-run or mis-recorded: a second plain run is refused naming
    --extend and --restart; --resume of a finished run is refused; --extend and --restart record what ran."""
    session = labelled_session
    base = ["finetune", str(session), "--checkpoint-every", "2", "--no-pseudo"]
    assert main([*base, "--iterations", "2"]) == 0
    assert _iterations(session) == {"stage1": 2, "stage2": 0}
    capsys.readouterr()
    assert main([*base, "--iterations", "4"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "already has a finished run" in err and "--extend" in err and "--restart" in err
    assert main([*base, "--iterations", "4", "--resume"]) == 1
    assert "--extend trains a finished run further" in " ".join(capsys.readouterr().err.split())
    assert main([*base, "--extend"]) == 1
    assert "more than the run has done (stage 1: 2 iterations, stage 2: 0)" in " ".join(capsys.readouterr().err.split())
    assert main([*base, "--iterations", "4", "--extend"]) == 0
    assert "Round 1 extended: stage 1 2 -> 4 iterations" in " ".join(capsys.readouterr().out.split())
    assert _iterations(session) == {"stage1": 4, "stage2": 0}
    assert main(["finetune", str(session), "--extend", "--pseudo-iterations", "1"]) == 0  # stage 2 added
    assert _iterations(session) == {"stage1": 4, "stage2": 1}
    assert main(["finetune", str(session), "--extend", "--iterations", "6"]) == 1  # stage 1 cannot grow after stage 2
    assert "only stage 2 can be extended" in " ".join(capsys.readouterr().err.split())
    assert main([*base, "--iterations", "3", "--restart"]) == 0
    assert _iterations(session) == {"stage1": 3, "stage2": 0}
    assert (session / "checkpoints" / "round1-replaced-1" / "final.pt").is_file()  # the earlier run is kept
    runs = json.loads((session / "session.json").read_text())["rounds"][-1]["metrics"]["runs"]
    assert [(r["mode"], r["stage1"]) for r in runs] == [("restart", [0, 3])]


@pytest.fixture(scope="module")
def template_session(tmp_path_factory, mri_pool):
    """A ranked session with one labelled volume, copied fresh for every example of the property test."""
    root = tmp_path_factory.mktemp("template")
    session = root / "session"
    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(session), "--budget", "1"]) == 0
    query = json.loads((session / "ranking.json").read_text())["selected"]
    (root / "gt").mkdir()
    shutil.copy(mri_pool / "labels" / query[0], root / "gt" / query[0])
    assert main(["labels", "import", str(session), "--from", str(root / "gt")]) == 0
    return session


OPS = st.tuples(
    st.sampled_from(["new", "resume", "extend", "restart"]),
    st.integers(1, 4),  # iterations asked for
    st.one_of(st.none(), st.integers(1, 3)),  # interrupted after this many iterations of the call, or not
)


@settings(
    max_examples=int(os.environ.get("ASFDA_PROPERTY_EXAMPLES", "6")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(OPS, min_size=1, max_size=4))
def test_session_records_exactly_the_iterations_run_after_any_sequence_of_finetunes(template_session, tmp_path, ops):
    """Property: whatever the order of new / resume / extend / restart calls, some cancelled part-way,
    run.json and session.json say how many iterations the round's model has really been trained for."""
    import threading

    from ASFDALib.adaptation.pipeline import finetune_session
    from ASFDALib.adaptation.runs import read_run
    from ASFDALib.adaptation.session import SessionError

    root = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
    shutil.copytree(template_session, root)
    model = None  # the reference: None, or (iterations done, target, finished)
    for mode, asked, stop_after in ops:
        cancel = threading.Event()
        ran = []

        def progress(p, cancel=cancel, ran=ran, stop_after=stop_after) -> None:
            ran.append(p.iteration)
            if stop_after is not None and len(ran) >= stop_after:
                cancel.set()

        config = FinetuneConfig(iterations=asked, pseudo_iterations=0, batch_size=1, checkpoint_every=1, device="cpu")
        refused = (
            (mode == "new" and model is not None)
            or (mode == "resume" and model is not None and model[2])
            or (mode == "extend" and (model is None or not model[2] or asked <= model[0]))
        )
        with Session.open(root) as session:
            if refused:
                with pytest.raises(SessionError):
                    finetune_session(session, config, False, mode, cancel, progress)
                continue
            result = finetune_session(session, config, False, mode, cancel, progress)
        start = 0 if model is None or mode == "restart" else model[0]
        target = model[1] if mode == "resume" and model is not None else asked
        done = min(target, start + stop_after) if stop_after is not None else target
        if stop_after is not None and start + stop_after >= target:
            done = target  # the last iteration ran before the cancel was seen: the run finished
        model = (done, target, done >= target and result.status == "done")
        run = read_run(root / "checkpoints" / "round1")
        assert run["done"]["stage1"] == done, (ops, run)
        assert run["finished"] == model[2]
        if result.status == "cancelled":  # the caller's result says what ran, as the record does
            assert result.iterations == run["done"] and result.summary.endswith("before it was cancelled")
        recorded = Session.open(root).rounds[-1]["metrics"]
        if model[2]:
            assert recorded["iterations"] == {"stage1": done, "stage2": 0}


def _checkpoint(session) -> tuple[str, int]:
    state = torch.load(session / "checkpoints" / "round1" / "last.pt", map_location="cpu", weights_only=True)
    return state["stage"], state["iteration"]


def test_a_terminated_finetune_is_recorded_as_interrupted_in_run_json_and_session_json(labelled_session, capsys):
    """SIGTERM (kill, timeout, a batch scheduler) takes Ctrl-C's path: the iterations of the newest checkpoint
    are recorded, in the run record and in session.json; the command exits 143 (128 + SIGTERM), as shells,
    ``timeout`` and schedulers expect of a terminated process (Ctrl-C exits 130)."""
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "ASFDALib.app.cli", "finetune", str(labelled_session), "--no-pseudo"]
    command += ["--iterations", "100000", "--checkpoint-every", "2", "--batch-size", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = labelled_session / "checkpoints" / "round1" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 143, out
    stage, iteration = _checkpoint(labelled_session)
    said = f"interrupted; the newest checkpoint is kept (stage 1: {iteration} iterations, stage 2: 0): re-run with"
    assert said in " ".join(out.split())
    assert stage == "stage1" and iteration >= 2
    run = json.loads((labelled_session / "checkpoints" / "round1" / "run.json").read_text())
    assert run["done"] == {"stage1": iteration, "stage2": 0} and not run["finished"]
    assert run["history"][-1]["status"] == "interrupted" and run["history"][-1]["stage1"] == [0, iteration]
    entry = json.loads((labelled_session / "session.json").read_text())["rounds"][-1]
    assert entry["checkpoint"] is None and "iterations" not in entry["metrics"]  # no finished model yet
    # export names the way on, finishing that run ("run 'asfda finetune' first" would be refused as it stands)
    capsys.readouterr()
    assert main(["export", str(labelled_session), "--out", str(labelled_session.parent / "bundle")]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert "not fine-tuned yet: round 1's fine-tune was interrupted" in said and "--resume' finishes it" in said
    assert [(r["mode"], r["status"], r["stage1"]) for r in entry["metrics"]["runs"]] == [
        ("new", "interrupted", [0, iteration])
    ]


def test_a_killed_run_is_counted_from_its_checkpoint_and_recorded_as_killed(labelled_session, capsys):
    """A run killed without a word (SIGKILL, power loss) leaves run.json as it started: the checkpoint says how
    far it got, for the refusal as for the resume, and the resume records the dead run as killed."""
    base = ["finetune", str(labelled_session), "--no-pseudo", "--checkpoint-every", "2", "--batch-size", "1"]
    assert main([*base, "--iterations", "4"]) == 0
    path = labelled_session / "checkpoints" / "round1" / "run.json"
    run = json.loads(path.read_text())
    # what a kill at the start of a longer run leaves behind: the record of a run that has begun
    run["targets"], run["done"], run["finished"] = {"stage1": 6, "stage2": 0}, {"stage1": 0, "stage2": 0}, False
    run["history"][-1]["status"] = "running"
    del run["history"][-1]["stage1"]
    path.write_text(json.dumps(run))
    capsys.readouterr()
    assert main([*base, "--iterations", "6"]) == 1
    assert "already has a killed run (stage 1: 4 iterations, stage 2: 0)" in capsys.readouterr().err
    # the refusal's record holds in session.json too, and an extension names it as killed
    runs = json.loads((labelled_session / "session.json").read_text())["rounds"][-1]["metrics"]["runs"]
    assert [(r["status"], r["stage1"]) for r in runs] == [("killed", [0, 4])]
    assert main([*base, "--extend", "--iterations", "8"]) == 1
    assert "round 1's run was killed; --resume continues" in " ".join(capsys.readouterr().err.split())
    assert main([*base, "--resume"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "resuming the killed run from its newest checkpoint: stage 1, iteration 4 of 6" in said
    assert "Round 1 resumed: stage 1 4 -> 6 iterations" in said
    history = json.loads(path.read_text())["history"]
    assert [(h["status"], h["stage1"]) for h in history] == [("killed", [0, 4]), ("done", [4, 6])]


def test_a_run_killed_between_its_checkpoint_and_last_json_is_recorded_with_what_the_checkpoint_holds(
    labelled_session, capsys
):
    """Killed after last.pt and before last.json (which says what it holds), a run's record lags one checkpoint:
    the resume loads last.pt and records the killed run as far as it got, so the runs add up to what ran."""
    base = ["finetune", str(labelled_session), "--no-pseudo", "--checkpoint-every", "2", "--batch-size", "1"]
    assert main([*base, "--iterations", "4"]) == 0
    folder = labelled_session / "checkpoints" / "round1"
    run = json.loads((folder / "run.json").read_text())
    # the record of a run to 6 iterations killed at 4: last.pt holds 4, last.json still says 2
    run["targets"], run["done"], run["finished"] = {"stage1": 6, "stage2": 0}, {"stage1": 0, "stage2": 0}, False
    run["history"][-1]["status"] = "running"
    del run["history"][-1]["stage1"], run["handover"]
    (folder / "run.json").write_text(json.dumps(run))
    (folder / "last.json").write_text(json.dumps({"stage": "stage1", "iteration": 2}))
    assert main([*base, "--resume"]) == 0
    assert "resuming the killed run from its newest checkpoint: stage 1, iteration 4 of 6" in capsys.readouterr().out
    history = json.loads((folder / "run.json").read_text())["history"]
    assert [(h["status"], h["stage1"]) for h in history] == [("killed", [0, 4]), ("done", [4, 6])]
    runs = json.loads((labelled_session / "session.json").read_text())["rounds"][-1]["metrics"]["runs"]
    assert [(r["status"], r["stage1"]) for r in runs] == [("killed", [0, 4]), ("done", [4, 6])]


def test_a_run_killed_between_its_record_and_session_json_is_recorded_by_the_next_finetune(labelled_session, capsys):
    """A kill after run.json records a finished run and before session.json does (final.pt on disk) leaves the
    round's model unrecorded: labels and rank name the fix, export refuses, and the resume records the run as it
    finished (iterations, runs, checkpoint), training nothing; a plain rerun of a first run does the same."""
    base = ["finetune", str(labelled_session), "--no-pseudo", "--checkpoint-every", "2", "--batch-size", "1"]
    folder = labelled_session / "checkpoints" / "round1"
    before = (labelled_session / "session.json").read_bytes()
    assert main([*base, "--iterations", "2"]) == 0
    (labelled_session / "session.json").write_bytes(before)  # what the kill leaves: session.json as the run began
    capsys.readouterr()
    assert main([*base, "--iterations", "2"]) == 0  # the same command again
    said = " ".join(capsys.readouterr().out.split())
    assert "round 1's run had finished (stage 1: 2 iterations, stage 2: 0); session.json records its model now" in said
    entry = json.loads((labelled_session / "session.json").read_text())["rounds"][-1]
    assert entry["checkpoint"] == "checkpoints/round1/final.pt" and entry["metrics"]["iterations"]["stage1"] == 2

    before = (labelled_session / "session.json").read_bytes()
    assert main([*base, "--extend", "--iterations", "4"]) == 0
    final = (folder / "final.pt").read_bytes()
    (labelled_session / "session.json").write_bytes(before)  # the extension's kill: session.json still says 2
    capsys.readouterr()
    assert main(["labels", str(labelled_session)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    pending = "round 1's fine-tune finished, but session.json does not record its model yet (stage 1: 4 iterations"
    assert pending in said and f"'asfda finetune {labelled_session} --resume' records it" in said
    assert main(["rank", "--out", str(labelled_session)]) == 1
    assert pending in " ".join(capsys.readouterr().err.split())
    assert main(["export", str(labelled_session), "--out", str(labelled_session.parent / "bundle")]) == 1
    assert pending in " ".join(capsys.readouterr().err.split())
    assert not (labelled_session.parent / "bundle").exists()
    assert main([*base, "--resume"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "session.json records its model now" in said and "nothing left to run" in said
    assert (folder / "final.pt").read_bytes() == final  # nothing trained again
    entry = json.loads((labelled_session / "session.json").read_text())["rounds"][-1]
    assert entry["metrics"]["iterations"] == {"stage1": 4, "stage2": 0}
    assert [(r["mode"], r["status"], r["stage1"]) for r in entry["metrics"]["runs"]] == [
        ("new", "done", [0, 2]),
        ("extend", "done", [2, 4]),
    ]
    assert main([*base, "--resume"]) == 1  # recorded: the run is finished, as any other
    assert "round 1's run finished (stage 1: 4 iterations, stage 2: 0)" in capsys.readouterr().err


def test_a_restart_killed_after_setting_the_earlier_run_aside_is_recorded_by_the_same_command(labelled_session, capsys):
    """A restart killed between moving the round's run aside and recording it leaves session.json naming a model
    where it no longer is: the same command records the run set aside (once) before it trains the round again."""
    base = ["finetune", str(labelled_session), "--no-pseudo", "--checkpoint-every", "2", "--batch-size", "1"]
    assert main([*base, "--iterations", "2"]) == 0
    checkpoints = labelled_session / "checkpoints"
    (checkpoints / "round1").rename(checkpoints / "round1-replaced-1")  # what the kill leaves
    capsys.readouterr()
    assert main([*base, "--restart", "--iterations", "3"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "round 1's earlier run, set aside in checkpoints/round1-replaced-1, is recorded now" in said
    entry = json.loads((labelled_session / "session.json").read_text())["rounds"][-1]
    assert [(r["folder"], r["iterations"]) for r in entry["replaced"]] == [
        ("checkpoints/round1-replaced-1", {"stage1": 2, "stage2": 0})
    ]
    assert entry["checkpoint"] == "checkpoints/round1/final.pt" and entry["metrics"]["iterations"]["stage1"] == 3
    assert sorted(p.name for p in checkpoints.iterdir()) == ["round1", "round1-replaced-1"]


def test_a_resume_goes_on_with_the_runs_own_batch_size_rate_and_seed_and_refuses_others(labelled_session, capsys):
    """What the run started with is recorded; a resume that names none of it trains with it, one that names
    another is refused before any work, and so is the engine asked to resume with another (the panel's path)."""
    from ASFDALib.adaptation.pipeline import finetune_session
    from ASFDALib.adaptation.recipe import FinetuneConfig
    from ASFDALib.adaptation.session import Session, SessionError

    base = ["finetune", str(labelled_session), "--no-pseudo", "--checkpoint-every", "2"]
    assert main([*base, "--iterations", "4", "--batch-size", "1", "--lr", "0.002", "--seed", "3"]) == 0
    path = labelled_session / "checkpoints" / "round1" / "run.json"
    run = json.loads(path.read_text())
    assert {k: run["recipe"][k] for k in ("batch_size", "lr", "seed")} == {"batch_size": 1, "lr": 0.002, "seed": 3}
    assert "reliability" not in run["recipe"] and run["history"][0]["recipe"] == run["recipe"]  # no stage 2: no gate
    run["targets"], run["finished"] = {"stage1": 6, "stage2": 0}, False  # as if killed on the way to 6
    path.write_text(json.dumps(run))
    capsys.readouterr()
    assert main([*base, "--resume", "--lr", "0.1"]) == 1
    assert "so --lr 0.1 (it had 0.002) would change it part-way" in " ".join(capsys.readouterr().err.split())
    with Session.open(labelled_session) as session, pytest.raises(SessionError, match=r"lr 0.0003 \(it had 0.002\)"):
        finetune_session(session, FinetuneConfig(lr=3e-4, batch_size=1, seed=3), pseudo=False, mode="resume")
    assert main([*base, "--resume"]) == 0
    history = json.loads(path.read_text())["history"]
    assert history[-1]["learning_rates"] == history[0]["learning_rates"]  # the run's own rate, not the default
    assert history[-1]["stage1"] == [4, 6]
    assert main([*base, "--extend", "--iterations", "8"]) == 0  # an extension, too, goes on with them
    assert json.loads(path.read_text())["history"][-1]["recipe"] == run["recipe"]


def test_a_resume_refuses_labels_changed_since_the_run_and_names_them(labelled_session, mri_pool, tmp_path, capsys):
    """A resume continues to the weights the interrupted run would have reached, so a label imported since is
    refused by name, before any work, and what names the unfinished run offers the restart that works. Another
    process count (a torchrun job that lost a node) goes on, and says what it changes."""
    base = ["finetune", str(labelled_session), "--no-pseudo", "--checkpoint-every", "2", "--batch-size", "1"]
    assert main([*base, "--iterations", "4"]) == 0
    path = labelled_session / "checkpoints" / "round1" / "run.json"
    run = json.loads(path.read_text())
    recorded = json.loads((labelled_session / "session.json").read_text())["labels"]
    (first,) = recorded
    assert run["history"][0]["labels"] == {first: recorded[first][-1]["sha256"]}  # by content
    assert run["history"][0]["world_size"] == 1
    run["targets"], run["finished"] = {"stage1": 6, "stage2": 0}, False  # as if killed on the way to 6
    run["history"][-1]["world_size"] = 2  # under torchrun on two processes
    path.write_text(json.dumps(run))
    capsys.readouterr()
    assert main([*base, "--extend"]) == 1  # the run's state first, not the length an extension would need
    assert "round 1's run was interrupted; --resume continues" in " ".join(capsys.readouterr().err.split())
    assert main([*base, "--resume"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "the run trained on 2 processes and resumes on 1: each process draws its own batch of 1, so the " in said
    assert json.loads(path.read_text())["history"][-1]["world_size"] == 1  # the record says what ran
    run = json.loads(path.read_text())
    run["targets"], run["finished"] = {"stage1": 8, "stage2": 0}, False
    path.write_text(json.dumps(run))
    other = next(p.name for p in sorted((mri_pool / "labels").iterdir()) if p.name != first)
    (tmp_path / "more").mkdir()
    shutil.copy(mri_pool / "labels" / other, tmp_path / "more" / other)
    assert main(["labels", "import", str(labelled_session), "--from", str(tmp_path / "more"), "--cases", other]) == 0
    restart = f"its labels changed since ({other} labelled): 'asfda finetune {labelled_session} --restart' trains"
    assert restart in " ".join(capsys.readouterr().out.split())  # the import says what it did to the run
    assert main([*base, "--resume"]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert f"so the labels ({other} labelled since it ran) would change it part-way; --restart trains" in said
    assert json.loads(path.read_text()) == run  # refused before any work
    assert main(["labels", str(labelled_session)]) == 0
    assert restart in " ".join(capsys.readouterr().out.split())
    assert main(["rank", "--out", str(labelled_session)]) == 1
    assert restart in " ".join(capsys.readouterr().err.split())


def test_predict_and_the_labels_status_during_an_unfinished_fine_tune_name_it_and_the_fix(
    labelled_session, mri_pool, tmp_path, capsys
):
    base = ["finetune", str(labelled_session), "--no-pseudo", "--checkpoint-every", "2", "--batch-size", "1"]
    assert main([*base, "--iterations", "4"]) == 0
    # what a kill on the way to 6 iterations of the round's first run leaves: no adapted weights yet
    path = labelled_session / "checkpoints" / "round1" / "run.json"
    run = json.loads(path.read_text())
    run["targets"], run["finished"] = {"stage1": 6, "stage2": 0}, False
    run["history"][-1]["status"] = "running"
    path.write_text(json.dumps(run))
    data = json.loads((labelled_session / "session.json").read_text())
    data["rounds"][-1]["checkpoint"] = None
    (labelled_session / "session.json").write_text(json.dumps(data))
    capsys.readouterr()
    args = ["predict", str(labelled_session), "--images", str(mri_pool / "images"), "--out", str(tmp_path / "p")]
    assert main(args) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert (  # recorded as running while nobody holds the session: it was killed
        "Round 1's fine-tune was killed (stage 1: 4 iterations, stage 2: 0): predicting with the source model "
        f"('asfda finetune {labelled_session} --resume' finishes it)" in said
    )
    assert said.endswith(f"Wrote 6 label maps to {tmp_path / 'p'} with the source model")
    assert main(["labels", str(labelled_session)]) == 0  # and the labels' status names the fix, not a new run
    said = " ".join(capsys.readouterr().out.split())
    assert (
        "1 of 1 queried volumes labelled; round 1's fine-tune was killed (stage 1: 4 iterations, stage 2: 0): "
        f"'asfda finetune {labelled_session} --resume' finishes it" in said
    )


def test_the_labels_status_lists_labels_imported_beyond_the_query_and_what_follows_a_finished_round(
    labelled_session, mri_pool, tmp_path, capsys
):
    assert main(["finetune", str(labelled_session), "--no-pseudo", "--iterations", "2", "--batch-size", "1"]) == 0
    (queried,) = json.loads((labelled_session / "session.json").read_text())["rounds"][-1]["query"]
    other = next(p.name for p in sorted((mri_pool / "labels").iterdir()) if p.name != queried)
    (tmp_path / "more").mkdir()
    shutil.copy(mri_pool / "labels" / other, tmp_path / "more" / other)
    assert main(["labels", "import", str(labelled_session), "--from", str(tmp_path / "more"), "--cases", other]) == 0
    capsys.readouterr()
    assert main(["labels", str(labelled_session)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"│ - │ {other} │ labels/" in said  # trained on too, so listed
    # the round trained before that label came in: its model does not know it yet
    assert (
        "1 of 1 queried volumes labelled (and 1 not queried, imported with --cases or --all); round 1 is "
        "fine-tuned, but on other labels than now (" in said
    )
    assert f"'asfda finetune {labelled_session} --extend --iterations N' (N above 2) trains on them" in said
    assert main(["finetune", str(labelled_session), "--extend", "--iterations", "3", "--batch-size", "1"]) == 0
    capsys.readouterr()
    assert main(["labels", str(labelled_session)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"round 1 is fine-tuned: 'asfda predict {labelled_session} --images DIR --out DIR'" in said
    # that extension ran stage 2 too (200 iterations): only stage 2 goes further now
    assert f"'asfda finetune {labelled_session} --extend --pseudo-iterations N' (N above 200) to train it" in said
    # once stage 2 has run, only stage 2 goes further: the hint names its option and length, and works as typed
    two_stages = ["--iterations", "2", "--pseudo-iterations", "1", "--batch-size", "1"]
    assert main(["finetune", str(labelled_session), "--restart", *two_stages]) == 0
    capsys.readouterr()
    assert main(["labels", str(labelled_session)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"'asfda finetune {labelled_session} --extend --pseudo-iterations N' (N above 1) to train it" in said
    assert main(["finetune", str(labelled_session), "--extend", "--pseudo-iterations", "2", "--batch-size", "1"]) == 0


def test_the_labels_status_tells_a_run_still_going_in_another_process_from_a_killed_one(labelled_session, capsys):
    import subprocess
    import sys

    assert main(["finetune", str(labelled_session), "--no-pseudo", "--iterations", "2", "--batch-size", "1"]) == 0
    path = labelled_session / "checkpoints" / "round1" / "run.json"
    run = json.loads(path.read_text())
    run["targets"], run["finished"] = {"stage1": 6, "stage2": 0}, False
    run["history"][-1]["status"] = "running"
    path.write_text(json.dumps(run))
    hold = f"from ASFDALib.adaptation.session import Session; s = Session.open({str(labelled_session)!r}).lock()"
    holder = subprocess.Popen([sys.executable, "-c", hold + "; print('held', flush=True); input()"], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["labels", str(labelled_session)]) == 0
        said = " ".join(capsys.readouterr().out.split())
        assert "round 1's fine-tune is running (stage 1: 2 iterations, stage 2: 0): wait for it to finish (pid " in said
    finally:
        holder.kill()
        holder.wait()
    assert main(["labels", str(labelled_session)]) == 0  # its lock died with it: killed
    assert "round 1's fine-tune was killed (stage 1: 2 iterations" in " ".join(capsys.readouterr().out.split())


def test_a_re_rank_on_another_folder_is_refused_where_a_labelled_image_differs_and_follows_a_moved_pool(
    labelled_session, mri_pool, tmp_path, capsys
):
    """Labels and runs are recorded by image name: a folder whose image of that name is another scan would
    put the label on it. A copy of the pool (a moved disk) is the same pool."""
    (labelled,) = json.loads((labelled_session / "session.json").read_text())["labels"]
    other = tmp_path / "other"
    shutil.copytree(mri_pool / "images", other)
    stranger = next(p for p in sorted(other.iterdir()) if p.name != labelled)
    shutil.copy(stranger, other / labelled)  # another scan under the labelled one's name
    before = (labelled_session / "session.json").read_text()
    capsys.readouterr()
    assert main(["rank", "--images", str(other), "--out", str(labelled_session)]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert f"its labelled volume {labelled} differs there from the image that was labelled" in said
    assert (labelled_session / "session.json").read_text() == before
    moved = tmp_path / "moved"
    shutil.copytree(mri_pool / "images", moved)
    assert main(["rank", "--images", str(moved), "--out", str(labelled_session)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"the pool's folder is now {moved.resolve()}" in said
    assert "its 1 labelled volume(s) are the same, and it holds 6 of the 6 scans recorded" in said
    assert json.loads((labelled_session / "session.json").read_text())["images"]["root"] == str(moved.resolve())


def test_a_labelled_scan_replaced_in_the_sessions_own_pool_is_refused_by_rank_and_finetune_until_put_right(
    mri_pool, tmp_path, capsys
):
    """A label is drawn on one scan's voxels: where the pool's file of that name now holds another scan, a re-rank
    must not record the new content under the old label, nor a fine-tune train on the pair. Put back, or
    labelled anew on the scan as it is now, the session goes on."""
    pool, session = tmp_path / "pool", tmp_path / "session"
    shutil.copytree(mri_pool / "images", pool)
    assert main(["rank", "--images", str(pool), "--out", str(session), "--budget", "1"]) == 0
    (labelled,) = json.loads((session / "ranking.json").read_text())["selected"]
    (tmp_path / "gt").mkdir()
    shutil.copy(mri_pool / "labels" / labelled, tmp_path / "gt" / labelled)
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt")]) == 0
    record = json.loads((session / "session.json").read_text())["labels"][labelled][-1]
    assert record["image_sha256"] == content_hash(pool / labelled)  # the image the label was drawn on
    original = (pool / labelled).read_bytes()
    shutil.copy(next(p for p in sorted(pool.iterdir()) if p.name != labelled), pool / labelled)  # replaced in place
    before = (session / "session.json").read_text()
    capsys.readouterr()
    finetune = ["finetune", str(session), "--iterations", "2", "--pseudo-iterations", "1", "--batch-size", "1"]
    for command in (["rank", "--out", str(session)], finetune):
        assert main(command) == 1
        said = " ".join(capsys.readouterr().err.split())
        assert f"{labelled} in {pool.resolve()} changed since it was labelled; put the scan back as it was" in said
        assert f"'asfda labels import {session} --from FILE --cases NAME'" in said
        assert (session / "session.json").read_text() == before  # the hashes recorded at labelling stay
    assert not (session / "checkpoints").exists()
    assert main(["labels", str(session)]) == 0  # the listing says so before either is run
    listed = " ".join(capsys.readouterr().out.split())
    assert f"{labelled} in {pool.resolve()} changed since it was labelled: fine-tuning refuses until it is" in listed
    (pool / labelled).write_bytes(original)  # put back: the session goes on
    assert main(["rank", "--out", str(session)]) == 0
    shutil.copy(next(p for p in sorted(pool.iterdir()) if p.name != labelled), pool / labelled)
    # the same label file imported again for the scan as it is now: a new version, on the new image
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt"), "--cases", labelled]) == 0
    versions = json.loads((session / "session.json").read_text())["labels"][labelled]
    assert len(versions) == 2 and versions[-1]["image_sha256"] == content_hash(pool / labelled)
    assert main(finetune) == 0
    # that scan, trained on now, is known as such by evaluate before any rank records the pool's new hash
    (tmp_path / "one").mkdir()
    shutil.copy(pool / labelled, tmp_path / "one" / labelled)
    assert main(["predict", str(session), "--images", str(tmp_path / "one"), "--out", str(tmp_path / "p")]) == 0
    assert main(["evaluate", "--pred", str(tmp_path / "p"), "--labels", str(tmp_path / "gt")]) == 0
    assert f"labelled in the session (same image as its {labelled})" in (tmp_path / "p" / "evaluation.csv").read_text()
    # the pool moved: the refusal names the rank that records where it is now, which passes (the labelled image
    # known by the hash recorded with its newest label, not the pool's from before)
    moved = pool.rename(tmp_path / "moved")
    assert main([*finetune[:2], "--restart", *finetune[2:]]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert f"{labelled} is gone from {pool.resolve()}; move the pool back to {pool.resolve()}, or name" in said
    assert "where it is now with --images NEW_FOLDER (asfda finetune and asfda rank take it)" in said
    rounds = len(json.loads((session / "session.json").read_text())["rounds"])
    assert main([*finetune[:2], "--restart", "--images", str(moved), *finetune[2:]]) == 0  # no new round for it
    assert f"the pool's folder is now {moved.resolve()}" in " ".join(capsys.readouterr().out.split())
    recorded = json.loads((session / "session.json").read_text())
    assert recorded["images"]["root"] == str(moved.resolve()) and len(recorded["rounds"]) == rounds
    # a scan the round pseudo-labelled, replaced since: going on with its stored pseudo-label is refused too
    pseudo = json.loads((session / "checkpoints" / "round1" / "pseudo" / "pseudo.json").read_text())
    kept = pseudo["kept"][0]
    assert set(pseudo["images"]) == set(pseudo["kept"])  # each kept scan's hash and stamp
    before = (moved / kept).read_bytes()
    shutil.copy(moved / labelled, moved / kept)
    assert main(["finetune", str(session), "--extend", "--pseudo-iterations", "2", "--batch-size", "1"]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert f"{moved.resolve() / kept}: pseudo-labelled as it was when this round's pseudo-labels were made" in said
    assert "--restart makes them anew from the pool as it is" in said
    (moved / kept).write_bytes(before)
    assert main(["rank", "--images", str(moved), "--out", str(session)]) == 0  # and rank takes it too


def test_a_re_rank_keeps_the_sessions_budget_counts_its_labels_in_it_and_is_refused_during_an_unfinished_run(
    labelled_session, mri_pool, capsys
):
    """The budget is the round's query: a re-rank to look at the table (another alpha, say) adds nothing to a
    labelled query; a larger --budget adds the difference, and the output and ranking.json say so."""
    rank = ["rank", "--images", str(mri_pool / "images"), "--out", str(labelled_session)]  # its budget: 1
    (labelled,) = json.loads((labelled_session / "session.json").read_text())["rounds"][-1]["query"]
    capsys.readouterr()
    assert main([*rank, "--alpha", "0.8"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "round 1's query keeps its 1 labelled volume and adds 0: 1 in all, its budget of 1; --budget above 1" in said
    assert f"Round 1's query: nothing new (labelled already: {labelled})" in said
    assert "The round's query of 1 is labelled. Next: 'asfda finetune" in said
    assert json.loads((labelled_session / "session.json").read_text())["rounds"][-1]["query"] == [labelled]
    assert main([*rank, "--budget", "7"]) == 0  # more than the pool holds: said, and the query takes all
    said = " ".join(capsys.readouterr().out.split())
    assert "the budget asks for 6 more volumes and only 5 are left to query: the query takes all" in said
    assert "adds 5: 6 in all, its budget of 7" in said and "--budget above" not in said
    assert main([*rank, "--budget", "2"]) == 0
    note = "round 1's query keeps its 1 labelled volume and adds 1: 2 in all, its budget of 2"
    said = " ".join(capsys.readouterr().out.split())
    assert note in said and "Round 1's query (ranked anew): " in said
    assert note in json.loads((labelled_session / "ranking.json").read_text())["notes"]  # the record says so too
    assert len(json.loads((labelled_session / "session.json").read_text())["rounds"][-1]["query"]) == 2
    assert main(["finetune", str(labelled_session), "--no-pseudo", "--iterations", "2", "--batch-size", "1"]) == 0
    path = labelled_session / "checkpoints" / "round1" / "run.json"
    run = json.loads(path.read_text())
    run["targets"], run["finished"] = {"stage1": 4, "stage2": 0}, False  # on its way to 4 when it stopped
    path.write_text(json.dumps(run))
    before = (labelled_session / "session.json").read_text()
    capsys.readouterr()
    assert main(rank) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "round 1's fine-tune was interrupted (stage 1: 2 iterations, stage 2: 0)" in err and "--resume" in err
    assert (labelled_session / "session.json").read_text() == before


def test_a_run_that_fails_is_recorded_as_failed_and_resuming_it_reaches_its_own_targets(labelled_session, tmp_path):
    """An error part-way (a GPU out of memory, say) records the run as failed and unfinished at its newest
    checkpoint; resuming it goes on to that run's targets, an extension's included (the panel's retry on the
    CPU); a restart instead lists it under the round's replaced runs with how far it got."""
    import threading

    from ASFDALib.adaptation.pipeline import finetune_session
    from ASFDALib.adaptation.runs import read_run

    def config(iterations: int) -> FinetuneConfig:
        return FinetuneConfig(iterations, 0, batch_size=1, checkpoint_every=2, device="cpu")

    def fail_at(iteration: int):
        def progress(p) -> None:
            if p.iteration == iteration:
                raise RuntimeError("CUDA out of memory")

        return progress

    with Session.open(labelled_session) as session:
        finetune_session(session, config(2), False, "new", threading.Event(), lambda p: None)
        with pytest.raises(RuntimeError):
            finetune_session(session, config(6), False, "extend", threading.Event(), fail_at(5))
    run = read_run(labelled_session / "checkpoints" / "round1")
    assert run["done"] == {"stage1": 4, "stage2": 0} and run["targets"]["stage1"] == 6 and not run["finished"]
    assert (run["history"][-1]["status"], run["history"][-1]["stage1"]) == ("failed", [2, 4])
    assert run["history"][-1]["error"] == "RuntimeError: CUDA out of memory"  # why, in the record
    metrics = Session.open(labelled_session).rounds[-1]["metrics"]
    assert metrics["iterations"] == {"stage1": 2, "stage2": 0}  # what the round's finished model holds
    assert [r["status"] for r in metrics["runs"]] == ["done", "failed"]
    copy = tmp_path / "copy"
    shutil.copytree(labelled_session, copy)
    with Session.open(labelled_session) as session:
        assert finetune_session(session, config(6), False, "resume", threading.Event(), lambda p: None).status == "done"
    assert Session.open(labelled_session).rounds[-1]["metrics"]["iterations"] == {"stage1": 6, "stage2": 0}
    with Session.open(copy) as session:
        finetune_session(session, config(2), False, "restart", threading.Event(), lambda p: None)
    replaced = Session.open(copy).rounds[-1]["replaced"]
    assert set(replaced[0].pop("seconds")) == {"stage1"}  # the set-aside model's training time, kept with it
    assert replaced == [
        {
            "folder": "checkpoints/round1-replaced-1",
            "iterations": {"stage1": 2, "stage2": 0},
            "unfinished": {"stage1": 4, "stage2": 0},
            "status": "failed",
            "pseudo_gate": None,  # what the finished model's stage 2 trained on: none ran
            "pseudo_labelled": [],
            "handover_blend": 0.0,  # and its final.pt was handed over unblended
        }
    ]


GLOO_PEER_GONE = "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4242"


def test_a_torchrun_peer_that_left_is_recorded_as_an_interruption_not_a_failure(
    labelled_session, tmp_path, monkeypatch, capsys
):
    """Another rank killed (its scheduler, an out-of-memory kill) breaks this rank's collective with gloo's
    error: this run did not fail, torchrun stops it next, and --resume goes on as after Ctrl-C."""
    import threading

    from ASFDALib import distributed
    from ASFDALib.adaptation import pipeline
    from ASFDALib.adaptation.runs import read_run

    copy = tmp_path / "copy"
    shutil.copytree(labelled_session, copy)
    monkeypatch.setattr(distributed, "launched", lambda: True)  # a two-process job, as torchrun's env says

    def peer_gone(p) -> None:
        if p.iteration == 3:
            raise RuntimeError(GLOO_PEER_GONE)

    config = FinetuneConfig(4, 0, batch_size=1, checkpoint_every=2, device="cpu")
    with Session.open(copy) as session, pytest.raises(RuntimeError):
        pipeline.finetune_session(session, config, False, "new", threading.Event(), peer_gone)
    last = read_run(copy / "checkpoints" / "round1")["history"][-1]
    assert last["status"] == "interrupted" and "error" not in last and last["stage1"] == [0, 2]
    assert last["stopped"] == f"another process of the torchrun job left ({GLOO_PEER_GONE})"
    assert not distributed.peer_lost(RuntimeError("CUDA out of memory"))  # this process's own error stays one

    monkeypatch.setattr(distributed, "init_from_env", lambda device: None)
    monkeypatch.setattr(
        pipeline, "finetune_session", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(GLOO_PEER_GONE))
    )
    capsys.readouterr()
    assert main(["finetune", str(labelled_session), "--iterations", "4", "--no-pseudo"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"asfda finetune: stopped: another process of the torchrun job left ({GLOO_PEER_GONE}); "
        "'--resume' goes on from the newest checkpoint, if one was written"
    )


def test_a_flips_gate_records_that_no_other_gate_stands_behind_it(labelled_session):
    args = ["--iterations", "2", "--pseudo-iterations", "1", "--batch-size", "1", "--pseudo-gate", "flips"]
    assert main(["finetune", str(labelled_session), *args, "--min-agreement", "0"]) == 0
    pseudo = json.loads((labelled_session / "checkpoints" / "round1" / "pseudo" / "pseudo.json").read_text())
    assert pseudo["gate"] == {"reliability": "flips", "keep_fraction": 0.5, "min_agreement": 0.0, "fallback": "none"}


@pytest.mark.parametrize(
    "value, floor, said",
    [(0.498, 0.5, "0.498"), (0.43, 0.5, "0.43"), (0.49996, 0.5, "0.4999"), (0.7, 0.5, "0.70"), (0.498, None, "0.50")],
)
def test_an_agreement_below_the_floor_is_shown_with_the_decimals_that_keep_it_below(value, floor, said):
    from ASFDALib.adaptation.pipeline import below

    assert below(value, floor) == said


@pytest.mark.parametrize(
    "asked, fallback_judged, ran",
    [
        ("remap-if-fallback", True, "remap"),
        ("remap-if-fallback", False, "strong"),
        ("remap", False, "remap"),
        ("weak", True, "weak"),
    ],
)
def test_intensity_curves_go_where_the_fallback_judged_unless_asked_for_everywhere(asked, fallback_judged, ran):
    from ASFDALib.adaptation.recipe import stage2_augment

    assert stage2_augment(asked, fallback_judged) == ran


def test_a_resume_that_names_the_augmentation_the_run_resolved_to_is_the_same(tmp_path):
    from ASFDALib.adaptation.runs import same_in_effect

    pseudo = tmp_path / "pseudo.json"
    pseudo.write_text(json.dumps({"kept": ["a"], "gate": {"reliability": "flips", "asked": "rounds"}}))
    assert same_in_effect("pseudo_augment", "remap-if-fallback", "remap", pseudo)
    assert not same_in_effect("pseudo_augment", "strong", "remap", pseudo)
    pseudo.write_text(json.dumps({"kept": ["a"], "gate": {"reliability": "rounds"}}))  # the asked gate judged
    assert same_in_effect("pseudo_augment", "remap-if-fallback", "strong", pseudo)
    assert not same_in_effect("stage2_lr", "cosine", "constant", pseudo)  # others as given


def test_a_mix_named_with_a_resume_is_compared_as_it_resolves_under_the_runs_teacher(tmp_path):
    import argparse

    from ASFDALib.adaptation.runs import same_in_effect
    from ASFDALib.app.commands import refuse_changes_part_way
    from ASFDALib.errors import ASFDAError

    pseudo = tmp_path / "pseudo.json"
    pseudo.write_text(json.dumps({"kept": ["a"], "gate": {"reliability": "flips", "asked": "rounds"}}))
    assert not same_in_effect("pseudo_mix", "copy-paste", "none", pseudo, "fixed")
    assert same_in_effect("pseudo_mix", "copy-paste", "none", pseudo, "ema-if-fallback")  # the fallback judged: EMA
    pseudo.write_text(json.dumps({"kept": ["a"], "gate": {"reliability": "rounds"}}))  # the asked gate judged
    assert not same_in_effect("pseudo_mix", "copy-paste", "none", pseudo, "ema-if-fallback")
    args = argparse.Namespace(session="S", mode="resume", pseudo_teacher=None, pseudo_mix="copy-paste")
    ran = {"stage2_lr": "cosine", "pseudo_augment": "strong", "teacher": "fixed", "pseudo_mix": "none"}
    with pytest.raises(ASFDAError, match=re.escape("so --pseudo-mix copy-paste (it had none) would change it")):
        refuse_changes_part_way(args, ran, pseudo)


def test_a_new_rounds_fine_tune_waits_for_a_label_of_its_query(labelled_session, mri_pool, capsys):
    """Round 2 exists for its query: fine-tuning before any of it is labelled would retrain on round 1's labels."""
    tiny = ["--iterations", "2", "--pseudo-iterations", "0", "--batch-size", "1"]
    assert main(["finetune", str(labelled_session), *tiny]) == 0
    capsys.readouterr()
    assert main(["rank", "--out", str(labelled_session), "--budget", "1"]) == 0
    (query,) = json.loads((labelled_session / "session.json").read_text())["rounds"][1]["query"]
    said = " ".join(capsys.readouterr().out.split())  # round 2 ranks with the fine-tuned weights, named
    assert f"Fine-tuned weights: {labelled_session / 'checkpoints' / 'round1' / 'final.pt'}" in said
    assert f"Round 2's query: {query}" in said  # which round the rank made
    assert main(["finetune", str(labelled_session), *tiny]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"round 2's query ({query}) has no label yet, so this would train on the earlier rounds' labels only" in err
    assert not (labelled_session / "checkpoints" / "round2").exists()
    gt = labelled_session.parent / "gt2"
    gt.mkdir()
    shutil.copy(mri_pool / "labels" / query, gt / query)
    assert main(["labels", "import", str(labelled_session), "--from", str(gt)]) == 0
    assert main(["finetune", str(labelled_session), *tiny]) == 0  # labelled: round 2 trains


def test_a_restart_cancelled_part_way_leaves_the_finished_model_the_rounds_own(labelled_session, mri_pool, capsys):
    """Until the new run finishes, predict and export use the model the restart set aside, with its record."""
    import threading

    from ASFDALib.adaptation.pipeline import finetune_session

    config = FinetuneConfig(iterations=2, pseudo_iterations=0, batch_size=1, device="cpu")
    with Session.open(labelled_session) as session:
        finetune_session(session, config, pseudo=False)
    cancel = threading.Event()
    longer = FinetuneConfig(iterations=50, pseudo_iterations=0, batch_size=1, checkpoint_every=1, device="cpu")
    with Session.open(labelled_session) as session:
        result = finetune_session(session, longer, False, "restart", cancel, lambda p: cancel.set())
    assert result.status == "cancelled"
    session = Session.open(labelled_session)
    aside = labelled_session / "checkpoints" / "round1-replaced-1" / "final.pt"
    assert session.adapted_checkpoint() == aside.resolve()
    assert session.rounds[-1]["metrics"]["iterations"] == {"stage1": 2, "stage2": 0}  # what trained that model
    assert main(["predict", str(labelled_session), "--images", str(mri_pool / "images"), "--out",
                 str(labelled_session.parent / "pred")]) == 0  # fmt: skip
    said = " ".join(capsys.readouterr().out.split())
    assert "predicting with round 1's model as it finished before this run" in said
    export = [
        "export",
        str(labelled_session),
        "--format",
        "torchscript",
        "--out",
        str(labelled_session.parent / "m.ts"),
    ]
    assert main(export) == 0  # and export says which model it wrote
    said = " ".join(capsys.readouterr().out.split())
    assert (
        "round 1's fine-tuned model (checkpoints/round1-replaced-1/final.pt); round 1's fine-tune was cancelled" in said
    )
    with Session.open(labelled_session) as session:  # a finished restart makes its own model the round's
        assert finetune_session(session, longer, False, "resume").status == "done"
    assert Session.open(labelled_session).adapted_checkpoint().parent.name == "round1"


def test_an_extension_checkpoints_as_its_run_did_unless_told(labelled_session):
    """A run checkpointing every iteration, extended without --checkpoint-every, still does (a kill then costs
    what it cost before); each run's record says how often it checkpointed."""
    from ASFDALib.adaptation.runs import read_run

    tiny = ["--no-pseudo", "--batch-size", "1", "--device", "cpu"]
    assert main(["finetune", str(labelled_session), "--iterations", "2", "--checkpoint-every", "1", *tiny]) == 0
    assert main(["finetune", str(labelled_session), "--extend", "--iterations", "3", *tiny]) == 0
    history = read_run(labelled_session / "checkpoints" / "round1")["history"]
    assert [h["checkpoint_every"] for h in history] == [1, 1]
    assert main(["finetune", str(labelled_session), "--restart", "--iterations", "2", *tiny]) == 0  # a new run
    assert read_run(labelled_session / "checkpoints" / "round1")["history"][-1]["checkpoint_every"] == 50


def test_a_fine_tune_whose_output_reader_left_is_recorded_as_interrupted_not_failed(labelled_session):
    """`asfda finetune S | head`: the closed pipe stops the run, which a resume finishes, as after Ctrl-C."""
    from ASFDALib.adaptation.pipeline import finetune_session
    from ASFDALib.adaptation.runs import read_run

    def progress(p):
        raise BrokenPipeError(32, "Broken pipe")

    config = FinetuneConfig(iterations=3, pseudo_iterations=0, batch_size=1, checkpoint_every=1, device="cpu")
    with pytest.raises(BrokenPipeError), Session.open(labelled_session) as session:
        finetune_session(session, config, False, progress=progress)
    last = read_run(labelled_session / "checkpoints" / "round1")["history"][-1]
    assert last["status"] == "interrupted" and "error" not in last
    assert last["stopped"] == "the output's reader left (a closed pipe)"


def test_a_second_restart_records_what_each_set_aside_run_was_and_no_time_twice(labelled_session):
    """Finished run A, a restart B cancelled part-way, a restart C: B's folder is recorded without A's model's
    figures, A's record keeps A's time, and the round's time is C's alone."""
    import threading

    from ASFDALib.adaptation.pipeline import finetune_session

    short = FinetuneConfig(iterations=2, pseudo_iterations=0, batch_size=1, device="cpu")
    longer = FinetuneConfig(iterations=50, pseudo_iterations=0, batch_size=1, checkpoint_every=1, device="cpu")
    cancel = threading.Event()
    with Session.open(labelled_session) as session:
        finetune_session(session, short, pseudo=False)
        first_seconds = session.rounds[-1]["metrics"]["seconds"]
        finetune_session(session, longer, False, "restart", cancel, lambda p: cancel.set())
        assert "seconds" not in session.rounds[-1]["metrics"]  # the kept model's time is in its replaced record
        finetune_session(session, short, False, "restart")
    entry = Session.open(labelled_session).rounds[-1]
    a, b = entry["replaced"]
    assert a["folder"].endswith("round1-replaced-1") and a["iterations"] == {"stage1": 2, "stage2": 0}
    assert a["seconds"] == first_seconds
    assert b["folder"].endswith("round1-replaced-2") and b["iterations"] is None and "seconds" not in b
    assert b["status"] == "cancelled" and b["unfinished"]["stage1"] >= 1
    assert entry["metrics"]["iterations"] == {"stage1": 2, "stage2": 0} and entry["checkpoint"].endswith(
        "round1/final.pt"
    )


def test_with_every_volume_labelled_the_records_name_no_pseudo_label_gate(labelled_session, mri_pool, capsys):
    """No unlabeled volume was judged: run.json and session.json say no gate ran, not the one the recipe names."""
    assert main(["labels", "import", str(labelled_session), "--from", str(mri_pool / "labels"), "--all"]) == 0
    assert main(["finetune", str(labelled_session), "--iterations", "4", "--pseudo-iterations", "2"]) == 0
    assert "no unlabeled volume is left in the pool: stage 2 trains on the labels alone" in capsys.readouterr().out
    run = json.loads((labelled_session / "checkpoints" / "round1" / "run.json").read_text())
    (entry,) = run["history"]
    assert (entry["pseudo_gate"], entry["pseudo_labelled"], entry["teacher"]) == (None, [], "none")
    assert run["recipe"]["reliability"] == "rounds"  # what was asked stays in the recipe
    metrics = json.loads((labelled_session / "session.json").read_text())["rounds"][0]["metrics"]
    assert metrics["pseudo_gate"] is None and metrics["pseudo_labelled"] == []


def test_evaluate_follows_a_moved_session_by_its_weights_and_warns_where_it_is_gone(
    adapted_session, mri_pool, tmp_path, capsys
):
    """A session moved after it predicted: evaluate cannot find it by the path predict recorded."""
    first = tmp_path / "first"
    shutil.copytree(adapted_session[1], first)
    pred = tmp_path / "pred"
    assert main(["predict", str(first), "--images", str(mri_pool / "images"), "--out", str(pred)]) == 0
    moved = first.rename(tmp_path / "moved")
    capsys.readouterr()
    labels = ["--pred", str(pred), "--labels", str(mri_pool / "labels")]
    assert main(["evaluate", *labels, "--out", str(tmp_path / "a.csv")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"{first.resolve()} made these label maps and is gone from there (moved, or another machine)" in said
    assert main(["evaluate", *labels, "--session", str(moved), "--out", str(tmp_path / "b.csv")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "made these label maps, not" not in said, said
    assert "not the 4 the session trained on" in said  # 2 labelled, 2 pseudo-labelled
