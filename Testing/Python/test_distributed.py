"""torchrun on the CPU (gloo): 2 processes rank exactly like 1, DDP fine-tuning trains like one process,
and a checkpoint resumes on another number of ranks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

TRAIN = """
import json, sys
from pathlib import Path
from ASFDALib import distributed
from ASFDALib.models.defaults import default_model_path
from ASFDALib.adaptation.patches import Case
from ASFDALib.adaptation.recipe import FinetuneConfig
from ASFDALib.adaptation.trainer import Trainer
from ASFDALib.models.loading import load_model
from ASFDALib.bench.phantoms import domain_config, make_phantom
from ASFDALib.data.preprocess import preprocess
from ASFDALib.data.volumes import Volume

distributed.init_from_env("cpu")
model = load_model(default_model_path())
cases = []
for i in range(2):
    image, label, affine = make_phantom(i, domain_config("mri"))
    cases.append(Case(str(i), preprocess(Volume(image, affine, Path("x")), model.card).numpy(), label))
losses = []
trainer = Trainer(model.network, model.card, FinetuneConfig(batch_size=2, seed=1, device="cpu",
                  checkpoint_every=1000), Path(sys.argv[1]))
trainer.run(cases, int(sys.argv[2]), progress=lambda p: losses.append(p.loss))
if distributed.is_main():
    Path(sys.argv[3]).write_text(json.dumps(losses))
distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nproc: int = 2, **kw) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env, **kw)


def test_two_processes_give_the_same_ranking_as_one(tmp_path, mri_pool):
    from ASFDALib.app.cli import main

    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(tmp_path / "one")]) == 0
    done = _torchrun(
        ["-m", "ASFDALib.app.cli", "rank", "--images", str(mri_pool / "images"), "--out", str(tmp_path / "two")]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "ranking.json").read_text())["rows"]
    two = json.loads((tmp_path / "two" / "ranking.json").read_text())["rows"]
    assert [r["file"] for r in one] == [r["file"] for r in two]
    np.testing.assert_allclose([r["pick_score"] for r in one], [r["pick_score"] for r in two], atol=1e-9)
    assert "2\nprocesses" in done.stdout or "2 processes" in done.stdout  # rich wraps at 80 columns


def test_ddp_fine_tuning_loss_matches_one_process(tmp_path):
    """Same recipe, same seeds: the loss curve of 2 ranks (each its own patches) follows one process.
    Stated tolerance: the mean loss of the last 5 of 30 iterations within 0.15."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "c1"), "30", str(tmp_path / "one.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    done = _torchrun([str(script), str(tmp_path / "c2"), "30", str(tmp_path / "two.json")])
    assert done.returncode == 0, done.stderr[-2000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert len(one) == len(two) == 30
    assert two[-1] < two[0]  # it learns
    assert abs(np.mean(one[-5:]) - np.mean(two[-5:])) < 0.15


def test_a_two_rank_checkpoint_resumes_in_one_process(tmp_path, mri_pool):
    from ASFDALib.app.cli import main

    session = tmp_path / "s"
    assert main(["rank", "--images", str(mri_pool / "images"), "--out", str(session), "--budget", "1"]) == 0
    query = json.loads((session / "ranking.json").read_text())["selected"][0]
    (tmp_path / "gt").mkdir()
    shutil.copy(mri_pool / "labels" / query, tmp_path / "gt" / query)
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt")]) == 0
    done = _torchrun(
        [
            "-m",
            "ASFDALib.app.cli",
            "finetune",
            str(session),
            "--iterations",
            "4",
            "--no-pseudo",
            "--checkpoint-every",
            "2",
        ]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert main(["finetune", str(session), "--iterations", "8", "--no-pseudo", "--extend"]) == 0
    import torch

    state = torch.load(session / "checkpoints" / "round1" / "last.pt", weights_only=True)
    assert state["iteration"] == 8 and state["stage"] == "stage1"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharding_covers_every_volume_once(world, monkeypatch):
    from ASFDALib import distributed

    items = list(range(10))
    shards = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        monkeypatch.setattr(distributed, "world", lambda: world)
        shards.append(distributed.shard(items))
    assert sorted(i for s in shards for i in s) == items


def test_the_command_line_leaves_the_process_group_it_joined(tmp_path, monkeypatch):
    """Every rank waits for the others and destroys the group before exiting, so none tears down the
    connections of a rank still using them (gloo then aborted that rank now and then)."""
    import torch.distributed as dist

    from ASFDALib import distributed  # noqa: F401  (the CLI shuts down what this module joined)
    from ASFDALib.app.cli import main

    assert main(["phantoms", "--count", "2", "--out", str(tmp_path / "pool")]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the group itself has the one rank here
    (tmp_path / "empty").mkdir()
    ranking = ["rank", "--images", str(tmp_path / "pool" / "images"), "--budget", "1"]
    failing = ["rank", "--images", str(tmp_path / "empty")]  # no volumes: refused in one line
    for command, code in ((ranking, 0), (failing, 1)):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{code}'}", rank=0, world_size=1)
        assert main([*command, "--out", str(tmp_path / f"out{code}")]) == code  # a failed rank leaves too
        assert not dist.is_initialized()


def test_the_command_line_leaves_a_callers_own_process_group_alone(tmp_path):
    import torch.distributed as dist

    from ASFDALib import distributed  # noqa: F401
    from ASFDALib.app.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["phantoms", "--count", "1", "--out", str(tmp_path / "p")]) == 0
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "command", [["predict", "s", "--images", "i", "--out", "o"], ["labels", "s"], ["export", "s", "--out", "m.ts"]]
)
def test_a_command_that_does_not_scale_out_refuses_torchrun_before_any_process_writes(
    command, monkeypatch, tmp_path, capsys
):
    """Under torchrun every process would do the whole job and write the same files: refused, once (rank 0)."""
    from ASFDALib.app.cli import main

    monkeypatch.chdir(tmp_path)
    for folder in ("s", "i"):  # the arguments are checked first, as ever
        (tmp_path / folder).mkdir()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("0", f"asfda {command[0]}: error: runs in one process; run it without torchrun"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        assert main(command) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert said in err and (said or not err)
        assert "only rank and finetune scale out" in err or rank == "1"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["i", "s"]
