"""Bad inputs and injected kills, counted: what was tried, what was handled, what was lost.

    python benchmarks/fault_injection.py [--kills 5] [--json benchmarks/results/faults.json]

1. A folder mixing good volumes with every kind of bad input is ranked: each bad file must be skipped
   with a reason naming it, each good one scored, and the run must exit 0. Bad labels, sessions and
   model cards go through their own commands and must be refused with exit code 1 and a message.
2. Processes are killed (SIGKILL) at random points while ranking, fine-tuning and writing the session;
   after each kill the session must open, every saved label must be byte-identical, every finished
   volume score must still load, and resuming must work. Data lost is counted (it must be zero).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from _common import emit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing" / "Python"))
from conftest import edit_dicom_slice, write_dicom_series  # noqa: E402  (the tests' DICOM helpers)


def _nifti(array, affine=None) -> bytes:
    return nib.Nifti1Image(array, np.eye(4) if affine is None else affine).to_bytes()


def bad_volumes(folder: Path) -> dict[str, str]:
    """Write the bad-volume corpus; returns file name -> what is wrong with it."""
    good = gzip.compress(_nifti(np.arange(1000, dtype=np.int16).reshape(10, 10, 10)))
    corpus = {
        "truncated.nii.gz": (good[:200], "truncated gzip"),
        "magic.nii": (b"\x00" * 400, "wrong magic bytes"),
        "empty.nii.gz": (b"", "zero-size file"),
        "text.nii.gz": (b"hello\n" * 20, "text file named .nii.gz"),
        "flat.nii": (_nifti((np.ones((8, 8, 1)) * np.arange(8)[:, None, None]).astype(np.int16)), "2D image"),
        "movie.nii": (_nifti(np.random.rand(6, 6, 6, 3).astype(np.float32)), "4D image"),
        "nan.nii": (_nifti(np.full((6, 6, 6), np.nan, np.float32)), "NaN voxels"),
        "inf.nii": (_nifti(np.full((6, 6, 6), np.inf, np.float32)), "Inf voxels"),
        "constant.nii": (_nifti(np.zeros((6, 6, 6), np.int16)), "constant image"),
        "bad.nrrd": (b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n", "broken NRRD"),
    }
    header = nib.Nifti1Header()
    header.set_data_shape((3000, 3000, 3000))
    header.set_data_dtype(np.int16)
    corpus["huge.nii"] = (header.binaryblock + b"\0" * 1004, "header promising 54 GB")
    for name, (data, _) in corpus.items():
        (folder / name).write_bytes(data)
    locked = folder / "no_permission.nii"
    locked.write_bytes(_nifti(np.arange(1000, dtype=np.int16).reshape(10, 10, 10)))
    corpus["no_permission.nii"] = (b"", "unreadable permissions (readable anyway when run as root)")
    locked.chmod(0)
    (folder / "loop").mkdir()
    os.symlink(folder, folder / "loop" / "back")
    corpus["loop/back"] = (b"", "symlink loop (with --recursive)")
    return {name: why for name, (_, why) in corpus.items()} | bad_dicom_series(folder)


def bad_dicom_series(folder: Path) -> dict[str, str]:
    """DICOM series folders whose slices disagree, each a variant the reader must refuse."""
    array = np.random.default_rng(0).normal(100, 20, (12, 12, 8)).astype(np.int16)
    edits = {
        "dicom_missing_slice": (None, "DICOM series with a missing slice"),
        "dicom_duplicate_slice": ({"ImagePositionPatient": [0.0, 0.0, 4.0]}, "DICOM slice at a duplicated position"),
        "dicom_mixed_thickness": ({"ImagePositionPatient": [0.0, 0.0, 7.0]}, "DICOM series with mixed spacing"),
        "dicom_pixel_spacing": ({"PixelSpacing": [0.5, 0.5]}, "DICOM slice with another pixel spacing"),
        "dicom_orientation": (
            {"ImageOrientationPatient": [1, 0, 0, 0, 0.9848, 0.1736]},
            "DICOM slice with another orientation",
        ),
    }
    for name, (tags, _) in edits.items():
        series = write_dicom_series(folder / name, array)
        if tags is None:
            sorted(series.iterdir())[3].unlink()
        else:
            edit_dicom_slice(series, 3, **tags)
    return {name: why for name, (_, why) in edits.items()}


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "asfda"), *args], capture_output=True, encoding="utf-8", errors="replace", **kw
    )


def bad_input_trial(work: Path) -> dict:
    from ASFDALib.bench.phantoms import write_pool

    write_pool(work / "pool", 3, seed=1)
    images = work / "pool" / "images"
    shutil.copy(images / sorted(os.listdir(images))[0], images / "Patient Ä 01 – scan.nii.gz")  # unicode
    corpus = bad_volumes(images)
    done = run(["rank", "--images", str(images), "--out", str(work / "s"), "--recursive"])
    rows = json.loads((work / "s" / "ranking.json").read_text())["rows"] if done.returncode == 0 else []
    skipped = {r["file"] for r in rows if r["status"] == "skipped" and r["reason"]}
    scored = {r["file"] for r in rows if r["status"] == "scored"}
    volume_cases = [n for n in corpus if n not in ("loop/back", "no_permission.nii")]
    handled = sum(n in skipped for n in volume_cases) + ("no_permission.nii" in skipped | scored)
    handled += int(done.returncode == 0)  # the symlink loop did not trap the recursive scan
    outcomes = {"volumes": {"tried": len(corpus), "handled": handled, "good_scored": len(scored)}}
    # labels, sessions and model cards
    query = json.loads((work / "s" / "ranking.json").read_text())["selected"][0]
    bad_labels = work / "bad_labels"
    bad_labels.mkdir()
    image = nib.load(str(images / query))
    cases = {
        "grid": _nifti(np.zeros((5, 5, 5), np.uint8)),
        "values": _nifti(np.full(image.shape, 9, np.uint8), image.affine),
        "nan": _nifti(np.full(image.shape, np.nan, np.float32), image.affine),
    }
    refused = 0
    for key, data in cases.items():
        folder = bad_labels / key
        folder.mkdir()
        (folder / query).write_bytes(data)
        result = run(["labels", "import", str(work / "s"), "--from", str(folder)])
        refused += result.returncode == 1 and "refused" in result.stdout
    session_file = work / "s" / "session.json"
    saved = session_file.read_text()
    session_file.write_text('{"schema": 1, "rounds": "nonsense", "labels": {}}')
    result = run(["labels", str(work / "s")])
    refused += result.returncode == 1 and "must be a list" in result.stderr
    session_file.write_text(saved)
    # a complete model (its head fixed in the file: TorchScript here) with a card of another class count; a state
    # dict with its network named instead gets a new head for the card's classes (README, "What goes in")
    import torch

    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.loading import load_model

    torch.jit.script(load_model(default_model_path()).network.cpu()).save(str(work / "net.ts"))
    card = json.loads((REPO / "Resources" / "Model" / "asfda_default.card.json").read_text())
    card["class_names"] = card["class_names"][:3]
    (work / "card.json").write_text(json.dumps(card))
    model = ["--model", str(work / "net.ts"), "--card", str(work / "card.json"), "--trust"]
    result = run(["rank", "--images", str(images), "--out", str(work / "s2"), *model])
    refused += result.returncode == 1 and "outputs 4 channels but its card lists 3 classes" in result.stderr
    outcomes["labels_sessions_cards"] = {"tried": len(cases) + 2, "handled": int(refused)}
    return outcomes


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint_progress(session: Path) -> tuple[int, int]:
    """(stage number, iteration) of the newest checkpoint: with checkpoints every N iterations a kill
    loses at most the N - 1 iterations since it, so this must never go backwards."""
    import torch

    best = (0, 0)
    for path in (session / "checkpoints").glob("round*/last.pt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        best = max(best, (2 if state["stage"] == "stage2" else 1, int(state["iteration"])))
    return best


def kill_trial(work: Path, kills: int, seed: int = 0) -> dict:
    from ASFDALib.adaptation.session import Session
    from ASFDALib.bench.phantoms import write_pool

    rng = np.random.default_rng(seed)
    write_pool(work / "pool", 8, seed=2)
    session = work / "s"
    survived, injected, lost, scores_lost = 0, 0, 0, 0
    rank = ["rank", "--images", str(work / "pool" / "images"), "--out", str(session), "--budget", "2"]
    finished: set[str] = set()
    for _ in range(kills):  # during ranking
        child = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "asfda"), *rank], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(float(rng.uniform(2.0, 6.0)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        injected += 1
        entries = list((session / "cache").glob("*.npz")) if (session / "cache").is_dir() else []
        ok = all(np.load(e) is not None for e in entries)
        scores_lost += len(finished - {e.name for e in entries})  # a score finished before must still be there
        finished |= {e.name for e in entries}
        survived += ok
    assert run(rank).returncode == 0
    query = json.loads((session / "ranking.json").read_text())["selected"]
    gt = work / "gt"
    gt.mkdir()
    for name in query:
        shutil.copy(work / "pool" / "labels" / name, gt / name)
    assert run(["labels", "import", str(session), "--from", str(gt)]).returncode == 0
    labels = {p: _digest(p) for p in (session / "labels").iterdir()}
    finetune = [
        "finetune",
        str(session),
        "--iterations",
        "300",
        "--pseudo-iterations",
        "100",
        "--checkpoint-every",
        "20",
    ]
    first = True
    progress: list[tuple[int, int]] = []  # (stage, iteration) of the newest checkpoint after each kill
    for _ in range(kills):  # during fine-tuning (and its session writes)
        args = finetune if first else [*finetune, "--resume"]
        child = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "asfda"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(float(rng.uniform(5.0, 12.0)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        first = False
        injected += 1
        try:
            Session.open(session)
            intact = all(p.is_file() and _digest(p) == h for p, h in labels.items())
            lost += sum(not (p.is_file() and _digest(p) == h) for p, h in labels.items())
            survived += intact
        except Exception:  # noqa: BLE001 - a broken session counts as not survived
            pass
        progress.append(_checkpoint_progress(session))
    finished = run([*finetune, "--resume"])
    completed = finished.returncode == 0 and Session.open(session).adapted_checkpoint() is not None
    return {
        "kills_injected": injected,
        "kills_survived": survived,
        "labels_lost": lost,
        "finished_scores_lost": scores_lost,
        "checkpoint_progress_after_each_kill": progress,
        "training_went_backwards": any(b < a for a, b in zip(progress, progress[1:])),
        "resumed_to_completion": bool(completed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = {"bad_inputs": bad_input_trial(Path(tmp) / "bad")}
        report["kills"] = kill_trial(Path(tmp) / "kill", args.kills)
    emit(report, args.json)


if __name__ == "__main__":
    main()
