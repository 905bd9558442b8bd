"""A foundation-sized network on the CPU: scoring and fine-tuning cost against plain MONAI, side by side.

    python benchmarks/bench_foundation.py [--repeats 2] [--iterations 4] [--json results.json]

The network is MONAI's SwinUNETR with feature size 48 (about 62 M parameters, the size of the published
SwinUNETR / SuPreM checkpoints; random weights: only time and memory are measured), a 96^3 window, an
MRI-like phantom at 1.25 mm (4 windows). Every measurement runs in its own fresh process, and the kinds are interleaved
and repeated (median), so the ratios hold on a noisy machine:

1. Scoring one volume: the ASFDA sweep (DKD features + ASD + energy, one pass) against plain MONAI
   sliding-window inference + argmax with the same window, overlap and batch. Goal: <= 1.15x.
2. Fine-tuning: iterations per second of ASFDA's trainer against a plain MONAI loop (DiceCELoss, AdamW,
   the same patch and batch 1). Goal: >= 0.9x. The rate is the steady state, between the end of the first
   iteration and the end of the last but one (each iteration's end is timestamped): on the CPU one
   SwinUNETR-48 step takes about a minute, so a one-off cost would otherwise swamp a 4-iteration run. The
   one-off costs are reported beside it: the trainer's setup (its training-memory probe, one forward pass)
   and its final checkpoint.
3. Peak memory (the high-water mark of each process's work, above what it held before it started) of
   all four.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import emit

SWIN = {"in_channels": 1, "out_channels": 4, "feature_size": 48, "spatial_dims": 3}
KINDS = ("score_asfda", "score_plain", "train_asfda", "train_plain")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _setup():
    from monai.networks.nets import SwinUNETR

    from ASFDALib.bench.phantoms import domain_config, make_phantom
    from ASFDALib.data.preprocess import preprocess, preprocess_label
    from ASFDALib.data.volumes import Volume
    from ASFDALib.models.card import ModelCard

    torch.manual_seed(0)
    card = ModelCard(
        class_names=["background", "liver", "kidney", "gallbladder"],
        spacing=(1.25, 1.25, 1.25),  # a phantom of about 115 x 115 x 90 voxels: 4 windows of 96^3
        roi_size=(96, 96, 96),
        sw_batch_size=1,
        name="swinunetr-48",
    )
    image, label, affine = make_phantom(0, domain_config("mri"))
    x = preprocess(Volume(image, affine, Path("v0")), card)
    return SwinUNETR(**SWIN), card, x, preprocess_label(label, affine, card)


def child(kind: str, iterations: int) -> None:
    """One measurement in this (fresh) process; prints seconds and peak memory as JSON."""
    from ASFDALib.inference.sweep import SweepConfig, sweep

    network, card, x, label = _setup()
    with torch.no_grad():  # thread pools and kernel caches are set up once per process, not timed
        network.eval()(torch.zeros(1, 1, *card.roi_size))
    result: dict = {"shape": list(x.shape[1:]), "parameters": sum(p.numel() for p in network.parameters())}
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    if kind == "score_asfda":
        sweep(network, x, card, SweepConfig(device="cpu", keep_energy=True))
    elif kind == "score_plain":
        from monai.inferers import sliding_window_inference

        with torch.inference_mode():
            sliding_window_inference(
                x[None].as_subclass(torch.Tensor), card.roi_size, card.sw_batch_size, network.eval(), card.overlap
            ).argmax(1)
    else:
        from ASFDALib.adaptation.patches import Case

        case = Case("v0", x.numpy(), label.astype(np.uint8))
        start = time.perf_counter()
        ends: list[float] = []  # when each iteration finished
        if kind == "train_asfda":
            from ASFDALib.adaptation.recipe import FinetuneConfig
            from ASFDALib.adaptation.trainer import Trainer

            config = FinetuneConfig(batch_size=1, checkpoint_every=10**9, device="cpu")
            trainer = Trainer(network, card, config, Path(tempfile.mkdtemp()))
            result["setup_seconds"] = time.perf_counter() - start
            trainer.run([case], iterations, progress=lambda _p: ends.append(time.perf_counter()))
        else:
            from monai.losses import DiceCELoss
            from monai.transforms import RandCropByPosNegLabeld, RandFlipd, SpatialPadd

            pad = SpatialPadd(["image", "label"], card.roi_size)  # the volume is thinner than a window in z
            crop = RandCropByPosNegLabeld(["image", "label"], "label", card.roi_size, pos=2, neg=1, num_samples=1)
            flip = RandFlipd(["image", "label"], prob=0.5, spatial_axis=0)
            optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-5)
            loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
            network.train()
            data = pad({"image": torch.as_tensor(case.image), "label": torch.as_tensor(case.label[None]).float()})
            for _ in range(iterations):
                sample = flip(crop(data)[0])
                loss = loss_fn(network(sample["image"][None]), sample["label"][None])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                ends.append(time.perf_counter())
        # the last iteration's end includes the trainer's final checkpoint: steady state is 1 .. N-1
        result["steady_seconds_per_iteration"] = (ends[-2] - ends[0]) / (len(ends) - 2)
    result["seconds"] = time.perf_counter() - start
    result["peak_mb"] = (_rss_kib("VmHWM") - before) / 1024
    print(json.dumps(result))


def run(kind: str, iterations: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--iterations", str(iterations)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=4, help="fine-tuning iterations per measurement (at least 3)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iterations < 3:
        parser.error("--iterations must be at least 3 (the steady state is iterations 2 .. N-1)")
    if args.child:
        child(args.child, args.iterations)
        return
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    for _ in range(args.repeats):
        for kind in KINDS:
            runs[kind].append(run(kind, args.iterations))
            print(f"{kind}: {runs[kind][-1]}", file=sys.stderr, flush=True)
    seconds = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    peak = {k: max(r["peak_mb"] for r in v) for k, v in runs.items()}
    speed = {
        k: 1 / statistics.median(r["steady_seconds_per_iteration"] for r in runs[k])
        for k in ("train_asfda", "train_plain")
    }
    emit(
        {
            "network": "SwinUNETR " + json.dumps(SWIN),
            "parameters": runs["score_asfda"][0]["parameters"],
            "volume_shape_at_model_spacing": runs["score_asfda"][0]["shape"],
            "roi": [96, 96, 96],
            "repeats": args.repeats,
            "iterations": args.iterations,
            "scoring_seconds": {"asfda": seconds["score_asfda"], "plain_monai": seconds["score_plain"]},
            "scoring_asfda_over_plain": seconds["score_asfda"] / seconds["score_plain"],
            "iterations_per_second": {"asfda": speed["train_asfda"], "plain_monai": speed["train_plain"]},
            "trainer_setup_seconds": statistics.median(r["setup_seconds"] for r in runs["train_asfda"]),
            "whole_run_seconds": {"asfda": seconds["train_asfda"], "plain_monai": seconds["train_plain"]},
            "finetune_asfda_over_plain": speed["train_asfda"] / speed["train_plain"],
            "peak_memory_mb": peak,
            "runs": runs,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
