"""Train the embedded default model (Resources/Model) on CT-like source phantoms.

    python scripts/train_default_model.py [--iterations 600] [--volumes 24]

Writes asfda_default.pt (state dict), asfda_default.card.json and asfda_default_source_stats.npz.
Deterministic on CPU for a given seed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ASFDALib.bench.phantoms import CLASS_NAMES, make_phantom, write_phantoms
from ASFDALib.data.preprocess import preprocess
from ASFDALib.data.volumes import Volume
from ASFDALib.models.card import IntensityConfig, ModelCard, NetworkSpec, save_card
from ASFDALib.models.loading import build_network, load_model
from ASFDALib.query.source_stats import compute_source_stats

OUT = Path(__file__).resolve().parents[1] / "Resources" / "Model"

CARD = ModelCard(
    name="asfda-default-unet",
    description="Small MONAI UNet trained by scripts/train_default_model.py on CT-like abdominal phantoms.",
    class_names=CLASS_NAMES,
    spacing=(2.0, 2.0, 2.0),
    roi_size=(48, 48, 48),
    intensity=IntensityConfig(mode="percentile", lower=0.5, upper=99.5),
    network=NetworkSpec(
        "UNet",
        {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": len(CLASS_NAMES),
            "channels": [8, 16, 32, 64],
            "strides": [2, 2, 2],
            "num_res_units": 1,
            "norm": "batch",
        },
    ),
    source_stats="asfda_default_source_stats.npz",
    sw_batch_size=4,
)


def random_patch(image: np.ndarray, label: np.ndarray, roi: int, rng: np.random.Generator):
    """A roi^3 patch, centred on foreground two times in three (foreground oversampling)."""
    shape = np.array(image.shape)
    if rng.random() < 0.67:
        fg = np.argwhere(label > 0)
        centre = fg[rng.integers(len(fg))]
    else:
        centre = rng.integers(0, shape)
    start = np.clip(centre - roi // 2, 0, shape - roi)
    sl = tuple(slice(s, s + roi) for s in start)
    return image[sl], label[sl]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--volumes", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    from monai.losses import DiceCELoss

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = []
    for i in range(args.volumes):
        image, label, affine = make_phantom(args.seed * 1000 + i)
        x = preprocess(Volume(image, affine, Path(f"source_{i}")), CARD).numpy()[0]
        data.append((x, label))  # phantoms are generated on the model grid (2 mm, RAS)
    network = build_network(CARD.network)
    optimiser = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, args.iterations)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    roi = CARD.roi_size[0]
    network.train()
    start = time.time()
    for it in range(1, args.iterations + 1):
        batch = [random_patch(*data[rng.integers(len(data))], roi, rng) for _ in range(4)]
        x = torch.from_numpy(np.stack([b[0] for b in batch])[:, None].copy())
        y = torch.from_numpy(np.stack([b[1] for b in batch])[:, None].astype(np.int64))
        if rng.random() < 0.5:  # intensity augmentation: gamma and scale, so the model is not brittle
            x = x.clamp_min(0) ** float(rng.uniform(0.8, 1.25))
        loss = loss_fn(network(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if it % 50 == 0:
            print(f"iteration {it}/{args.iterations} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    network.eval()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), OUT / "asfda_default.pt")
    save_card(CARD, OUT / "asfda_default.card.json")
    model = load_model(OUT / "asfda_default.pt")
    with tempfile.TemporaryDirectory() as tmp:
        write_phantoms(Path(tmp), 8, "ct", seed=args.seed + 1, labels=False)
        compute_source_stats(model, Path(tmp) / "images", OUT / CARD.source_stats)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
