"""Scoring cost, measured side by side in one run (ratios, not absolute seconds).

    python benchmarks/bench_scoring.py [--volumes 4] [--repeats 3] [--json results.json]

1. Time on the same preprocessed volumes and model, interleaved and repeated (median):
   plain MONAI sliding-window inference + argmax, the ASFDA sweep (DKD features + ASD + energy), and
   5-pass MC-dropout epistemic scoring (as MONAI Label does it). Ratios: ASFDA / plain (goal <= 1.15)
   and epistemic / ASFDA (goal >= 4).
2. Peak memory of scoring one 512x512x300 CT-sized volume, in a fresh process: the high-water mark of
   the sweep (reset just before it through /proc/self/clear_refs) against the float32 size of the volume
   resampled to the model's spacing plus the model (goal: <= 2x volume + model; "the model" is its
   weights plus the working memory of one forward pass of a window batch, measured alone in another
   fresh process, and the weights-only figure is reported too), and the peak of the whole
   read + preprocess + score pipeline for reference.
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


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


LARGE_UNET = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 4,
    "channels": [32, 64, 128, 256],
    "strides": [2, 2, 2],
    "num_res_units": 2,
    "norm": "batch",
}


def time_scoring(volumes: int, repeats: int, large: bool = False) -> dict:
    from monai.inferers import sliding_window_inference

    from ASFDALib.bench.phantoms import domain_config, make_phantom
    from ASFDALib.data.preprocess import compact, preprocess
    from ASFDALib.data.volumes import Volume
    from ASFDALib.inference.epistemic import epistemic_score
    from ASFDALib.inference.sweep import SweepConfig, sweep
    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.loading import load_model

    model = load_model(default_model_path())
    card, net = model.card, model.network.eval()
    if large:  # a foundation-model-sized encoder (timing only: random weights)
        from ASFDALib.models.card import NetworkSpec
        from ASFDALib.models.loading import build_network

        net = build_network(NetworkSpec("UNet", LARGE_UNET)).eval()
    images = []
    for seed in range(volumes):
        image, _, affine = make_phantom(seed, domain_config("mri"))
        images.append(preprocess(Volume(image, affine, Path(f"v{seed}")), card))

    def plain(x):
        with torch.inference_mode():
            return sliding_window_inference(
                x[None].as_subclass(torch.Tensor), card.roi_size, card.sw_batch_size, net, card.overlap
            )

    def plain_label(x):
        return plain(x).argmax(1)

    # As ``asfda rank`` does it: the volume held as float16, made with the preprocessing (outside the
    # timing, as preprocessing is for plain inference too).
    compacted = {id(x): compact(x) for x in images}

    def asfda(x):
        return sweep(net, compacted[id(x)], card, SweepConfig(keep_energy=True))

    def epistemic(x):
        return epistemic_score(net, x, card, passes=5)

    methods = {
        "plain_inference": plain,
        "plain_inference_argmax": plain_label,
        "asfda_scoring": asfda,
        "epistemic_5_pass": epistemic,
    }
    for fn in methods.values():  # warm-up
        fn(images[0])
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            for x in images:
                fn(x)
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "network": "UNet " + str(LARGE_UNET["channels"]) if large else "default UNet [8, 16, 32, 64]",
        "parameters": sum(p.numel() for p in net.parameters()),
        "volumes": volumes,
        "repeats": repeats,
        "volume_shape_at_model_spacing": list(images[0].shape[1:]),
        "seconds_per_volume": {k: v / volumes for k, v in median.items()},
        "asfda_over_plain": median["asfda_scoring"] / median["plain_inference"],
        "epistemic_over_asfda": median["epistemic_5_pass"] / median["asfda_scoring"],
    }


def memory_child(path: str, mode: str) -> None:
    """Runs in a fresh process: read and preprocess, then score (``sweep``) or infer (``plain``), with the
    high-water mark reset in between so the figure is that step's own peak. The network runs once on
    one window first: thread pools and kernel caches are set up once per process, not per volume."""
    from monai.inferers import sliding_window_inference

    from ASFDALib.data.preprocess import compact, preprocess
    from ASFDALib.data.volumes import read_volume
    from ASFDALib.inference.sweep import SweepConfig, sweep
    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.loading import load_model

    model = load_model(default_model_path())
    card = model.card
    with torch.inference_mode():
        model.network.eval()(torch.zeros(card.sw_batch_size, 1, *card.roi_size))
    if mode.startswith("forward"):  # "forward:B": the model's own working memory for B windows, no volume
        batch = torch.zeros(int(mode.partition(":")[2]), 1, *card.roi_size)
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kib("VmRSS")
        with torch.inference_mode():
            model.network(batch)
        print(json.dumps({"forward_peak_mb": (_rss_kib("VmHWM") - before) / 1024}))
        return
    base = _rss_kib("VmRSS")
    volume = read_volume(path)
    native_shape = list(volume.array.shape)
    image = preprocess(volume, card)
    del volume
    resampled_shape, float32_mb = list(image.shape[1:]), image.numel() * 4 / 2**20
    if mode.startswith("sweep"):
        image = compact(image)  # as ``asfda rank`` holds it
    preprocess_peak = _rss_kib("VmHWM") - base
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    before = _rss_kib("VmRSS")
    if mode.startswith("sweep"):  # "sweep" or "sweep:B", B windows per forward pass
        sweep(model.network, image, card, SweepConfig(sw_batch_size=int(mode.partition(":")[2] or 0) or None))
    else:
        with torch.inference_mode():
            logits = sliding_window_inference(
                image[None].as_subclass(torch.Tensor), card.roi_size, card.sw_batch_size, model.network, card.overlap
            )
            logits.argmax(1)
    peak = _rss_kib("VmHWM") - before
    model_bytes = sum(p.numel() * p.element_size() for p in model.network.state_dict().values())
    print(
        json.dumps(
            {
                "native_shape": native_shape,
                "resampled_shape": resampled_shape,
                "resampled_float32_mb": float32_mb,
                "input_held_mb": image.numel() * image.element_size() / 2**20,
                "model_mb": model_bytes / 2**20,
                "peak_above_input_mb": peak / 1024,
                "read_and_preprocess_peak_mb": preprocess_peak / 1024,
            }
        )
    )


def load_card_batch() -> int:
    """Windows per forward pass on the CPU, as the default model's card sets it."""
    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.loading import load_model

    return load_model(default_model_path()).card.sw_batch_size


def measure_memory() -> dict:
    """Both pipelines on one CT-sized volume; each figure is the peak of live memory: glibc's default
    dynamic mmap threshold keeps freed buffers in the heap, so RSS would also count memory that is
    free, and the threshold is fixed here (MALLOC_MMAP_THRESHOLD_) for both pipelines alike."""
    import os

    from ASFDALib.bench.phantoms import make_phantom
    from ASFDALib.data.volumes import write_nifti

    image, _, _ = make_phantom(0)
    big = torch.nn.functional.interpolate(torch.from_numpy(image)[None, None], size=(512, 512, 300), mode="trilinear")[
        0, 0
    ].numpy()
    affine = np.diag([0.8, 0.8, 1.0, 1.0])  # a typical abdominal CT grid: 41 x 41 x 30 cm
    runs = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_nifti(Path(tmp) / "ct_512x512x300.nii", np.round(big).astype(np.int16), affine)
        del big
        batch = load_card_batch()
        for mode in ("sweep", "sweep:2", "plain", f"forward:{batch}", "forward:2"):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(path), mode],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    result = {k: v for k, v in runs["sweep"].items() if k != "peak_above_input_mb"}
    volume_mb = result["resampled_float32_mb"]
    result["asfda_sweep_peak_incl_input_mb"] = runs["sweep"]["peak_above_input_mb"] + result["input_held_mb"]
    result["plain_inference_peak_incl_input_mb"] = runs["plain"]["peak_above_input_mb"] + volume_mb
    voxels = int(np.prod(result["resampled_shape"]))
    result["asfda_sweep_2_windows_peak_incl_input_mb"] = (
        runs["sweep:2"]["peak_above_input_mb"] + result["input_held_mb"]
    )
    result["asfda_maps_mb"] = 3 * voxels / 2**20  # entropy, foreground probability, class: uint8 each
    # "Plus the model": its weights and what one forward pass of a window batch needs, measured alone.
    # No 3D network runs in its weights alone, so this is the part of the peak a volume cannot change.
    result["model_forward_mb"] = runs[f"forward:{batch}"]["forward_peak_mb"]
    result["model_forward_2_windows_mb"] = runs["forward:2"]["forward_peak_mb"]
    result["goal_mb"] = 2 * volume_mb + result["model_mb"] + result["model_forward_mb"]
    result["goal_2_windows_mb"] = 2 * volume_mb + result["model_mb"] + result["model_forward_2_windows_mb"]
    result["goal_weights_only_mb"] = 2 * volume_mb + result["model_mb"]
    result["asfda_sweep_over_goal"] = result["asfda_sweep_peak_incl_input_mb"] / result["goal_mb"]
    result["asfda_sweep_2_windows_over_goal"] = (
        result["asfda_sweep_2_windows_peak_incl_input_mb"] / result["goal_2_windows_mb"]
    )
    result["asfda_sweep_over_weights_only_goal"] = (
        result["asfda_sweep_peak_incl_input_mb"] / result["goal_weights_only_mb"]
    )
    # What grows with the volume (the float16 copy and the uint8 maps) against the float32 volume.
    result["volume_dependent_mb"] = result["input_held_mb"] + result["asfda_maps_mb"]
    result["volume_dependent_over_float32_volume"] = result["volume_dependent_mb"] / volume_mb
    result["asfda_sweep_over_plain_inference"] = (
        result["asfda_sweep_peak_incl_input_mb"] / result["plain_inference_peak_incl_input_mb"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    report = {
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "timing_default_model": time_scoring(args.volumes, args.repeats),
        "timing_large_model": time_scoring(args.volumes, args.repeats, large=True),
        "memory": measure_memory(),
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
