"""Ranking throughput with 1 and 2 processes (torchrun, gloo) on the same pool, in one run.

    python benchmarks/bench_distributed.py [--volumes 24] [--json results.json]

Each configuration ranks a fresh copy of the session (no cache), so every volume is swept. On a GPU
machine the same script also times GPU ranking against the CPU (volumes per minute).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_once(images: Path, out: Path, nproc: int, device: str) -> float:
    if out.exists():
        shutil.rmtree(out)
    rank = ["-m", "ASFDALib.app.cli", "rank", "--images", str(images), "--out", str(out), "--device", device]
    if nproc == 1:
        command = [sys.executable, *rank]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_port()),
            *rank,
        ]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env={**os.environ})
    return time.perf_counter() - start


def main() -> None:
    import torch

    from ASFDALib.bench.phantoms import write_pool

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_pool(Path(tmp) / "pool", args.volumes, seed=5)
        images = Path(tmp) / "pool" / "images"
        configs = [("cpu", 1), ("cpu", 2)] + ([("cuda", 1)] if torch.cuda.is_available() else [])
        seconds = {f"{d}x{n}": rank_once(images, Path(tmp) / f"s_{d}{n}", n, d) for d, n in configs}
    report = {
        "volumes": args.volumes,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only",
        "cores": os.cpu_count(),
        "seconds": seconds,
        "volumes_per_minute": {k: 60 * args.volumes / v for k, v in seconds.items()},
        "two_over_one_process_speed": seconds["cpux1"] / seconds["cpux2"],
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
