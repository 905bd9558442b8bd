"""The Slicer panel's behaviour, driven as a user would drive the panel (no Qt needed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from ASFDALib.app.cli import main
from ASFDALib.app.workflow import PanelSettings, Phase, Workflow
from ASFDALib.data.volumes import content_hash, read_volume
from ASFDALib.outputs import predictions_made_by


@pytest.fixture
def flow(tmp_path, mri_pool):
    settings = PanelSettings(
        images=str(mri_pool / "images"),
        session=str(tmp_path / "session"),
        budget=2,
        iterations=10,
        pseudo_iterations=6,
        device="cpu",
    )
    return Workflow(settings)


def _truth(mri_pool, name):
    return read_volume(mri_pool / "labels" / name)


def test_actions_explain_why_they_are_disabled(tmp_path):
    flow = Workflow()
    assert flow.check("rank") == (False, "choose a session folder")
    flow.settings.session = str(tmp_path / "s")
    assert flow.check("rank") == (False, "choose the folder of target volumes")
    assert flow.check("next_case") == (False, "rank first")
    assert flow.check("finetune") == (False, "save at least one label first")
    assert flow.check("export") == (False, "fine-tune first")
    assert flow.check("cancel") == (False, "nothing is running")


def test_rank_runs_in_a_worker_and_fills_the_table(flow):
    flow.start_rank()
    assert flow.phase is Phase.RANKING and flow.busy
    assert flow.check("rank")[0] is False and "wait for ranking" in flow.check("rank")[1]
    flow.wait()
    assert flow.phase is Phase.RANKED and not flow.busy
    assert len(flow.rows) == 6 and len(flow.query) == 2
    assert [r.selected for r in flow.rows] == [True, True, False, False, False, False]
    assert all(r.status == "unlabelled" for r in flow.rows)
    assert flow.progress == 1.0 and flow.progress_text.startswith("Ranked 6 volumes")


def test_progress_reports_volume_and_eta_while_ranking(flow):
    texts = []
    flow.start_rank()
    while flow.busy:
        flow.poll()
        texts.append(flow.progress_text)
        time.sleep(0.01)
    assert any(t.startswith("Scoring ") and "/6" in t for t in texts)


def test_cancel_stops_ranking_and_keeps_finished_volumes(flow, tmp_path):
    flow.start_rank()
    flow.cancel()
    flow.wait()
    assert any("cancelled" in line for line in flow.log)
    assert not flow.busy and flow.phase is Phase.SETUP


def test_label_save_versions_and_end_state(flow, mri_pool):
    flow.start_rank()
    flow.wait()
    first = flow.next_case()
    assert first == flow.query[0]
    prefill = flow.prefill(first)
    volume = flow.case_volume(first)
    assert prefill.shape == volume.array.shape and prefill.dtype == np.uint8
    written = []
    truth = _truth(mri_pool, first)
    nifti, seg = flow.save_label(
        first, truth.array, truth.affine, write_seg=lambda p: written.append(p) or p.write_bytes(b"seg")
    )
    assert nifti.name.endswith(".v1.nii.gz") and seg.name.endswith(".v1.seg.nrrd") and written == [seg]
    np.testing.assert_array_equal(read_volume(nifti).array, truth.array)
    again, _ = flow.save_label(first, truth.array, truth.affine)
    assert again.name.endswith(".v2.nii.gz") and nifti.is_file()  # never overwritten
    assert next(r for r in flow.rows if r.case == first).status == "labelled"
    second = flow.next_case()
    assert second == flow.query[1]
    truth = _truth(mri_pool, second)
    flow.save_label(second, truth.array, truth.affine)
    assert flow.next_case() is None
    assert flow.log[-1] == "All 2 queried cases are labelled. Fine-tune next."
    assert flow.check("next_case") == (False, "every queried case is labelled: fine-tune next")


def test_a_label_on_the_wrong_grid_is_refused(flow):
    from ASFDALib.errors import VolumeError

    flow.start_rank()
    flow.wait()
    with pytest.raises(VolumeError, match="differs from the image's"):
        flow.save_label(flow.query[0], np.zeros((3, 3, 3), np.uint8), np.eye(4))


def test_finetune_apply_export_and_reopen(flow, mri_pool, tmp_path):
    flow.start_rank()
    flow.wait()
    for name in flow.query:
        truth = _truth(mri_pool, name)
        flow.save_label(name, truth.array, truth.affine)
    flow.start_finetune()
    seen = set()
    while flow.busy:
        flow.poll()
        seen.add(flow.progress_text.split(":")[0])
        time.sleep(0.02)
    flow.poll()
    assert any("fine-tuning done" in line for line in flow.log), flow.log[-5:]
    # the default gate keeps what the model still agrees with its source on; this source model segments
    # nothing on MRI, so the flipped views judge instead, and a model of 10 iterations is not consistent
    # under flips either: no volume is pseudo-labelled and the log says why
    assert "Fine-tuning stage 1 (labels)" in seen and "Fine-tuning stage 2 (labels alone)" in seen
    said = next(line for line in flow.log if line.startswith("no unlabeled volume passed the flips gate"))
    assert said.startswith("no unlabeled volume passed the flips gate: stage 2 trains on the labels alone (the")
    assert "no volume reached the rounds gate's floor (the adapted model agrees with the model the round" in said
    assert "To judge by the adapted model's confidence" in said
    assert "(in the panel: Pseudo-label gate confidence, then Train again)" in said
    assert flow.check("apply")[0] and flow.check("export")[0] and flow.check("next_round")[0]
    statuses = {r.status for r in flow.rows}
    assert statuses == {"labelled", "unlabelled"}, statuses
    bundle = flow.export(tmp_path / "bundle").path  # the format offered for a MONAI network's session
    assert (bundle / "configs" / "inference.json").is_file()

    reopened = Workflow(PanelSettings(session=flow.settings.session))
    assert reopened.reopen()
    assert reopened.settings.images == flow.settings.images
    assert reopened.settings.pseudo_gate == "rounds"  # the gate chosen, though its fallback judged
    assert reopened.query == flow.query and reopened.phase is Phase.RANKED
    assert {r.case: r.status for r in reopened.rows if r.case in flow.query} == dict.fromkeys(flow.query, "labelled")

    reopened.start_next_round()
    reopened.wait()
    assert {r.status for r in reopened.rows if r.case in flow.query} == {"labelled"}
    assert not set(reopened.query) & set(flow.query)


def test_a_session_fine_tuned_with_pseudo_labels_shows_them_when_reopened(flow, mri_pool):
    """A researcher fine-tunes from the command line with the confidence gate; the panel shows which
    volumes stage 2 pseudo-labelled."""
    from ASFDALib.app.cli import main

    _ranked_and_labelled(flow, mri_pool)
    args = ["--iterations", "4", "--pseudo-iterations", "2", "--batch-size", "1", "--pseudo-gate", "confidence"]
    assert main(["finetune", flow.settings.session, *args]) == 0
    reopened = Workflow(PanelSettings(session=flow.settings.session))
    assert reopened.reopen()
    statuses = {r.case: r.status for r in reopened.rows}
    pseudo = sorted(name for name, status in statuses.items() if status == "pseudo-labelled")
    assert len(pseudo) == 2 and not set(pseudo) & set(flow.query)  # half of the four unlabelled volumes
    assert reopened.settings.pseudo_gate == "confidence"  # the panel's gate choice shows what made them


def test_the_gate_chosen_in_the_panel_makes_the_pseudo_labels(flow, mri_pool):
    """The default gate keeps no volume on these MRI phantoms (the source model segments nothing there);
    choosing the confidence gate in the panel pseudo-labels the most confident half of the pool."""
    import json

    _ranked_and_labelled(flow, mri_pool)
    assert flow.settings.pseudo_gate == "rounds"  # the engine's default
    flow.settings.pseudo_gate = "confidence"
    flow.start_finetune(flow.finetune_mode())
    flow.wait()
    flow.poll()
    assert any("fine-tuning done" in line for line in flow.log), flow.log[-5:]
    pseudo = json.loads((Path(flow.settings.session) / "checkpoints" / "round1" / "pseudo" / "pseudo.json").read_text())
    assert pseudo["gate"] == {"reliability": "confidence", "keep_fraction": 0.5, "confidence": 0.9}
    assert any(line.startswith("2 of 4 unlabeled volumes get pseudo-labels") for line in flow.log), flow.log
    assert sorted(r.case for r in flow.rows if r.status == "pseudo-labelled") == sorted(pseudo["kept"])


def test_continuing_a_run_in_the_panel_keeps_how_its_stage_2_ran(flow, mri_pool):
    """A run started from the command line with a constant, weakly augmented stage 2 goes on that way when
    the panel continues it, as asfda finetune --extend would."""
    import json

    from ASFDALib.app.cli import main

    _ranked_and_labelled(flow, mri_pool)
    args = ["--iterations", "4", "--pseudo-iterations", "2", "--batch-size", "1", "--stage2-lr", "constant"]
    assert main(["finetune", flow.settings.session, *args, "--pseudo-augment", "weak"]) == 0
    flow.settings.iterations, flow.settings.pseudo_iterations = 4, 4
    assert flow.finetune_mode() == "extend"
    flow.start_finetune("extend")
    flow.wait()
    flow.poll()
    run = json.loads((Path(flow.settings.session) / "checkpoints" / "round1" / "run.json").read_text())
    first, extend = run["history"]
    assert (extend["stage2_lr"], extend["pseudo_augment_asked"]) == (first["stage2_lr"], first["pseudo_augment_asked"])
    assert (extend["stage2_lr"], extend["pseudo_augment_asked"]) == ("constant", "weak") and run["done"]["stage2"] == 4


def test_worker_errors_reach_the_log(tmp_path):
    (tmp_path / "empty").mkdir()
    flow = Workflow(PanelSettings(images=str(tmp_path / "empty"), session=str(tmp_path / "s")))
    flow.start_rank()
    flow.wait()
    assert any(line.startswith("ranking failed:") and "no volumes found" in line for line in flow.log)
    assert flow.phase is Phase.SETUP and not flow.busy


def _ranked_and_labelled(flow, mri_pool, count=None):
    flow.start_rank()
    flow.wait()
    for name in flow.query[:count]:
        truth = _truth(mri_pool, name)
        flow.save_label(name, truth.array, truth.affine)


def test_opening_a_case_predicts_in_the_worker_and_reopening_starts_from_the_saved_label(flow, mri_pool):
    flow.start_rank()
    flow.wait()
    name = flow.query[0]
    flow.start_open(name)
    assert flow.busy and flow.job.kind == "opening" and flow.job.thread.name == "asfda-opening"
    assert flow.take_opened() is None  # nothing until the worker reports and poll() applies it
    flow.wait()
    opened = flow.take_opened()
    assert opened.name == name and opened.source == "model prediction"
    volume = flow.case_volume(name)
    np.testing.assert_array_equal(opened.array, volume.array)
    assert opened.label.shape == volume.array.shape and opened.label.dtype == np.uint8
    assert flow.take_opened() is None  # handed over once
    assert flow.progress_text == f"Opened {name} (model prediction)"

    truth = _truth(mri_pool, name)
    nifti, _ = flow.save_label(name, truth.array, truth.affine)
    flow.start_open(name)
    flow.wait()
    again = flow.take_opened()
    assert again.source == f"label {nifti.name}"
    np.testing.assert_array_equal(again.label, truth.array)


def test_save_label_records_the_scan_as_opened_without_reading_or_hashing_it_on_the_gui_thread(
    flow, mri_pool, monkeypatch
):
    import json

    from ASFDALib.data import volumes

    flow.start_rank()
    flow.wait()
    name = flow.query[0]
    flow.start_open(name)
    flow.wait()
    scan = flow._session().image_path(name)
    opened_hash = content_hash(scan)
    hashed, real_hash = [], volumes.content_hash
    monkeypatch.setattr(volumes, "content_hash", lambda path: hashed.append(Path(path)) or real_hash(path))
    monkeypatch.setattr(volumes, "read_volume", lambda *a, **k: pytest.fail("Save label read a volume"))
    truth = _truth(mri_pool, name)
    nifti, _ = flow.save_label(name, truth.array, truth.affine)
    assert hashed == [nifti]  # the label's hash only: the scan's was taken as it opened, in the worker
    entry = json.loads((Path(flow.settings.session) / "session.json").read_text())["labels"][name][-1]
    assert entry["image_sha256"] == opened_hash and entry["image_stamp"] == volumes.content_stamp(scan)


def test_predict_remaining_writes_files_in_the_session_and_opening_one_loads_it(flow, mri_pool, capsys):
    flow.settings.pseudo = False
    _ranked_and_labelled(flow, mri_pool)
    flow.start_finetune()
    flow.wait()
    inputs = {p.name: content_hash(p) for p in (mri_pool / "images").iterdir()}
    remaining = flow.remaining()
    assert len(remaining) == 4 and flow.predictions() == {}
    flow.start_apply(remaining[:1])
    assert flow.busy and flow.job.kind == "predicting"
    flow.wait()
    assert set(flow.predictions()) == set(remaining[:1])
    flow.start_apply()  # the rest only: the first has a prediction from this model
    texts = []
    while flow.busy:
        flow.poll()
        texts.append(flow.progress_text)
        time.sleep(0.01)
    flow.poll()
    predicted = flow.predictions()
    assert set(predicted) == set(remaining)
    session = Path(flow.settings.session)
    for name, path in predicted.items():
        assert path.parent.parent == session / "predictions" and path.parent.name.startswith("round1-")
        label, volume = read_volume(path), flow.case_volume(name)
        assert label.array.shape == volume.array.shape
        np.testing.assert_allclose(label.affine, volume.affine, atol=1e-4)
    assert {p.name: content_hash(p) for p in (mri_pool / "images").iterdir()} == inputs  # inputs untouched
    assert {r.case: r.status for r in flow.rows if r.case in remaining} == dict.fromkeys(remaining, "predicted")
    assert any(t.startswith("Predicting ") for t in texts) and flow.progress_text.startswith("Predicted 3 volumes")
    assert flow.check("apply") == (
        False,
        "every remaining volume has a prediction from this model: double-click a row to open it",
    )
    flow.start_open(remaining[1])
    flow.wait()
    opened = flow.take_opened()
    assert opened.source == f"prediction {predicted[remaining[1]].name}"
    np.testing.assert_array_equal(opened.label, read_volume(predicted[remaining[1]]).array)
    # the folder says which model made its maps, as asfda predict's do: evaluate finds the session from it
    folder = predicted[remaining[0]].parent
    made_by = set(map(json.dumps, predictions_made_by(folder).values()))
    assert len(made_by) == 1 and json.loads(made_by.pop())["model"] == "adapted"
    capsys.readouterr()
    table = session.parent / "evaluation.csv"
    assert main(["evaluate", "--pred", str(folder), "--labels", str(mri_pool / "labels"), "--out", str(table)]) == 0
    said = capsys.readouterr().out
    assert f"session {session.resolve()}: the one that made these label maps" in " ".join(said.split())

    # Training the round again makes new weights: the earlier predictions are no longer this model's.
    flow.start_finetune(flow.finetune_mode(again=True))
    flow.wait()
    assert flow.predictions() == {} and flow.check("apply")[0]
    assert "predicted" not in {r.status for r in flow.rows}


def test_fine_tuning_again_is_an_explicit_choice_and_says_what_ran(flow, mri_pool):
    flow.settings.pseudo = False
    _ranked_and_labelled(flow, mri_pool, 1)
    assert flow.finetune_run() is None and flow.finetune_mode() == "new"
    assert flow.check("finetune_again") == (False, "this round has no run yet: Fine-tune starts it")
    flow.start_finetune(flow.finetune_mode())
    flow.wait()
    assert flow.last_run == "round 1 trained: stage 1 10 iterations" == flow.progress_text
    assert flow.finetune_run()["finished"] and flow.finetune_mode() == "extend"
    # Continue a finished run only to more iterations than it ran: never a run that silently does nothing.
    assert flow.check("finetune") == (
        False,
        "the last run finished (stage 1: 10 iterations, stage 2: 0): set the iterations above 10 to continue "
        "it, or train again from the round's start",
    )
    assert flow.check("finetune_again")[0]
    flow.settings.iterations = 14
    assert flow.check("finetune") == (
        True,
        "continue the finished run (stage 1: 10 iterations, stage 2: 0) to 14 iterations",
    )
    flow.start_finetune(flow.finetune_mode())
    flow.wait()
    assert flow.last_run == "round 1 extended: stage 1 10 -> 14 iterations"
    assert flow.run_text() == f"{flow.last_run}\nRound 1 has a finished run (stage 1: 14 iterations, stage 2: 0)."
    flow.start_finetune(flow.finetune_mode(again=True))
    flow.wait()
    assert flow.last_run == "round 1 trained again: stage 1 14 iterations"
    assert any(line.startswith("training round 1 again from its start") for line in flow.log)
    assert (Path(flow.settings.session) / "checkpoints" / "round1-replaced-1" / "run.json").is_file()


def test_ranking_again_before_fine_tuning_keeps_a_labelled_query_as_it_is(flow, mri_pool):
    """Rank again to look (another alpha): the labelled query is the round's budget, so nothing is added and
    the panel still knows the query, all of it labelled."""
    _ranked_and_labelled(flow, mri_pool)
    query = list(flow.query)
    flow.settings.alpha = 0.8
    flow.start_rank()
    flow.wait()
    assert flow.query == query and not flow.missing_labels()
    assert flow.next_case() is None and flow.check("finetune")[0]
    assert any(
        line.startswith("round 1's query keeps its 2 labelled volumes and adds 0: 2 in all") for line in flow.log
    )


def test_a_cancelled_run_is_continued_not_restarted_and_ranking_waits_for_it(flow, mri_pool):
    flow.settings.pseudo = False
    flow.settings.iterations = 100000
    _ranked_and_labelled(flow, mri_pool, 1)
    flow.start_finetune(flow.finetune_mode())
    while flow.busy and not flow.progress_text.startswith("Fine-tuning stage 1 (labels): "):
        flow.poll()
        time.sleep(0.01)
    flow.cancel()
    flow.wait()
    assert any(line == "fine-tuning cancelled; finished work is kept" for line in flow.log)
    run = flow.finetune_run()
    assert run is not None and not run["finished"] and flow.finetune_mode() == "resume"
    assert flow.check("finetune")[1].startswith("continue the interrupted run (stage 1: ")
    # no new query under the unfinished run: it trains on the round's labels as they were
    assert flow.check("rank") == (False, "this round's fine-tune is unfinished: Continue the last run first")
    # the same label saved again changes nothing: a label is known by its content
    truth = _truth(mri_pool, flow.query[0])
    flow.save_label(flow.query[0], truth.array, truth.affine)
    assert flow.check("finetune")[0]
    # a label saved since: continuing would train on other labels part-way (the engine refuses), so only
    # training again is offered, and the ranking waits for that
    name = flow.query[1]
    truth = _truth(mri_pool, name)
    flow.save_label(name, truth.array, truth.affine)
    assert flow.check("finetune") == (
        False,
        f"the labels changed since the interrupted run ({name} labelled): train again from the start",
    )
    assert flow.check("finetune_again")[0]
    assert flow.check("rank") == (
        False,
        "this round's fine-tune is unfinished and its labels changed since: train it again first",
    )


@pytest.mark.parametrize("recorded, restored", [("sum", "sum"), (None, None), ("absent", "sum")])
def test_reopening_a_session_keeps_the_fusion_its_rounds_ranked_with(tmp_path, recorded, restored):
    """A session ranked with --fusion sum (or before the fusion was a choice) re-ranks the same way."""
    import json

    from ASFDALib.adaptation.session import Session

    with Session.open(tmp_path / "s", create=True) as session:
        session.set_model(tmp_path / "m.pt", "digest", "state_dict", {}, False)  # as a first rank records them
        session.set_images(tmp_path, {"a.nii.gz": "h"}, False)
        strategy = {"name": "asfda", "alpha": 0.5, "budget": 2}
        if recorded != "absent":
            strategy["fusion"] = recorded
        session.add_round(["a.nii.gz"], strategy, "digest")
        session.save()
    flow = Workflow(PanelSettings(session=str(tmp_path / "s")))
    assert flow.reopen()
    assert flow.fusion == restored
    assert json.loads((tmp_path / "s" / "session.json").read_text())["rounds"][0]["strategy"] == strategy


def test_reopening_a_session_file_that_cannot_be_read_says_why(tmp_path):
    """Passed over as "no session", the panel would start a new one in its folder."""
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "session.json").write_text('{"schema": 1, "rounds": [], "labels": {}, "model": {"path": "m"}}')
    flow = Workflow(PanelSettings(session=str(tmp_path / "s")))
    assert not flow.reopen()
    assert "session.json: 'model.digest' is missing (edited by hand?)" in flow.log[-1]


def test_the_format_export_offers_and_every_buttons_state_come_without_importing_torch(tmp_path):
    """The panel asks them on every refresh, before its dependencies may be installed; a session on nnU-Net's
    residual encoder, which no bundle carries, is offered pt2."""
    import subprocess
    import sys

    from ASFDALib.adaptation.session import Session

    with Session.open(tmp_path / "s", create=True) as session:  # as a first rank records the model
        network = {"name": "ResidualEncoderUNet", "args": {}}
        session.set_model(tmp_path / "m.pth", "digest", "state_dict", {}, False, {"network": network})
        session.save()
    code = (
        "import sys; from ASFDALib.app.workflow import BUTTON_ACTIONS, PanelSettings, Workflow; "
        "flow = Workflow(PanelSettings(session=sys.argv[1])); [flow.check(a) for a in BUTTON_ACTIONS.values()]; "
        "print(flow.export_format(), 'torch' in sys.modules)"
    )
    ran = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True, check=True)
    assert ran.stdout.split() == ["pt2", "False"]
