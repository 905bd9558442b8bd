"""Network input from a volume, as the model card says: its axis order (RAS unless it says), model spacing, intensity
normalisation, composed from MONAI transforms.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    Identity,
    NormalizeIntensity,
    Orientation,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Spacing,
)

from ASFDALib.data.volumes import Volume
from ASFDALib.models.card import IntensityConfig, ModelCard


def intensity_transform(config: IntensityConfig):
    """The card's intensity normalisation, as the MONAI transform an exported bundle names for it."""
    if config.mode == "ct":
        return ScaleIntensityRange(config.a_min, config.a_max, config.b_min, config.b_max, clip=config.clip)
    if config.mode == "percentile":
        return ScaleIntensityRangePercentiles(config.lower, config.upper, config.b_min, config.b_max, clip=config.clip)
    if config.mode == "zscore":
        return NormalizeIntensity(nonzero=config.nonzero)
    return Identity()


def spatial_transform(card: ModelCard, mode: str = "bilinear"):

    # float32 resampling: MONAI's default float64 would briefly need 3x the native volume's memory.
    return Compose(
        [Orientation(axcodes=card.axcodes, labels=None), Spacing(pixdim=card.spacing, mode=mode, dtype=torch.float32)]
    )


def preprocess(volume: Volume, card: ModelCard):
    """A (1, X, Y, Z) float32 MetaTensor at the model's spacing, axis order and intensity scale."""

    array = np.asarray(volume.array, dtype=np.float32)
    image = MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(volume.affine, dtype=torch.float64))
    image = spatial_transform(card)(image)
    image = intensity_transform(card.intensity)(image)
    return image.float()


HALF_LIMIT = 60000.0  # float16 overflows at 65504


def compact(image: torch.Tensor) -> torch.Tensor:
    """The preprocessed volume held as float16 for the sweep, half the memory of float32.

    float16 keeps 11 significant bits (a rounding error of at most 0.05% of the value), far below scanner
    noise and the effect of resampling; each window is widened back to float32 before the network sees
    it. A volume whose values would overflow stays float32.
    """
    plain = torch.as_tensor(image).as_subclass(torch.Tensor)
    if plain.numel():
        low, high = torch.aminmax(plain)  # one pass, no temporary the size of the volume
        if max(-float(low), float(high)) >= HALF_LIMIT:
            return plain.float()
    return plain.half()


def preprocess_label(label: np.ndarray, affine: np.ndarray, card: ModelCard) -> np.ndarray:
    """A label map on the same model-spacing grid as :func:`preprocess` gives its image (nearest neighbour)."""

    tensor = MetaTensor(
        torch.from_numpy(np.asarray(label, dtype=np.float32))[None],
        affine=torch.as_tensor(affine, dtype=torch.float64),
    )
    out = spatial_transform(card, mode="nearest")(tensor)
    return np.asarray(out[0].numpy().round(), dtype=np.uint8)


def labels_to_native(
    label: np.ndarray, model_affine: np.ndarray, native_shape: tuple[int, ...], native_affine: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour resampling of a model-space label map onto the input's own grid, slice by slice
    (memory stays at one native slice of coordinates)."""
    mapping = np.linalg.inv(np.asarray(model_affine, dtype=np.float64)) @ np.asarray(native_affine, dtype=np.float64)
    out = np.zeros(native_shape, np.uint8)
    ii, jj = np.meshgrid(np.arange(native_shape[0]), np.arange(native_shape[1]), indexing="ij")
    plane = np.stack([ii, jj, np.zeros_like(ii), np.ones_like(ii)]).reshape(4, -1).astype(np.float64)
    upper = np.array(label.shape) - 1
    for k in range(native_shape[2]):
        plane[2] = k
        coords = np.rint(mapping[:3] @ plane).astype(np.int64)
        inside = np.all((coords >= 0) & (coords <= upper[:, None]), axis=0)
        values = np.zeros(coords.shape[1], np.uint8)
        values[inside] = label[coords[0, inside], coords[1, inside], coords[2, inside]]
        out[:, :, k] = values.reshape(native_shape[0], native_shape[1])
    return out
