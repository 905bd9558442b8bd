"""Synthetic abdominal phantoms with labels, in a CT-like source domain and an MRI-like target domain.

A body (fat shell, muscle, spine) holds three organs of very different size: a large liver, two
medium kidneys and a small gallbladder, with jittered size and position and partial-volume edges.
The CT domain uses Hounsfield-like values; the MRI domain a T2-like contrast (fluid bright, fat bright,
liver dark), a smooth multiplicative bias field and Rician noise. The domain shift is real for a model
trained on CT: relative contrasts change, not only the scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAMES = ["background", "liver", "kidney", "gallbladder"]
TISSUES = ("air", "fat", "muscle", "bone", "liver", "kidney", "gallbladder")
CONTRASTS = {
    "ct": dict(air=-1000, fat=-100, muscle=45, bone=450, liver=75, kidney=160, gallbladder=5),
    "mri": dict(air=0, fat=420, muscle=110, bone=70, liver=150, kidney=330, gallbladder=700),
}


@dataclass
class PhantomConfig:
    """Grid and appearance of one phantom domain."""

    domain: str = "ct"
    shape: tuple[int, int, int] = (72, 72, 56)
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    noise: float = 12.0
    bias: float = 0.0
    blur: float = 0.8


def domain_config(domain: str) -> PhantomConfig:
    if domain == "ct":
        return PhantomConfig("ct", noise=12.0)
    if domain == "mri":
        return PhantomConfig("mri", noise=25.0, bias=0.35)
    raise ValueError(f"unknown phantom domain {domain!r}; use 'ct' or 'mri'")


def _ellipsoid(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(axis=0) <= 1.0


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    import torch
    from monai.transforms import GaussianSmooth

    if sigma <= 0:
        return image
    return GaussianSmooth(sigma)(torch.from_numpy(image)[None]).numpy()[0]


def make_phantom(seed: int, config: PhantomConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32, label uint8, RAS affine) of one phantom; the same seed gives the same anatomy."""
    config = config or domain_config("ct")
    rng = np.random.default_rng(seed)
    spacing = np.asarray(config.spacing, dtype=np.float64)
    extent = np.asarray(config.shape) * spacing
    axes = [(np.arange(n) + 0.5) * s - e / 2 for n, s, e in zip(config.shape, spacing, extent, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)  # RAS mm, body centred at 0

    def jitter(scale: float, size: int = 3) -> np.ndarray:
        return rng.normal(0.0, scale, size)

    body_r = extent * np.array([0.44, 0.36, 0.6]) * (1 + jitter(0.04))
    body = _ellipsoid(grid, np.zeros(3), body_r)
    inner = _ellipsoid(grid, np.zeros(3), body_r - np.array([8.0, 8.0, 0.0]))
    spine = (((grid[0] / 9.0) ** 2 + ((grid[1] + body_r[1] * 0.62) / 9.0) ** 2) <= 1) & body
    liver_c = np.array([-0.38 * body_r[0], 0.05 * body_r[1], 0.12 * extent[2]]) + jitter(3.0)
    liver = _ellipsoid(grid, liver_c, np.array([0.42, 0.55, 0.3]) * body_r * (1 + jitter(0.08))) & inner
    kidneys = np.zeros_like(body)
    for side in (-1, 1):
        centre = np.array([side * 0.45 * body_r[0], -0.4 * body_r[1], -0.12 * extent[2]]) + jitter(2.5)
        kidneys |= _ellipsoid(grid, centre, np.array([11.0, 14.0, 20.0]) * (1 + jitter(0.1)))
    kidneys &= inner & ~liver
    gb_c = liver_c + np.array([0.25 * body_r[0], 0.35 * body_r[1], -0.2 * extent[2] * 0.3]) + jitter(2.0)
    gallbladder = _ellipsoid(grid, gb_c, np.array([6.0, 7.0, 9.0]) * (1 + jitter(0.12))) & inner

    label = np.zeros(config.shape, np.uint8)
    label[liver] = 1
    label[kidneys] = 2
    label[gallbladder] = 3
    values = CONTRASTS[config.domain]
    tissue = np.full(config.shape, values["air"], np.float32)
    tissue[body] = values["fat"]
    tissue[inner] = values["muscle"]
    tissue[spine] = values["bone"]
    for index, organ in enumerate(("liver", "kidney", "gallbladder"), start=1):
        tissue[label == index] = values[organ] * (1 + rng.normal(0, 0.04))
    texture = _smooth(rng.normal(0, 1, config.shape).astype(np.float32), 1.5) * config.noise
    image = _smooth(tissue + texture * (label > 0), config.blur)
    if config.bias:
        coefficients = jitter(config.bias, 3)
        image *= np.exp((coefficients[:, None, None, None] * grid / extent[:, None, None, None]).sum(axis=0))
    noise = rng.normal(0, config.noise, (2, *config.shape)).astype(np.float32)
    if config.domain == "mri":
        image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise
    else:
        image = image + noise[0]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -extent / 2 + spacing / 2
    return image.astype(np.float32), label, affine


def write_phantoms(
    folder: Path, count: int, domain: str = "ct", seed: int = 0, labels: bool = True, prefix: str | None = None
) -> list[Path]:
    """Write ``count`` phantoms as NIfTI into ``folder/images`` (and ``folder/labels``); returns image paths."""
    from .volume_io import write_nifti

    folder = Path(folder)
    config = domain_config(domain)
    dtype = np.int16 if domain == "ct" else np.uint16
    paths = []
    for i in range(count):
        image, label, affine = make_phantom(seed * 100_003 + i, config)
        name = f"{prefix or domain}_{i:03d}.nii.gz"
        paths.append(write_nifti(folder / "images" / name, np.round(image).astype(dtype), affine))
        if labels:
            write_nifti(folder / "labels" / name, label, affine)
    return paths
