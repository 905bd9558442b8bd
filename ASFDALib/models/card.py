"""The model card: what a Med-VFM's weights do not say (classes, spacing, ROI, intensity normalisation).

A card is a small JSON or YAML file. Example::

    {"name": "abdomen-unet", "class_names": ["background", "liver", "kidney", "gallbladder"],
     "spacing": [2.0, 2.0, 2.0], "roi_size": [48, 48, 48],
     "intensity": {"mode": "ct", "a_min": -200, "a_max": 300},
     "network": {"name": "UNet", "args": {"spatial_dims": 3, ...}},
     "source_stats": "source_stats.npz"}

``class_names`` are the target task's. ``source_classes`` (optional) names the classes of the pre-trained
checkpoint's output head, in its order, when they differ: the head is then re-initialised for the target, and
classes with the same name (or paired by ``--class-map liver=liver,...``) keep their pre-trained rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml

from ASFDALib.atomic import atomic_write_json
from ASFDALib.errors import ModelError

INTENSITY_MODES = ("ct", "percentile", "zscore", "none")
MAX_CLASSES = 256  # background + 255: what an 8-bit label map holds
# Intensity settings true unless a card says false: the modes each is a choice of, in words and by name
CHOICES = {"nonzero": ("a z-score's", ("zscore",)), "clip": ("a window's", ("ct", "percentile"))}


@dataclass
class IntensityConfig:
    """How raw intensities become network input.

    ``ct``: clip to the window [a_min, a_max] and scale to [b_min, b_max];
    ``percentile``: map the [lower, upper] percentiles of each volume to [b_min, b_max] (MRI);
    both map linearly without clipping where ``clip`` is false (MONAI's ``ScaleIntensityRange[Percentiles]``
    default, as a bundle may leave it);
    ``zscore``: zero mean, unit variance over the non-zero voxels, or over every voxel where ``nonzero`` is false
    (MONAI's ``NormalizeIntensity(nonzero=...)``; nnU-Net's ``use_mask_for_norm``); ``none``: as stored.
    """

    mode: str = "percentile"
    a_min: float = -1000.0
    a_max: float = 1000.0
    lower: float = 0.5
    upper: float = 99.5
    b_min: float = 0.0
    b_max: float = 1.0
    nonzero: bool = True
    clip: bool = True

    def __post_init__(self) -> None:
        if self.mode not in INTENSITY_MODES:
            raise ModelError(f"intensity mode {self.mode!r} unknown; use one of {', '.join(INTENSITY_MODES)}")
        for name, (whose, modes) in CHOICES.items():
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ModelError(f"intensity {name} {value!r}: true or false")
            if not value and self.mode not in modes:
                raise ModelError(f"intensity {name} false is {whose} choice; mode {self.mode!r} has none")

    def to_dict(self) -> dict[str, Any]:
        """As a card stores it; ``nonzero`` and ``clip`` only where they are false, so cards (and model digests and
        cache keys) written before they existed stay as they were."""
        data = asdict(self)
        for name in CHOICES:
            if data[name]:
                del data[name]
        return data

    def describe(self) -> str:
        """The normalisation in words, as the user checks it against the model's training."""
        to = f"{self.b_min:g}..{self.b_max:g}" + ("" if self.clip else ", not clipped")
        if self.mode == "ct" and not self.clip and self.a_max != self.a_min and self.b_max != self.b_min:
            # unclipped, "ct" is a linear map of any scan's values, however it was written (a bundle's
            # NormalizeIntensityd by a fixed subtrahend and divisor, an MR model's ScaleIntensityRanged): no window,
            # and no HU unless the scans are CT, so it is said as the map it is
            return _linear_map(self.a_min, (self.a_max - self.a_min) / (self.b_max - self.b_min), self.b_min)
        if self.mode == "ct":  # clipped: a window, in the HU that "ct" cards are written in
            return f"CT window {self.a_min:g}..{self.a_max:g} HU to {to}"
        if self.mode == "percentile":
            return f"percentiles {self.lower:g}..{self.upper:g} of each volume to {to}"
        if self.mode == "zscore":
            return f"z-score over {'non-zero voxels' if self.nonzero else 'every voxel'}"
        return "as stored"


def _linear_map(a_min: float, scale: float, b_min: float) -> str:
    """``b_min + (x - a_min) / scale`` written as ``(x - shift) / scale``: ``(x - 40) / 400``, ``(x + 57) / 221``,
    ``x / 1000``."""
    shift = a_min - b_min * scale
    if abs(shift) <= 1e-9 * abs(scale):  # a window centred on 0 to -1..1, say: rounding leaves a trace
        return f"x / {scale:g}"
    return f"(x {'-' if shift > 0 else '+'} {abs(shift):g}) / {scale:g}"


@dataclass
class NetworkSpec:
    """A network by class name and its constructor arguments: a MONAI network (``monai.networks.nets.<name>``),
    or one ASFDA builds itself (``ASFDALib.models.loading.ASFDA_NETWORKS``: nnU-Net's ResidualEncoderUNet)."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelCard:
    class_names: list[str]
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    roi_size: tuple[int, int, int] = (96, 96, 96)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    name: str = "model"
    network: NetworkSpec | None = None
    source_stats: str | None = None
    feature_layers: list[str] | None = None
    overlap: float = 0.25
    sw_batch_size: int = 2
    description: str = ""
    source_classes: list[str] | None = None
    # the voxel order the network was trained on (MONAI's Orientation axcodes: the direction each axis runs to)
    axcodes: str = "RAS"

    def __post_init__(self) -> None:
        self.axcodes = _check_axcodes(self.axcodes)
        if len(self.class_names) < 2:
            raise ModelError("model card: class_names needs the background and at least one class")
        if len(self.class_names) > MAX_CLASSES:
            raise ModelError(
                f"model card: {len(self.class_names)} classes; ASFDA supports up to {MAX_CLASSES - 1} foreground "
                "classes plus background (label maps are 8-bit, as Slicer's segmentations and most label files): "
                "keep the target task's classes in class_names"
            )
        self.spacing = tuple(float(s) for s in _triple(self.spacing, "spacing"))
        self.roi_size = tuple(int(s) for s in _triple(self.roi_size, "roi_size"))
        if isinstance(self.intensity, dict):
            self.intensity = IntensityConfig(**self.intensity)
        if isinstance(self.network, dict):
            self.network = NetworkSpec(**self.network)
        if self.source_classes is not None:
            if isinstance(self.source_classes, str) or not all(isinstance(n, str) for n in self.source_classes):
                raise ModelError("model card: source_classes must be a list of class names (the checkpoint's head)")
            self.source_classes = list(self.source_classes)
        _check_background_first(self.class_names, self.source_classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["intensity"] = self.intensity.to_dict()
        data["spacing"] = list(self.spacing)
        data["roi_size"] = list(self.roi_size)
        if self.source_classes is None:  # absent rather than null: cards (and model digests) stay as they were
            del data["source_classes"]
        if self.axcodes == "RAS":  # the same for axcodes, where it is the order every card had before it
            del data["axcodes"]
        return data

    def describe_input(self) -> str:
        """What the network is given, in one line: spacing, window and intensity (defaults included, which a
        card that leaves a key out takes silently otherwise)."""
        spacing = " x ".join(f"{s:g}" for s in self.spacing)
        roi = " x ".join(str(r) for r in self.roi_size)
        order = "" if self.axcodes == "RAS" else f" (axes to {self.axcodes})"
        return f"{spacing} mm voxels{order}, {roi} windows, {self.intensity.describe()}"

    def preprocessing_key(self) -> str:
        """The part of the card that changes the network input; part of every cache key."""
        return json.dumps(
            {"spacing": self.spacing, "roi": self.roi_size, "intensity": self.intensity.to_dict(), "ov": self.overlap}
            | ({} if self.axcodes == "RAS" else {"axcodes": self.axcodes}),
            sort_keys=True,
        )


def _check_axcodes(codes: Any) -> str:
    """Three letters, one of L/R, P/A, I/S each (MONAI's axcodes: where each voxel axis runs to)."""
    text = str(codes).upper() if isinstance(codes, str) else ""
    pairs = ["".join(sorted(p)) for p in ("LR", "AP", "IS")]
    if len(text) != 3 or sorted("".join(sorted(p)) for c in text for p in pairs if c in p) != sorted(pairs):
        raise ModelError(f"model card: axcodes {codes!r}: three letters, one of L/R, A/P, S/I each (e.g. RAS, LPS)")
    return text


BACKGROUND_NAMES = ("background", "bg", "_background_", "clear label")


def _check_background_first(class_names: list[str], source_classes: list[str] | None) -> None:
    """Channel 0 is the background in every label map and loss here; a card that starts with an organ would
    train that organ as background. Refused where it shows: a background name later in the list, or a first
    name that is one of the checkpoint head's foreground classes."""
    named = [i for i, n in enumerate(class_names) if str(n).strip().lower() in BACKGROUND_NAMES]
    foreground = {str(n).strip().lower() for n in (source_classes or [])[1:]}
    first = str(class_names[0]).strip().lower()
    if (named and named[0] > 0) or (first not in BACKGROUND_NAMES and first in foreground):
        raise ModelError(
            f"model card: class_names starts with {class_names[0]!r}; the first class is the background, "
            f"e.g. {['background', *[n for n in class_names if str(n).strip().lower() not in BACKGROUND_NAMES]]}"
        )


def _triple(value: Any, name: str) -> list[Any]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3 or any(float(v) <= 0 for v in values):
        raise ModelError(f"model card: {name} must be three positive numbers, got {value!r}")
    return values


def card_from_dict(data: dict[str, Any], source: str = "model card") -> ModelCard:
    known = set(ModelCard.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        guesses = [f"{k} (did you mean {close[0]}?)" for k in unknown if (close := get_close_matches(k, known, 1))]
        raise ModelError(
            f"{source}: unknown keys {unknown}; "
            + (f"{', '.join(guesses)}; " if guesses else "")
            + f"known keys are {sorted(known)}"
        )
    if "class_names" not in data:
        raise ModelError(f"{source}: 'class_names' is required (background first)")
    try:
        return ModelCard(**data)
    except TypeError as exc:
        raise ModelError(f"{source}: {exc}") from None
    except ModelError as exc:  # a field's own check: name the file it came from
        raise ModelError(f"{source}: {str(exc).removeprefix('model card: ')}") from None


def load_card(path: Path | str) -> ModelCard:
    return card_from_dict(read_card_data(path), str(path))


def read_card_data(path: Path | str) -> dict[str, Any]:
    """A card file's keys as written, before defaults fill in what it leaves out (a model that records its own
    spacing or intensity takes them where the card is silent)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except FileNotFoundError:
        raise ModelError(f"{path}: model card not found") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad card
        raise ModelError(f"{path}: model card is not valid JSON/YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: model card must be a mapping of keys to values")
    return data


def save_card(card: ModelCard, path: Path) -> Path:

    return atomic_write_json(path, card.to_dict())
