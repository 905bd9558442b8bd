"""Training patches: cases at model spacing, foreground-oversampled crops, 3D augmentation, and the
batch stream in which batch i of a stage comes from its own generator seeded by (seed, rank, stage, i).

So any data-loader worker process can make any batch, each rank of a DDP job draws its own patches, and
a resumed run draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ASFDALib import distributed
from ASFDALib.adaptation.loss import IGNORE_INDEX
from ASFDALib.adaptation.recipe import FinetuneConfig
from ASFDALib.data.preprocess import preprocess, preprocess_label
from ASFDALib.data.volumes import read_volume
from ASFDALib.models.card import ModelCard


@dataclass
class Case:
    """One training volume at model spacing: image (1, X, Y, Z) float32, label (X, Y, Z) uint8."""

    name: str
    image: np.ndarray
    label: np.ndarray

    def __post_init__(self) -> None:
        fg = np.flatnonzero((self.label > 0) & (self.label != IGNORE_INDEX))
        if fg.size > 20000:  # a sample of foreground positions is plenty to centre patches on
            fg = fg[np.linspace(0, fg.size - 1, 20000).astype(np.int64)]
        self.foreground = fg


def load_case(name: str, image_path: Path, label_path: Path, card: ModelCard) -> Case:
    """An image and its label file as a training/evaluation case at the model's spacing."""
    image = preprocess(read_volume(image_path), card)
    label = read_volume(label_path, allow_constant=True)
    return Case(name, image.numpy(), preprocess_label(label.array, label.affine, card))


def _crop(case: Case, roi: tuple[int, int, int], rng: np.random.Generator, foreground_ratio: float):
    """A patch centred on foreground with probability ``foreground_ratio``, else anywhere; padded as needed."""
    shape = np.array(case.label.shape)
    if case.foreground.size and rng.random() < foreground_ratio:
        centre = np.array(np.unravel_index(case.foreground[rng.integers(case.foreground.size)], shape))
    else:
        centre = np.array([rng.integers(0, s) for s in shape])
    roi_arr = np.array(roi)
    start = np.clip(centre - roi_arr // 2, 0, np.maximum(shape - roi_arr, 0))
    window = tuple(slice(s, s + r) for s, r in zip(start, roi_arr))
    image = case.image[(slice(None), *window)]
    label = case.label[window]
    pad = [(0, max(0, r - s)) for r, s in zip(roi_arr, label.shape)]
    if any(p[1] for p in pad):
        image = np.pad(image, [(0, 0), *pad], constant_values=float(case.image.min()))
        label = np.pad(label, pad, constant_values=IGNORE_INDEX)
    return image, label


def _augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """Random flips, intensity scale/shift, gamma and noise (numpy, from the run's one generator)."""
    for axis in range(3):
        if rng.random() < 0.5:
            image = np.flip(image, axis + 1)
            label = np.flip(label, axis)
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.3:
        image = _gamma(image, rng.uniform(0.7, 1.5))
    if rng.random() < 0.2:
        image = image + rng.normal(0.0, 0.03, image.shape)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)


def _gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    span = max(high - low, 1e-6)
    return ((image - low) / span) ** gamma * span + low


def strong_intensity(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """More intensity change on top of ``_augment``'s, per patch: a wider scale and shift, a gamma every time,
    more noise. The pseudo-label was made on the unchanged volume, so the student must see through these
    (the consistency idea of FixMatch); crops, flips and labels are untouched."""
    out = images.numpy().copy()
    for k in range(out.shape[0]):
        patch = out[k] * rng.uniform(0.8, 1.25) + rng.uniform(-0.2, 0.2)
        patch = _gamma(patch, rng.uniform(0.6, 1.7))
        if rng.random() < 0.5:
            patch = patch + rng.normal(0.0, 0.05, patch.shape)
        out[k] = patch
    return torch.from_numpy(out)


def remap_intensity(images: torch.Tensor, rng: np.random.Generator, points: int = 5) -> torch.Tensor:
    """Half the patches through a random, not necessarily monotonic, intensity curve: a piecewise-linear
    map through ``points`` random levels over the patch's range, blended with the patch by a random
    weight (the global intensity randomisation of single-source domain generalisation, e.g. GIN). Tissues
    may swap brightness, as they do between CT and MRI sequences; the labels are untouched."""
    out = images.numpy().copy()
    for k in range(out.shape[0]):
        if rng.random() < 0.5:
            continue
        low, high = float(out[k].min()), float(out[k].max())
        span = max(high - low, 1e-6)
        levels = rng.uniform(0.0, 1.0, points)
        curve = np.interp((out[k] - low) / span, np.linspace(0.0, 1.0, points), levels) * span + low
        blend = rng.uniform(0.5, 1.0)
        out[k] = blend * curve + (1.0 - blend) * out[k]
    return torch.from_numpy(out)


def copy_paste(
    labelled_images: torch.Tensor,
    labelled_labels: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pseudo-labelled patch (``images`` (B, C, X, Y, Z), ``labels`` (B, X, Y, Z)) mixed with the labelled
    patch of the same batch position: a cuboid of two thirds of each side, at a random place, from one pasted
    into the other, either way with probability 0.5, the labels following their voxels (bidirectional
    copy-paste, Bai et al. 2023). Returns the mixed patches in place of the pseudo-labelled ones; the labelled
    ones are not changed."""
    mixed_images, mixed_labels = images.clone(), labels.clone()
    shape = labels.shape[1:]
    size = [max(1, round(s * 2 / 3)) for s in shape]
    for k in range(images.shape[0]):
        start = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, size)]
        inside = torch.zeros(shape, dtype=torch.bool)
        inside[tuple(slice(a, a + c) for a, c in zip(start, size))] = True
        labelled, pseudo = (labelled_images[k], labelled_labels[k]), (images[k], labels[k])
        # the labelled anatomy in the pool's context, or the pool's in the labels'
        inner, outer = (labelled, pseudo) if rng.random() < 0.5 else (pseudo, labelled)
        mixed_images[k] = torch.where(inside, inner[0], outer[0])
        mixed_labels[k] = torch.where(inside, inner[1], outer[1])
    return mixed_images, mixed_labels


def sample_batch(cases: list[Case], roi, batch_size: int, rng: np.random.Generator, foreground_ratio: float):
    images, labels = [], []
    for _ in range(batch_size):
        image, label = _crop(cases[rng.integers(len(cases))], roi, rng, foreground_ratio)
        image, label = _augment(image, label, rng)
        images.append(image)
        labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels).astype(np.int64))


class PatchStream(torch.utils.data.Dataset):
    """Item i is batch i of a stage (labelled, and pseudo-labelled when given), from its own generator."""

    def __init__(self, labelled: list[Case], pseudo: list[Case] | None, roi, config: FinetuneConfig, stage: str):
        self.labelled, self.pseudo, self.roi, self.config = labelled, pseudo, tuple(roi), config
        self.key = [config.seed, distributed.rank(), zlib.crc32(stage.encode())]

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, i: int):
        rng = np.random.default_rng([*self.key, int(i)])
        batch = sample_batch(self.labelled, self.roi, self.config.batch_size, rng, self.config.foreground_ratio)
        if self.pseudo:
            images, labels = sample_batch(
                self.pseudo, self.roi, self.config.batch_size, rng, self.config.foreground_ratio
            )
            weak = images
            if self.config.pseudo_augment in ("strong", "remap"):  # own generators: the weak draws stay as they were
                images = strong_intensity(images, np.random.default_rng([*self.key, int(i), 1]))
            if self.config.pseudo_augment == "remap":
                images = remap_intensity(images, np.random.default_rng([*self.key, int(i), 2]))
            # only the fixed teacher's labels (recipe.stage2_mix): the EMA teacher labels the unmixed weak patch
            if self.config.pseudo_mix == "copy-paste" and self.config.teacher != "ema":
                images, labels = copy_paste(*batch, images, labels, np.random.default_rng([*self.key, int(i), 3]))
            batch += (images, labels)
            if self.config.teacher == "ema":  # the teacher labels the weakly augmented patch
                batch += (weak,)
        return batch
