"""Faults and hostile input: full disks, kills, memory, GPU out-of-memory, no network, fuzzed files."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, edit_dicom_slice, write_dicom_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ASFDALib.adaptation.session import Session, SessionError
from ASFDALib.atomic import atomic_write, atomic_write_json
from ASFDALib.data.volumes import read_volume, write_nifti
from ASFDALib.errors import ASFDAError, VolumeError


# --- full disk -------------------------------------------------------------------------------------
def test_an_injected_disk_full_error_is_clear_and_keeps_the_old_file(tmp_path):
    target = atomic_write_json(tmp_path / "session.json", {"v": 1})

    def full(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ASFDAError, match="disk is full.*previous version is intact"):
        atomic_write(target, full)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["session.json"]


def test_a_write_windows_refuses_for_a_moment_is_tried_again(tmp_path, monkeypatch):
    """Windows cannot replace a file another reader holds open (the panel polling a run's progress file, a
    virus scanner): os.replace raises PermissionError until the reader closes it, milliseconds later."""
    import os

    from ASFDALib import atomic

    target = atomic_write_json(tmp_path / "last.json", {"iteration": 1})
    real, refusals = os.replace, []

    def held_open_twice(src, dst):
        if len(refusals) < 2:
            refusals.append(dst)
            raise PermissionError(13, "The process cannot access the file because it is being used")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", held_open_twice)
    atomic_write_json(target, {"iteration": 2})
    assert len(refusals) == 2 and json.loads(target.read_text()) == {"iteration": 2}

    def held_open(src, dst):
        raise PermissionError(13, "The process cannot access the file because it is being used")

    monkeypatch.setattr(atomic.os, "replace", held_open)  # held for good: the error, after a second of tries
    with pytest.raises(PermissionError):
        atomic_write_json(target, {"iteration": 3})
    assert json.loads(target.read_text()) == {"iteration": 2} and [p.name for p in tmp_path.iterdir()] == ["last.json"]


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_real_full_disk_leaves_the_session_intact(tiny_disk):
    session = Session.open(tiny_disk / "s", create=True)
    session.set_model(tiny_disk / "m.pt", "d", "state_dict", {}, False)  # as a first rank records them
    session.set_images(tiny_disk, {}, False)
    session.add_round(["a.nii.gz"], {"name": "asfda"}, "d")
    session.save()
    before = (tiny_disk / "s" / "session.json").read_text()
    session.add_round(["x" * 200_000], {"name": "asfda"}, "d")  # far more than the 64 kB disk holds
    with pytest.raises(ASFDAError, match="disk is full"):
        session.save()
    assert (tiny_disk / "s" / "session.json").read_text() == before
    assert Session.open(tiny_disk / "s").rounds[0]["query"] == ["a.nii.gz"]


# --- memory ----------------------------------------------------------------------------------------
def test_a_volume_too_large_for_memory_is_skipped_before_reading(tmp_path, default_model):
    import nibabel as nib

    from ASFDALib.query.cache import ScoreCache
    from ASFDALib.query.ranking import RankConfig, choose_knowledge, score_volumes

    header = nib.Nifti1Header()
    header.set_data_shape((3000, 3000, 3000))
    header.set_data_dtype(np.int16)
    header.set_zooms((0.5, 0.5, 0.5))
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1000)  # the header promises 54 GB of voxels
    records = score_volumes(
        [path], default_model, ScoreCache(tmp_path / "c"), RankConfig(), choose_knowledge(default_model)
    )
    assert "needs about" in records[0].reason and "GB are free" in records[0].reason


def test_a_training_batch_that_cannot_fit_is_refused_with_the_setting_to_change(default_model):
    """The estimate comes from the network's own layer outputs: it names the largest batch that fits."""
    from ASFDALib.inference.memory import check_training_memory, training_bytes

    network, roi = default_model.network, default_model.card.roi_size
    fixed, per_patch = training_bytes(network, 1, roi)
    assert per_patch > 4 * int(np.prod(roi)) and fixed > 0  # at least the input itself, kept in float32
    available = fixed + 3 * per_patch + per_patch // 2
    with pytest.raises(ASFDAError, match="use --batch-size 3 or less"):
        check_training_memory(network, 8, roi, "cpu", available=available)
    check_training_memory(network, 3, roi, "cpu", available=available)
    with pytest.raises(ASFDAError, match="not even one patch fits: use a smaller roi_size"):
        check_training_memory(network, 1, roi, "cpu", available=fixed + per_patch // 2)


def test_a_foundation_sized_network_gets_a_larger_estimate_than_the_small_default(default_model):
    """SwinUNETR (feature size 24 here) keeps far more per patch than the built-in small U-Net."""
    from monai.networks.nets import SwinUNETR

    from ASFDALib.inference.memory import training_bytes

    roi = (64, 64, 64)
    swin = SwinUNETR(in_channels=1, out_channels=4, feature_size=24, spatial_dims=3)
    _, small = training_bytes(default_model.network, 1, roi)
    _, large = training_bytes(swin, 1, roi)
    assert large > 5 * small


def test_a_card_for_a_multi_channel_network_is_refused(tmp_path):
    from ASFDALib.errors import ModelError
    from ASFDALib.models.card import ModelCard, NetworkSpec
    from ASFDALib.models.loading import build_network, load_model

    args = {"spatial_dims": 3, "in_channels": 2, "out_channels": 4, "channels": [4, 8], "strides": [2]}
    torch.save(build_network(NetworkSpec("UNet", args)).state_dict(), tmp_path / "net.pt")
    card = ModelCard(class_names=["bg", "a", "b", "c"], network=NetworkSpec("UNet", args))
    with pytest.raises(ModelError, match="expects 2 input channels"):
        load_model(tmp_path / "net.pt", card)


# --- GPU out of memory -----------------------------------------------------------------------------
class _SmallGPU(torch.nn.Module):
    """Wraps a network and fails like a GPU with too little memory for more than one window."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def test_gpu_out_of_memory_retries_with_one_window_at_a_time(tmp_path, default_model, mri_pool):
    from dataclasses import replace

    from ASFDALib.inference.sweep import SweepConfig
    from ASFDALib.query.ranking import score_volume

    model = replace(default_model, network=_SmallGPU(default_model.network))
    notes: list[str] = []
    path = sorted((mri_pool / "images").iterdir())[0]
    result = score_volume(model, path, SweepConfig(), notes)
    assert np.isfinite(result.asd)
    assert notes == [f"{path.name}: GPU out of memory; retrying with one window at a time"]


# --- no network ------------------------------------------------------------------------------------
def test_rank_and_finetune_open_no_socket(tmp_path, mri_pool, monkeypatch):
    import socket

    from ASFDALib.app.cli import main

    attempts = []

    def refuse(self, *args, **kwargs):
        attempts.append(args)
        raise OSError("network access during a run")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None, *a))
    session = tmp_path / "s"
    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(session), "--budget", "1"]) == 0
    query = json.loads((session / "ranking.json").read_text())["selected"]
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / query[0]).write_bytes((mri_pool / "labels" / query[0]).read_bytes())
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt")]) == 0
    assert main(["finetune", str(session), "--iterations", "2", "--pseudo-iterations", "2"]) == 0
    assert attempts == []


# --- DICOM -----------------------------------------------------------------------------------------
def test_a_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    folder = write_dicom_series(tmp_path / "series", np.arange(8 * 8 * 6, dtype=np.int16).reshape(8, 8, 6))
    sorted(folder.iterdir())[3].unlink()
    with pytest.raises(VolumeError, match="uneven slice spacing .*missing"):
        read_volume(folder)


def _series(tmp_path: Path) -> Path:
    return write_dicom_series(tmp_path / "series", np.arange(8 * 8 * 6, dtype=np.int16).reshape(8, 8, 6))


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"ImagePositionPatient": [0.0, 0.0, 4.0]}, "uneven slice spacing .*duplicated slice"),
        ({"ImagePositionPatient": [0.0, 0.0, 7.0]}, "uneven slice spacing .*mixed slice thickness"),
        ({"PixelSpacing": [0.5, 0.5]}, r"inconsistent pixel spacing .*slice_003.dcm: \(0.5, 0.5\)\)"),
        ({"ImageOrientationPatient": [1, 0, 0, 0, 0.9848, 0.1736]}, "inconsistent slice orientation"),
    ],
    ids=["duplicated-position", "mixed-thickness", "pixel-spacing", "orientation"],
)
def test_a_dicom_series_whose_slices_disagree_is_refused_naming_the_slice(tmp_path, tags, message):
    folder = _series(tmp_path)
    edit_dicom_slice(folder, 3, **tags)
    with pytest.raises(VolumeError, match=message) as error:
        read_volume(folder)
    assert "series" in str(error.value)


def test_a_dicom_series_with_an_inconsistent_slice_is_skipped_in_a_ranking_and_the_rest_scored(tmp_path):
    from ASFDALib.app.cli import main

    pool = tmp_path / "pool"
    write_dicom_series(pool / "good", np.random.default_rng(0).normal(100, 20, (24, 24, 16)).astype(np.int16))
    bad = write_dicom_series(pool / "mixed", np.random.default_rng(1).normal(100, 20, (24, 24, 16)).astype(np.int16))
    edit_dicom_slice(bad, 5, PixelSpacing=[0.7, 0.7])
    assert main(["rank", "--images", str(pool), "--budget", "1", "--out", str(tmp_path / "s")]) == 0
    rows = {r["file"]: r for r in json.loads((tmp_path / "s" / "ranking.json").read_text())["rows"]}
    assert rows["good"]["status"] == "scored"
    assert rows["mixed"]["status"] == "skipped" and "inconsistent pixel spacing" in rows["mixed"]["reason"]


def test_extreme_values_are_scored_or_refused_never_crash(tmp_path, default_model):
    from ASFDALib.query.cache import ScoreCache
    from ASFDALib.query.ranking import RankConfig, choose_knowledge, score_volumes

    big = np.zeros((20, 20, 20), np.float32)
    big[5:15, 5:15, 5:15] = 3e38
    path = write_nifti(tmp_path / "extreme.nii", big, np.eye(4))
    (record,) = score_volumes(
        [path], default_model, ScoreCache(tmp_path / "c"), RankConfig(), choose_knowledge(default_model)
    )
    assert record.ok or record.reason


# --- kills -----------------------------------------------------------------------------------------
def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def test_killing_session_writes_at_random_points_never_leaves_a_broken_file(tmp_path):
    code = (
        "import sys; from ASFDALib.adaptation.session import Session\n"
        "s = Session.open(sys.argv[1], create=True)\n"
        "s.set_model('m.pt', 'd', 'state_dict', {}, False); s.set_images(sys.argv[1], {}, False)\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1; s.add_round([f'case{i}.nii.gz'] * 50, {'i': i}, 'd'); s.save()\n"
    )
    rng = np.random.default_rng(0)
    for _ in range(5):
        child = _python(code, str(tmp_path / "s"))
        time.sleep(float(rng.uniform(1.0, 2.0)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        session = Session.open(tmp_path / "s")  # always parseable: old or new, never half-written
        assert all(len(r["query"]) == 50 for r in session.rounds)
    leftovers = [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]
    assert all(p.name.startswith(".session.json.") for p in leftovers)  # hidden scratch files, never the session
    with Session.open(tmp_path / "s"):
        assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]  # the next writer cleans up


def test_killing_a_ranking_loses_no_finished_volume_score(tmp_path, mri_pool, default_model):
    from ASFDALib.query.ranking import RankConfig, rank_folder

    code = (
        "import sys; from ASFDALib.app.cli import main\nmain(['rank', '--images', sys.argv[1], '--out', sys.argv[2]])\n"
    )
    session = tmp_path / "s"
    cache = session / "cache"
    for delay in (4.0, 6.0):
        child = _python(code, str(mri_pool / "images"), str(session))
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        for entry in cache.glob("*.npz") if cache.is_dir() else []:
            np.load(entry)  # every entry on disk is complete
    before = {p.name for p in cache.glob("*.npz")} if cache.is_dir() else set()
    resumed = rank_folder(mri_pool / "images", default_model, cache, RankConfig())
    after = {p.name for p in cache.glob("*.npz")}
    assert before <= after and len(after) == 6
    assert sum(r.cached for r in resumed.records) == len(before)
    fresh = rank_folder(mri_pool / "images", default_model, tmp_path / "fresh", RankConfig())
    assert [r.file for r in resumed.rows] == [r.file for r in fresh.rows]


def test_killing_fine_tuning_loses_at_most_one_checkpoint_interval(tmp_path):
    code = (
        "import sys; from pathlib import Path\n"
        "from ASFDALib.models.defaults import default_model_path\n"
        "from ASFDALib.adaptation.patches import Case\n"
        "from ASFDALib.adaptation.recipe import FinetuneConfig\n"
        "from ASFDALib.adaptation.trainer import Trainer\n"
        "from ASFDALib.models.loading import load_model\n"
        "from ASFDALib.bench.phantoms import domain_config, make_phantom\n"
        "from ASFDALib.data.preprocess import preprocess\n"
        "from ASFDALib.data.volumes import Volume\n"
        "m = load_model(default_model_path())\n"
        "image, label, affine = make_phantom(0, domain_config('mri'))\n"
        "case = Case('c', preprocess(Volume(image, affine, Path('c')), m.card).numpy(), label)\n"
        "config = FinetuneConfig(batch_size=1, checkpoint_every=5, device='cpu')\n"
        "trainer = Trainer(m.network, m.card, config, Path(sys.argv[1]))\n"
        "trainer.load()\n"
        "log = open(sys.argv[2], 'a')\n"
        "trainer.run([case], 10**6, progress=lambda p: (log.write(f'{p.iteration}\\n'), log.flush()))\n"
    )
    rng = np.random.default_rng(1)
    log = tmp_path / "progress.txt"
    checkpoints = []
    for _ in range(3):
        child = _python(code, str(tmp_path / "ckpt"), str(log))
        deadline = time.time() + 120
        while time.time() < deadline and len(log.read_text().split() if log.is_file() else []) < 6 * (
            len(checkpoints) + 1
        ):
            time.sleep(0.2)
        time.sleep(float(rng.uniform(0.0, 1.0)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        reached = max(int(v) for v in log.read_text().split())
        saved = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["iteration"]
        assert 0 <= reached - saved < 5  # checkpoints every 5 iterations: a kill costs fewer than 5
        checkpoints.append(saved)
    assert checkpoints == sorted(checkpoints) and checkpoints[-1] > checkpoints[0]  # every resume went on


# --- fuzzing ---------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".nii", ".nii.gz", ".nrrd", ".mha"]))
def test_arbitrary_bytes_never_escape_as_anything_but_a_volume_error(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        read_volume(path)
    except VolumeError as exc:
        assert exc.path == path and exc.reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(st.sampled_from(["schema", "rounds", "labels", "model", "images", "x"]), json_values))
def test_any_session_file_is_opened_or_refused_clearly(tmp_path, data):
    (tmp_path / "session.json").write_text(json.dumps(data))
    try:
        session = Session.open(tmp_path)
    except SessionError:
        return
    for name in session.data["labels"]:  # whatever passed validation is safe to resolve
        for entry in session.data["labels"][name]:
            try:
                assert session.path(entry["file"]).is_relative_to(tmp_path.resolve())
            except SessionError:
                pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.integers(min_value=-3, max_value=12), min_size=1, max_size=8))
def test_label_validation_accepts_exactly_the_model_classes(tmp_path, values):
    from ASFDALib.data.labels import LabelError, validate_label

    affine = np.eye(4)
    image = write_nifti(tmp_path / "img.nii", np.arange(64, dtype=np.int16).reshape(4, 4, 4), affine)
    label = np.zeros((4, 4, 4), np.int16)
    label.flat[: len(values)] = values
    path = write_nifti(tmp_path / "lab.nii", label, affine)
    classes = ["background", "a", "b", "c"]
    if all(0 <= v < 4 for v in values):
        out, _ = validate_label(path, image, classes)
        np.testing.assert_array_equal(out, label)
    else:
        with pytest.raises(LabelError, match="not classes of the model"):
            validate_label(path, image, classes)


def test_a_file_browser_opening_a_dicom_folder_changes_no_scan(tmp_path):
    """Finder writes .DS_Store, Explorer Thumbs.db: neither is part of the series, so its hash (by which a
    session knows the image a label was drawn on) and its stamp stay."""
    from ASFDALib.data.volumes import content_hash, content_stamp

    folder = _series(tmp_path)
    before = content_hash(folder), content_stamp(folder)
    (folder / ".DS_Store").write_bytes(b"finder")
    (folder / "Thumbs.db").write_bytes(b"explorer")
    assert (content_hash(folder), content_stamp(folder)) == before


def test_a_torchscript_models_training_memory_is_measured_as_its_eager_twins_without_its_weights():
    """A ScriptModule takes no forward hooks, so what autograd saves is measured instead: its weights are not
    activations (they are the fixed part), so the estimate stays near the eager network's, not 10x above it."""
    import torch
    from monai.networks.nets import UNet

    from ASFDALib.inference.memory import activation_bytes_per_voxel

    network = UNet(3, 1, 4, (64, 128, 256), (2, 2), num_res_units=1)
    eager = activation_bytes_per_voxel(network, (32, 32, 32))
    scripted = activation_bytes_per_voxel(torch.jit.script(network), (32, 32, 32))
    assert 0.5 * eager < scripted <= eager
