"""Network input from a volume, as the model card says: RAS orientation, model spacing, intensity
normalisation, composed from MONAI transforms.
"""

from __future__ import annotations

import numpy as np
import torch

from .modelcard import IntensityConfig, ModelCard
from .volume_io import Volume


def intensity_transform(config: IntensityConfig):
    from monai.transforms import Identity, NormalizeIntensity, ScaleIntensityRange, ScaleIntensityRangePercentiles

    if config.mode == "ct":
        return ScaleIntensityRange(config.a_min, config.a_max, config.b_min, config.b_max, clip=True)
    if config.mode == "percentile":
        return ScaleIntensityRangePercentiles(config.lower, config.upper, config.b_min, config.b_max, clip=True)
    if config.mode == "zscore":
        return NormalizeIntensity(nonzero=True)
    return Identity()


def spatial_transform(card: ModelCard, mode: str = "bilinear"):
    from monai.transforms import Compose, Orientation, Spacing

    # float32 resampling: MONAI's default float64 would briefly need 3x the native volume's memory.
    return Compose(
        [Orientation(axcodes="RAS", labels=None), Spacing(pixdim=card.spacing, mode=mode, dtype=torch.float32)]
    )


def preprocess(volume: Volume, card: ModelCard):
    """A (1, X, Y, Z) float32 MetaTensor at the model's spacing and intensity scale, RAS-oriented."""
    from monai.data import MetaTensor

    array = np.asarray(volume.array, dtype=np.float32)
    image = MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(volume.affine, dtype=torch.float64))
    image = spatial_transform(card)(image)
    image = intensity_transform(card.intensity)(image)
    return image.float()
