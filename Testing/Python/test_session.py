"""The session folder: atomic, versioned, locked, and closed to paths that escape it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ASFDALib.adaptation.session import SESSION_FILE, Session, SessionError, case_id, safe_path, storage_stems
from ASFDALib.bench.phantoms import write_phantoms


def test_new_session_is_saved_atomically_with_a_schema_version(tmp_path):
    session = Session.open(tmp_path / "s", create=True)
    session.add_round(["a.nii.gz"], {"name": "asfda"}, "digest")
    session.save()
    data = json.loads((tmp_path / "s" / SESSION_FILE).read_text())
    assert data["schema"] == 1 and data["rounds"][0]["query"] == ["a.nii.gz"]
    session.save()
    assert (tmp_path / "s" / "session.json.bak").is_file()
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]


def test_opening_a_folder_that_is_not_a_session_says_what_to_run(tmp_path):
    with pytest.raises(SessionError) as refused:
        Session.open(tmp_path)
    assert f"give the folder 'asfda rank --out' made, or make one: 'asfda rank --images SCANS --out {tmp_path}'" in str(
        refused.value
    )
    # a folder of scans (here a dataset's, with images/) is ranked into a session, never made one
    write_phantoms(tmp_path / "pool", 1)
    for folder in (tmp_path / "pool", tmp_path / "pool" / "images"):
        with pytest.raises(SessionError) as refused:
            Session.open(folder)
        hint = f"it holds scans: rank them into a session first, 'asfda rank --images {tmp_path / 'pool' / 'images'}"
        assert hint in str(refused.value)
    with pytest.raises(SessionError) as refused:  # a clinician's labels: they are imported into a session
        Session.open(tmp_path / "pool" / "labels")
    hint = "it holds label maps: give the session folder ('asfda rank --out' made it); labels come in with 'asfda"
    assert hint in str(refused.value) and f"--from {tmp_path / 'pool' / 'labels'}'" in str(refused.value)


ROUND = {"index": 1, "query": ["a.nii.gz"]}
IMAGES = {"root": "/data", "files": []}
MODEL = {"path": "m.pt", "digest": "d", "card": {}}


@pytest.mark.parametrize(
    "content,message",
    [
        ("{oops", "unreadable session file"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"schema": 99, "rounds": [], "labels": {}}', "schema version 99"),
        ('{"schema": 1, "rounds": {}, "labels": {}}', "'rounds' must be a list"),
        ('{"schema": 1, "rounds": [], "labels": {"a": "x"}}', "labels of 'a'"),
        ('{"rounds": [], "labels": {}}', "no 'schema' version"),
        (
            json.dumps({"schema": 1, "rounds": [ROUND], "labels": {}, "images": IMAGES, "model": {"path": "m.pt"}}),
            "'model.digest' is missing",
        ),
        (
            json.dumps({"schema": 1, "rounds": [{"index": 1}], "labels": {}, "images": IMAGES, "model": MODEL}),
            "a round without its 'index' or its 'query' list",
        ),
        (
            json.dumps({"schema": 1, "rounds": [{"index": 1, "query": "a.nii.gz"}], "labels": {}, "images": IMAGES}),
            "a round without its 'index' or its 'query' list",
        ),
        (json.dumps({"schema": 1, "rounds": [ROUND], "labels": {}, "images": IMAGES}), "'model' is missing"),
        (json.dumps({"schema": 1, "rounds": [ROUND], "labels": {}, "model": MODEL}), "'images' is missing"),
    ],
)
def test_a_session_file_edited_into_nonsense_is_refused_clearly(tmp_path, content, message):
    (tmp_path / SESSION_FILE).write_text(content)
    with pytest.raises(SessionError, match=message) as refused:
        Session.open(tmp_path)
    if "schema version" not in message:  # the fix named is one that exists: the backup where kept, else a new session
        assert "no earlier version is kept (session.json.bak); rank the pool into a new session" in str(refused.value)
        (tmp_path / (SESSION_FILE + ".bak")).write_text("{}")
        with pytest.raises(SessionError, match="restore it from session.json.bak"):
            Session.open(tmp_path)
        (tmp_path / (SESSION_FILE + ".bak")).write_text('{"updated": "2026-12-06T05:16:43+00:00"}')
        with pytest.raises(SessionError, match=r"before its last change, saved 2026-12-06T05:16:43\+00:00\)"):
            Session.open(tmp_path)


@pytest.mark.parametrize("bad", ["../outside.nii.gz", "/etc/passwd", "labels/../../x", "", "labels\\..\\..\\x"])
def test_paths_from_the_session_file_cannot_escape_it(tmp_path, bad):
    with pytest.raises(SessionError):
        safe_path(tmp_path, bad)


def test_a_symlink_pointing_outside_is_refused(tmp_path):
    (tmp_path / "s").mkdir()
    os.symlink(tmp_path, tmp_path / "s" / "link")
    with pytest.raises(SessionError, match="outside the session folder"):
        safe_path(tmp_path / "s", "link/secret.nii.gz")
    assert safe_path(tmp_path / "s", "labels/a.nii.gz") == (tmp_path / "s" / "labels" / "a.nii.gz").resolve()


def test_a_second_writer_in_this_process_is_told_to_leave_the_first_ones_with_block(tmp_path):
    """Two Session objects in one notebook: "stop pid N" would mean killing the notebook itself."""
    first = Session.open(tmp_path, create=True).lock()
    try:
        with pytest.raises(SessionError, match=r"held by another Session object of this very process .*'with' block"):
            Session.open(tmp_path, create=True).lock()
    finally:
        first.unlock()
    Session.open(tmp_path, create=True).lock().unlock()  # free again


# A writer in its own process: "hold" takes the lock and keeps it until killed, "try" takes and frees it.
# With "no-fcntl" it first makes fcntl unimportable, as it is on Windows, before anything imports it.
WRITER = """
import sys
if sys.argv[1] == "no-fcntl":
    sys.modules["fcntl"] = None
import time
from ASFDALib.adaptation.session import Session, SessionError
if sys.argv[1] == "no-fcntl":
    assert sys.modules["fcntl"] is None
try:
    session = Session.open(sys.argv[3], create=True).lock()
except SessionError as exc:
    print("refused:", exc, flush=True)
    sys.exit(0)
print("locked", type(session._lock_handle).__name__, flush=True)
if sys.argv[2] == "hold":
    time.sleep(120)
session.unlock()
"""


def _writer(tmp_path: Path, platform: str, action: str, session: Path) -> tuple[list[str], dict[str, str]]:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo, "PYTHONWARNINGS": "ignore"}
    return [sys.executable, str(script), platform, action, str(session)], env


@pytest.mark.parametrize("platform", ["fcntl", "no-fcntl"])
def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holders_lock_is_reclaimed(tmp_path, platform):
    """Both with the OS lock and where fcntl cannot be imported (as on Windows; on Linux filelock then uses
    its soft lock, which names the holder's pid and host and is reclaimed when that pid is gone)."""
    session = tmp_path / "s"
    command, env = _writer(tmp_path, platform, "hold", session)
    holder = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        first = holder.stdout.readline().split()
        assert first[0] == "locked"
        assert first[1] == ("UnixFileLock" if platform == "fcntl" else "SoftFileLock")
        command, env = _writer(tmp_path, platform, "try", session)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert second.stdout.startswith("refused:") and f"in use by pid {holder.pid} on " in second.stdout
    finally:
        holder.kill()
        holder.wait()
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert third.stdout.split()[0] == "locked", third.stdout + third.stderr
    if platform == "fcntl":  # and in this process, which can import fcntl
        Session.open(session, create=True).lock().unlock()


def test_a_released_lock_leaves_no_holder_record(tmp_path):
    session = Session.open(tmp_path, create=True).lock()
    assert (tmp_path / ".asfda.lock.holder").read_text().startswith(f"pid {os.getpid()} on ")
    session.unlock()
    assert not (tmp_path / ".asfda.lock.holder").exists()


def test_label_versions_never_overwrite(tmp_path):
    session = Session.open(tmp_path, create=True)
    first = session.next_label_path("case 1.nii.gz")
    first.write_bytes(b"v1")
    session.record_label("case 1.nii.gz", first, "h1", "test")
    second = session.next_label_path("case 1.nii.gz")
    assert (first.name, second.name) == ("case_1.v1.nii.gz", "case_1.v2.nii.gz")
    second.write_bytes(b"v2")
    session.record_label("case 1.nii.gz", second, "h2", "test")
    assert session.labelled() == {"case 1.nii.gz": second.resolve()}
    assert first.read_bytes() == b"v1"


def test_a_new_label_version_passes_files_no_version_records_and_versions_recorded_with_backslashes(tmp_path):
    """A label file on disk that session.json does not record (its .bak restored, an import stopped before its
    save), the panel's .seg.nrrd companion of one, and a version recorded as Windows wrote it (``labels\\...``)
    each keep their number: the next version is past all of them, and the unrecorded ones are named."""
    session = Session.open(tmp_path, create=True)
    first = session.next_label_path("case 1.nii.gz")
    first.write_bytes(b"v1")
    session.record_label("case 1.nii.gz", first, "h1", "test")
    session.data["labels"]["case 1.nii.gz"][0]["file"] = "labels\\case_1.v1.nii.gz"
    assert session.next_label_path("case 1.nii.gz").name == "case_1.v2.nii.gz"
    (tmp_path / "labels" / "case_1.v2.nii.gz").write_bytes(b"drawn, forgotten by a restored session.json")
    (tmp_path / "labels" / "case_1.v3.seg.nrrd").write_bytes(b"a companion whose NIfTI never came")
    assert session.next_label_path("case 1.nii.gz").name == "case_1.v4.nii.gz"
    assert session.unrecorded_labels("case 1.nii.gz") == [tmp_path / "labels" / "case_1.v2.nii.gz"]


def test_recorded_paths_use_slashes_and_a_windows_written_session_opens_on_linux(tmp_path):
    """A clinician labels on Windows, the fine-tune runs on a Linux server: the session's paths must read there."""
    session = Session.open(tmp_path, create=True)
    label = session.next_label_path("case 1.nii.gz")
    label.write_bytes(b"v1")
    session.record_label("case 1.nii.gz", label, "h1", "test")
    assert session.data["labels"]["case 1.nii.gz"][0]["file"] == "labels/case_1.v1.nii.gz"
    session.data["labels"]["case 1.nii.gz"][0]["file"] = "labels\\case_1.v1.nii.gz"  # as Windows wrote it before
    assert session.labelled() == {"case 1.nii.gz": label.resolve()}
    (tmp_path / "odd\\name.nii.gz").write_bytes(b"x")  # a file whose very name has a backslash is still itself
    assert safe_path(tmp_path, "odd\\name.nii.gz") == (tmp_path / "odd\\name.nii.gz").resolve()


def test_a_recursive_pools_names_recorded_on_windows_read_as_every_system_names_them(tmp_path):
    """Before names were recorded with /, a recursive pool ranked on Windows named its scans site1\\a.nii.gz."""
    import json

    session = Session.open(tmp_path / "s", create=True)
    session.set_model(tmp_path / "m.pt", "digest", "state_dict", {"class_names": ["background", "liver"]}, False)
    (tmp_path / "pool" / "site1").mkdir(parents=True)
    session.set_images(tmp_path / "pool", {"site1/a.nii.gz": "h1", "site1/b.nii.gz": "h2"}, recursive=True)
    label = session.next_label_path("site1/a.nii.gz")
    label.write_bytes(b"v1")
    session.record_label("site1/a.nii.gz", label, "h3", "test")
    session.add_round(["site1/a.nii.gz"], {"name": "asfda"}, "digest")
    session.save()
    path = tmp_path / "s" / "session.json"
    path.write_text(path.read_text().replace("site1/", "site1\\\\"))  # as Windows wrote it then
    assert '"site1\\\\a.nii.gz"' in path.read_text()
    reopened = Session.open(tmp_path / "s")
    assert reopened.image_names() == ["site1/a.nii.gz", "site1/b.nii.gz"]
    assert reopened.labelled() == {"site1/a.nii.gz": label.resolve()} and reopened.queried() == ["site1/a.nii.gz"]
    assert json.loads(path.read_text())["labels"]["site1\\a.nii.gz"]  # the file itself changes only when saved


def test_case_ids_are_file_system_safe_and_keep_letters_of_any_script():
    assert case_id("Patient Ä/01.nii.gz") == "Patient_Ä_01"
    assert case_id("ct.seg.nrrd") == "ct.seg"
    assert case_id("Patient 07 Müller.nii.gz") != case_id("Patient 07 Möller.nii.gz")
    assert case_id("Mu\u0308ller.nii.gz") == case_id("Müller.nii.gz") == "Müller"  # macOS writes names decomposed


def test_two_images_never_share_a_stored_file_name(tmp_path):
    """ "a b" and "a_b" have one case id: their stored labels (and pseudo-labels, predictions) must not look
    like two versions of one case, nor replace each other."""
    pool = ["a b.nii.gz", "a_b.nii.gz", "case 1.nii.gz", "PAT08/scan", "PAT08_scan"]
    stems = storage_stems(pool)
    assert stems["case 1.nii.gz"] == "case_1"  # no other image has its case id: kept as it is
    assert len(set(stems.values())) == 5 and stems["a b.nii.gz"].startswith("a_b-")
    session = Session.open(tmp_path, create=True)
    session.set_images(tmp_path, {n: "h" for n in pool}, recursive=True)
    for name in ("a b.nii.gz", "a_b.nii.gz"):
        path = session.next_label_path(name)
        path.write_bytes(b"label")
        session.record_label(name, path, "h", "test")
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == sorted(
        [f"{stems['a b.nii.gz']}.v1.nii.gz", f"{stems['a_b.nii.gz']}.v1.nii.gz"]
    )


def test_taking_the_lock_clears_scratch_files_of_a_killed_writer(tmp_path):
    session = Session.open(tmp_path, create=True)
    session.save()
    (tmp_path / ".session.json.abc123.tmp").write_text("{half")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / ".case.v1.nii.gz.x.tmp").write_bytes(b"half")
    with Session.open(tmp_path):
        assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "labels").glob(".*.tmp"))


def test_taking_the_lock_clears_checkpoint_scratch_and_only_stale_cache_scratch(tmp_path):
    import os
    import time

    Session.open(tmp_path, create=True).save()
    (tmp_path / "checkpoints" / "round1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "round1" / ".last.pt.x1.tmp").write_bytes(b"half")
    (tmp_path / "cache").mkdir()
    old, fresh = tmp_path / "cache" / ".a.npz.x2.tmp", tmp_path / "cache" / ".b.npz.x3.tmp"
    old.write_bytes(b"half")
    fresh.write_bytes(b"being written by another rank")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    with Session.open(tmp_path):
        assert not list((tmp_path / "checkpoints").rglob("*.tmp"))
        assert not old.exists() and fresh.exists()


def test_taking_the_lock_reads_the_session_again_so_what_another_writer_saved_is_kept(tmp_path):
    """Opened, then locked after another writer saved: the write starts from the file, not the stale read."""
    first = Session.open(tmp_path, create=True)
    first.set_model(tmp_path / "m.pt", "digest", "state_dict", {}, False)  # as a first rank records them
    first.set_images(tmp_path, {"a.nii.gz": "h", "b.nii.gz": "h"}, False)
    first.save()
    stale = Session.open(tmp_path)
    with first:
        first.add_round(["a.nii.gz"], {"name": "asfda"}, "digest")
        first.save()
    with stale:
        assert [r["query"] for r in stale.rounds] == [["a.nii.gz"]]
        stale.add_round(["b.nii.gz"], {"name": "asfda"}, "digest")
        stale.save()
    assert [r["query"] for r in Session.open(tmp_path).rounds] == [["a.nii.gz"], ["b.nii.gz"]]


def test_a_python_fine_tune_of_a_session_another_run_holds_is_refused_before_it_reads_anything(tmp_path):
    """finetune_session takes the session's lock itself when its caller did not."""
    from ASFDALib.adaptation.pipeline import finetune_session
    from ASFDALib.adaptation.recipe import FinetuneConfig

    Session.open(tmp_path, create=True).save()
    with Session.open(tmp_path):
        with pytest.raises(
            SessionError, match=f"held by another Session object of this very process \\(pid {os.getpid()} on "
        ):
            finetune_session(Session.open(tmp_path), FinetuneConfig(iterations=1))
    with pytest.raises(SessionError, match="no labels yet"):  # free again: it goes on to what it needs
        finetune_session(Session.open(tmp_path), FinetuneConfig(iterations=1))
