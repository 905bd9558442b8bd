"""Fine-tuning on a CPU that something else is using too: PyTorch's threads, side by side in one run.

    python benchmarks/bench_threads.py [--iterations 20] [--repeats 3] [--json results.json]

Each setting runs in its own process (OpenMP reads its settings when torch loads): PyTorch's default (one
thread per core), ``OMP_NUM_THREADS=1`` and ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep rather than spin
while they wait), first on an idle machine, then beside a competing process that keeps two threads busy
(another fine-tune, a test suite, Slicer rendering). Interleaved and repeated; the medians and their
ratios to the default on the idle machine are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit

SETTINGS = {
    "default": {},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}
BUSY = "import torch\ntorch.set_num_threads(2)\na = torch.randn(600, 600)\nwhile True:\n    a = (a @ a).tanh()\n"


def child(iterations: int) -> None:
    """Time ``iterations`` fine-tuning steps (after a warm-up run) and print the seconds."""
    from bench_finetune import _cases

    from ASFDALib.adaptation.recipe import FinetuneConfig
    from ASFDALib.adaptation.trainer import Trainer
    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.loading import load_model

    path = default_model_path()
    card = load_model(path).card
    cases = _cases(card, 4)
    config = FinetuneConfig(batch_size=2, checkpoint_every=10**9, device="cpu")

    def run(n: int) -> float:
        trainer = Trainer(load_model(path).network, card, config, Path(tempfile.mkdtemp()))
        start = time.perf_counter()
        trainer.run(cases, n)
        return time.perf_counter() - start

    run(3)
    print(run(iterations))


def measure(iterations: int, settings: dict[str, str], busy: bool) -> float:
    competitor = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        if competitor:
            time.sleep(3)  # let it reach full speed
        env = {**os.environ, **settings}
        command = [sys.executable, __file__, "--child", "--iterations", str(iterations)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return float(done.stdout.strip().splitlines()[-1])
    finally:
        if competitor:
            competitor.kill()
            competitor.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.iterations)
        return
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for load in ("idle", "beside a 2-thread process"):
            for name, settings in SETTINGS.items():
                times.setdefault(f"{name}, {load}", []).append(measure(args.iterations, settings, load != "idle"))
    seconds = {k: statistics.median(v) for k, v in times.items()}
    base = seconds["default, idle"]
    emit(
        {
            "iterations": args.iterations,
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "seconds": seconds,
            "slowdown_vs_default_idle": {k: v / base for k, v in seconds.items()},
            "raw": times,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
