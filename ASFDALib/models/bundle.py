"""A MONAI bundle's inference config read as MONAI's runner reads it, and the model card its transforms imply.

Values are read as MONAI's ``ConfigParser`` gives them: literals, ``@id`` references to literals (resolved here),
``_disabled_`` components left out; ``$`` expressions run code, so MONAI's own parser evaluates them, and only
with trust. The network is given what the dataset's transform (``preprocessing``) does to the ``image`` key, in
order, with each transform's MONAI defaults for what the config leaves out:

- spacing: ``Spacingd``'s ``pixdim`` (a short one padded with its last value, as MONAI does);
- intensity: ``ScaleIntensityRanged`` (``clip`` false unless said), ``ScaleIntensityRangePercentilesd``
  (``relative`` folded into the output range), ``ScaleIntensityd`` (each scan's min..max),
  ``NormalizeIntensityd`` (every voxel unless ``nonzero``; a fixed ``subtrahend``/``divisor`` as the linear map
  it is), or none; several in a row where one card setting gives the same;
- window: the inferer's ``roi_size``; classes: ``metadata.json``'s ``channel_def`` (or ``label_def``).

What a card would say but the config does not let ASFDA read (code without trust, a native grid, an intensity
chain no card setting reproduces) is refused in one line naming the config and ``--card``; what no card can say
(a scan's stored axis order, transforms ASFDA does not run) is named in the loaded model's ``card_notes``, which
``rank`` says among its notes.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ASFDALib.errors import ModelError, TrustRequiredError, brief
from ASFDALib.models.card import IntensityConfig, ModelCard, card_from_dict

IMAGE_KEY = "image"  # the key MONAI's evaluators give the network (CommonKeys.IMAGE)
_REQUIRED = object()  # an argument MONAI's transform has no default for
# MONAI transforms that leave the image's voxels and grid as they are (loading, channel and type handling)
UNCHANGING = frozenset(
    {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "CastToType", "ToTensor", "Identity"}
)
# intensity transforms that take their values from the scan (its percentiles, min..max, mean)
STATISTICAL = frozenset({"ScaleIntensityRangePercentiles", "ScaleIntensity", "NormalizeIntensity"})


def read_config(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def is_literal(value: Any) -> bool:
    if isinstance(value, str):
        return not value.startswith(("@", "$", "%", "#"))
    if isinstance(value, dict):
        return "_target_" not in value and all(is_literal(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(is_literal(v) for v in value)
    return True


def _lookup(config: dict[str, Any], reference: str) -> tuple[Any, str] | None:
    """The node an ``@id`` reference names (``#`` or ``::`` between levels) and its id, or None."""
    node: Any = config
    parts = reference[1:].replace("::", "#").split("#")
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node, "#".join(parts)


def resolve_references(value: Any, config: dict[str, Any], depth: int = 0) -> Any:
    """``value`` with MONAI's ``@id`` references (``@num_classes``, ``@net::channels`` or ``#`` between levels)
    replaced by the config's values they name, where those hold no code themselves; anything else unchanged
    (an expression stays one, and needs trust)."""
    if depth > 8:
        return value
    if isinstance(value, str) and value.startswith("@") and len(value) > 1:
        found = _lookup(config, value)
        return value if found is None else resolve_references(found[0], config, depth + 1)
    if isinstance(value, dict):
        return {k: resolve_references(v, config, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_references(v, config, depth + 1) for v in value]
    return value


@contextlib.contextmanager
def bundle_code_importable(folder: Path) -> Iterator[None]:
    """The bundle's own code (``scripts/`` beside ``configs/``) importable as MONAI's runner makes it, the bundle
    root on the path, for the time it takes to build its network; its modules are forgotten after, so another
    bundle's ``scripts`` in the same process (the Slicer panel, a benchmark) is its own and not this one's."""
    root = folder.resolve()
    for name in [n for n in list(sys.modules) if n == "scripts" or n.startswith("scripts.")]:
        sys.modules.pop(name, None)  # another bundle's scripts package would answer this one's imports
    sys.path.insert(1, str(root))
    try:
        yield
    finally:
        # the entry put there, not an equal one the path held before
        del sys.path[1 if sys.path[1:2] == [str(root)] else sys.path.index(str(root))]
        for name, module in list(sys.modules.items()):
            if (file := getattr(module, "__file__", None)) and Path(file).resolve().is_relative_to(root):
                del sys.modules[name]


def monai_parser(config_path: Path, folder: Path):
    """MONAI's own parser of the config, set up as its runner sets it up (``bundle_root`` the bundle folder)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_path))
    parser["bundle_root"] = str(folder)
    return parser


class ConfigValues:
    """A bundle config's values by MONAI id, as MONAI's parser gives them: literals and references to literals
    read here, expressions evaluated by MONAI's parser where trusted (they run the config's code)."""

    def __init__(self, config: dict[str, Any], path: Path, folder: Path, trust: bool) -> None:
        self.config, self.path, self.folder, self.trust = config, path, folder, trust
        self._parser = None

    @property
    def name(self) -> str:
        """The config as a note names it: the load report names the bundle."""
        return f"{self.path.parent.name}/{self.path.name}"

    def value(self, id: str, raw: Any) -> Any:
        resolved = resolve_references(raw, self.config)
        if is_literal(resolved):
            return resolved
        if not self.trust:
            raise TrustRequiredError(
                f"{self.path}: {id} is code ({brief(str(resolved), 80)}), which ASFDA evaluates only with --trust "
                "(MONAI runs it; only if you trust whoever made this bundle), or give --card with the model's settings"
            )
        if self._parser is None:
            self._parser = monai_parser(self.path, self.folder)
        with bundle_code_importable(self.folder):
            try:
                return self._parser.get_parsed_content(id)
            except Exception as exc:  # noqa: BLE001 - the bundle's own code: any error it raises, in one line
                raise ModelError(f"{self.path}: cannot evaluate {id} ({brief(exc, 200)})") from None

    def follow(self, node: Any, id: str) -> tuple[Any, str]:
        """A node and its id, through ``@id`` references to other nodes (a transform list named elsewhere)."""
        for _ in range(8):
            found = _lookup(self.config, node) if isinstance(node, str) and node.startswith("@") else None
            if found is None:
                break
            node, id = found
        return node, id


@dataclass
class Transform:
    """A transform the network's input goes through: its MONAI id, MONAI array-transform name (``Spacing`` for
    ``Spacingd``, the target as written where it is no MONAI transform) and arguments."""

    id: str
    name: str
    args: dict[str, Any]

    @property
    def target(self) -> str:
        return str(self.args["_target_"]).rsplit(".", 1)[-1]


def monai_name(target: str) -> str:
    """``Spacingd``, ``SpacingD``, ``SpacingDict`` and ``monai.transforms.Spacingd`` -> ``Spacing``; a target
    outside MONAI (a bundle's ``scripts.…``) as written."""
    if "." in target and not target.startswith("monai."):
        return target
    name = target.rsplit(".", 1)[-1]
    for suffix in ("Dict", "d", "D"):
        if name.endswith(suffix) and name[: -len(suffix)] in KNOWN | UNCHANGING:
            return name[: -len(suffix)]
    return name


def image_transforms(values: ConfigValues) -> list[Transform]:
    """The transforms MONAI's dataset applies to the image, in order (MONAI's ``preprocessing`` property: the
    dataset's transform, else ``preprocessing``)."""
    if isinstance(values.config.get("dataset"), dict) and "transform" in values.config["dataset"]:
        return list(_transforms(values, values.config["dataset"]["transform"], "dataset#transform"))
    return list(_transforms(values, values.config.get("preprocessing", []), "preprocessing"))


def _transforms(values: ConfigValues, node: Any, id: str) -> Iterator[Transform]:
    node, id = values.follow(node, id)
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _transforms(values, item, f"{id}#{index}")
        return
    if not (isinstance(node, dict) and isinstance(node.get("_target_"), str)):
        raise ModelError(
            f"{values.path}: {id} is not a list of transforms ASFDA can read ({brief(str(node), 80)}); give --card "
            "with the model's spacing and intensity"
        )
    if _disabled(values, node, id):
        return
    name = monai_name(node["_target_"])
    if name == "Compose":
        yield from _transforms(values, node.get("transforms", []), f"{id}#transforms")
    elif _on_image(values, node, id):
        yield Transform(id, name, node)


def _disabled(values: ConfigValues, node: dict[str, Any], id: str) -> bool:
    """MONAI's rule (ConfigComponent.is_disabled): the string "true" in any case, else the value's truth."""
    flag = values.value(f"{id}#_disabled_", node["_disabled_"]) if "_disabled_" in node else False
    return flag.lower().strip() == "true" if isinstance(flag, str) else bool(flag)


def _on_image(values: ConfigValues, node: dict[str, Any], id: str) -> bool:
    """Whether a transform changes the image: a dictionary transform's keys name it; an array transform (no
    keys) is given the image itself."""
    if "keys" not in node:
        return True
    keys = values.value(f"{id}#keys", node["keys"])
    return IMAGE_KEY in ([keys] if isinstance(keys, str) else list(keys or []))


def argument(values: ConfigValues, transform: Transform, name: str, default: Any = _REQUIRED) -> Any:
    """A transform's argument as MONAI gives it, its default where the config leaves it out."""
    if name in transform.args:
        return values.value(f"{transform.id}#{name}", transform.args[name])
    if default is _REQUIRED:
        raise ModelError(f"{values.path}: {transform.id} ({transform.target}) has no {name}, which MONAI requires")
    return default


def _numbers(values: ConfigValues, transform: Transform, name: str, default: Any = _REQUIRED) -> list[float]:
    """A numeric argument (a number or a list of them) as floats."""
    value = argument(values, transform, name, default)
    try:
        numbers = np.atleast_1d(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        numbers = np.array([np.nan])
    if numbers.ndim != 1 or not np.isfinite(numbers).all():  # None reads as nan
        raise ModelError(f"{values.path}: {transform.id} ({transform.target}) {name} is {value!r}, not a number")
    return [float(v) for v in numbers]


def _number(values: ConfigValues, transform: Transform, name: str, default: Any = _REQUIRED) -> float:
    numbers = _numbers(values, transform, name, default)
    if len(numbers) != 1:
        raise ModelError(f"{values.path}: {transform.id} ({transform.target}) {name} is {numbers}, not one number")
    return numbers[0]


# --- intensity ---------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One intensity transform as a card setting, and how it composes with the ones before it: ``affine``: an
    increasing linear map of each scan (its statistics taken as fixed), so a ``rescales`` step after it gives the
    same as on its own (a z-score over every voxel, percentiles, min..max); ``masked``: such a map but for the
    voxels exactly 0, which it leaves at 0 (MONAI's z-score over the non-zero voxels)."""

    config: IntensityConfig
    affine: bool
    rescales: bool
    masked: bool = False


def _cannot(values: ConfigValues, transform: Transform, why: str) -> ModelError:
    return ModelError(
        f"{values.path}: {transform.target} ({transform.id}) {why}, which no card intensity reproduces; give --card "
        "with the intensity normalisation the model was trained with"
    )


def _output_range(values: ConfigValues, transform: Transform, default: Any) -> tuple[float, float]:
    """b_min..b_max; neither given: MONAI leaves (x - low) / (high - low), which is 0..1."""
    given = [argument(values, transform, name, default) is not None for name in ("b_min", "b_max")]
    if not any(given):
        return 0.0, 1.0
    if not all(given):
        raise _cannot(values, transform, "gives one of b_min and b_max (MONAI then scales to neither)")
    return _number(values, transform, "b_min"), _number(values, transform, "b_max")


def _scale_range(values: ConfigValues, transform: Transform) -> Step:
    """ScaleIntensityRange(a_min, a_max, b_min=None, b_max=None, clip=False) (MONAI's intensity/array.py)."""
    low, high = _number(values, transform, "a_min"), _number(values, transform, "a_max")
    b_min, b_max = _output_range(values, transform, None)
    clip = bool(argument(values, transform, "clip", False))  # MONAI: `if self.clip`, whatever its type
    config = IntensityConfig("ct", a_min=low, a_max=high, b_min=b_min, b_max=b_max, clip=clip)
    return Step(config, affine=not clip and high > low and b_max > b_min, rescales=False)


def _scale_percentiles(values: ConfigValues, transform: Transform) -> Step:
    """ScaleIntensityRangePercentiles(lower, upper, b_min, b_max, clip=False, relative=False, channel_wise=False);
    one channel, so channel_wise changes nothing."""
    lower, upper = _number(values, transform, "lower"), _number(values, transform, "upper")
    b_min, b_max = _output_range(values, transform, _REQUIRED)
    if bool(argument(values, transform, "relative", False)):  # MONAI narrows b_min..b_max to the percentiles' share
        b_min, b_max = b_min + (b_max - b_min) * lower / 100.0, b_min + (b_max - b_min) * upper / 100.0
    clip = bool(argument(values, transform, "clip", False))
    config = IntensityConfig("percentile", lower=lower, upper=upper, b_min=b_min, b_max=b_max, clip=clip)
    whole = (lower, upper) == (0.0, 100.0)  # min..max: clipping changes nothing
    return Step(config, affine=(not clip or whole) and b_max > b_min, rescales=b_max > b_min)


def _scale_min_max(values: ConfigValues, transform: Transform) -> Step:
    """ScaleIntensity(minv=0.0, maxv=1.0, factor=None): each scan's min..max to minv..maxv, the 0th..100th
    percentiles."""
    if argument(values, transform, "minv", 0.0) is None or argument(values, transform, "maxv", 1.0) is None:
        raise _cannot(values, transform, "scales by factor, or to 0..1 where one of minv and maxv is None")
    minv, maxv = _number(values, transform, "minv", 0.0), _number(values, transform, "maxv", 1.0)
    config = IntensityConfig("percentile", lower=0.0, upper=100.0, b_min=minv, b_max=maxv)
    return Step(config, affine=maxv > minv, rescales=maxv > minv)


def _normalize(values: ConfigValues, transform: Transform) -> Step:
    """NormalizeIntensity(subtrahend=None, divisor=None, nonzero=False, channel_wise=False): (x - subtrahend) /
    divisor, the scan's mean and standard deviation where not given, over its non-zero voxels where nonzero."""
    nonzero = bool(argument(values, transform, "nonzero", False))  # MONAI: `if self.nonzero`, so "True" is true
    subtrahend, divisor = (argument(values, transform, name, None) for name in ("subtrahend", "divisor"))
    if subtrahend is None and divisor is None:
        config = IntensityConfig("zscore", nonzero=nonzero)
        return Step(config, affine=not nonzero, rescales=not nonzero, masked=nonzero)
    if subtrahend is None or divisor is None or nonzero:
        raise _cannot(values, transform, "subtracts or divides by a given value in part")
    # one number each (a list of one: the one channel's, channel_wise); MONAI divides by 1 where it is 0
    shift, scale = _number(values, transform, "subtrahend"), _number(values, transform, "divisor") or 1.0
    config = IntensityConfig("ct", a_min=shift, a_max=shift + scale, clip=False)
    return Step(config, affine=scale > 0, rescales=False)


INTENSITY = {
    "ScaleIntensityRange": _scale_range,
    "ScaleIntensityRangePercentiles": _scale_percentiles,
    "ScaleIntensity": _scale_min_max,
    "NormalizeIntensity": _normalize,
}
KNOWN = frozenset({*INTENSITY, "Spacing", "Orientation", "CropForeground"})


def _then_fixed_map(before: Step, after: Step) -> Step | None:
    """``before`` followed by ``after`` as one step, where ``after`` is a fixed increasing linear map (a
    ScaleIntensityRange, a NormalizeIntensity by a given subtrahend and divisor) and ``before`` ends in an output
    range (a window, percentiles, min..max): the map moves that range, clipped or not (spleen_ct_segmentation's
    window to 0..1, clipped, then 0..1 to -1..1). ``after``'s own clip must change nothing: ``before`` clips into
    its window. None where the two are no one setting."""
    first, then = before.config, after.config
    if first.mode not in ("ct", "percentile") or then.mode != "ct":
        return None
    if not (then.a_max > then.a_min and then.b_max > then.b_min and first.b_max > first.b_min):
        return None
    if then.clip and not (first.clip and then.a_min <= first.b_min and first.b_max <= then.a_max):
        return None
    scale = (then.b_max - then.b_min) / (then.a_max - then.a_min)
    moved = [then.b_min + (v - then.a_min) * scale for v in (first.b_min, first.b_max)]
    return replace(before, config=replace(first, b_min=moved[0], b_max=moved[1]))


def intensity(values: ConfigValues, transforms: list[Transform]) -> tuple[IntensityConfig, list[str]]:
    """The one card setting that gives what the image's intensity transforms give in turn, and a note where it
    does so but for the voxels exactly 0; none at all: as stored."""
    steps: list[tuple[Transform, Step]] = []
    for transform in transforms:
        if transform.name not in INTENSITY:
            continue
        step = INTENSITY[transform.name](values, transform)
        if steps and (joined := _then_fixed_map(steps[-1][1], step)) is not None:
            steps[-1] = (steps[-1][0], joined)  # a fixed map after a range: the range moved
        else:
            steps.append((transform, step))
    if not steps:
        return IntensityConfig("none"), []
    *before, (last, step) = steps
    if not before:
        return step.config, []
    if step.rescales and all(s.affine or s.masked for _, s in before):
        masked = [t.target for t, s in before if s.masked]
        note = (
            f"{values.name}: {', '.join(masked)} leaves voxels exactly 0 at 0 before {last.target}, which the card's "
            f"{step.config.describe()} cannot: the two differ where a scan has voxels exactly 0"
        )
        return step.config, [note] if masked else []
    raise _cannot(values, last, f"after {', '.join(t.target for t, _ in before)}")


# --- the card ------------------------------------------------------------------------------------------


def spacing(values: ConfigValues, transforms: list[Transform]) -> tuple[list[float], list[str]]:
    """The last Spacing's pixdim, as MONAI's Spacing reads it (one number or a short list padded with its last
    value), and a note where it keeps some scans as they are (min_pixdim, max_pixdim)."""
    spacings = [t for t in transforms if t.name == "Spacing"]
    if not spacings:
        raise ModelError(
            f"{values.path}: no Spacingd on the image: MONAI runs the model on each scan's own grid, which a card "
            "cannot say; give --card with the spacing of the scans it was trained on"
        )
    last = spacings[-1]
    dims = _numbers(values, last, "pixdim")[:3]
    if not dims or any(d <= 0 for d in dims):  # MONAI keeps the scan's own spacing on a non-positive axis
        raise ModelError(
            f"{values.path}: {last.target} pixdim {dims} keeps each scan's own spacing on some axis, which a card "
            "cannot say; give --card with the spacing of the scans the model was trained on"
        )
    dims += dims[-1:] * (3 - len(dims))
    kept = [n for n in ("min_pixdim", "max_pixdim") if argument(values, last, n, None) is not None]
    note = (
        f"{values.name}: {last.target} leaves a scan whose spacing is within its {' and '.join(kept)} as it is; "
        f"ASFDA resamples every scan to {' x '.join(f'{d:g}' for d in dims)} mm"
    )
    return dims, [note] if kept else []


def orientation(values: ConfigValues, transforms: list[Transform]) -> tuple[str, list[str]]:
    """The axis order the network is given (the card's ``axcodes``: the last ``Orientationd``'s), and a note where
    the bundle gives none (MONAI then passes each scan in its stored order, ASFDA in the card's)."""
    orientations = [t for t in transforms if t.name == "Orientation"]
    if not orientations:
        return "RAS", [
            f"{values.name}: no Orientationd on the image: MONAI gives the network each scan in its stored axis "
            "order, ASFDA in RAS order (the same for scans stored RAS)"
        ]
    last = orientations[-1]
    if bool(argument(values, last, "as_closest_canonical", False)):
        return "RAS", []
    return str(argument(values, last, "axcodes", "RAS")).upper(), []


def other_notes(values: ConfigValues, transforms: list[Transform]) -> list[str]:
    """Transforms on the image ASFDA does not run: a foreground crop, and any other that changes the image."""
    notes = []
    for index, transform in enumerate(transforms):
        if transform.name != "CropForeground":
            continue
        later = [t for t in transforms[index + 1 :] if t.name in STATISTICAL]
        notes.append(
            f"{values.name}: {transform.target}: MONAI runs the network on each scan's foreground box only, ASFDA on "
            f"the whole scan" + (f" (and {later[0].target} takes its statistics over the box)" if later else "")
        )
    unknown = [t.target for t in transforms if t.name not in KNOWN | UNCHANGING]
    if unknown:
        notes.append(
            f"{values.name}: ASFDA does not run {', '.join(dict.fromkeys(unknown))} on the image; where they change "
            "it, the network is given other input than MONAI gives it"
        )
    return notes


def roi_size(values: ConfigValues) -> tuple[Any, str]:
    """The inferer's roi_size (None where it has none: a whole-scan inferer) and the inferer's name."""
    inferer, id = values.follow(values.config.get("inferer"), "inferer")
    named = str(inferer.get("_target_", "none")) if isinstance(inferer, dict) else "none"
    if isinstance(inferer, dict) and "roi_size" in inferer:
        return values.value(f"{id}#roi_size", inferer["roi_size"]), named
    return None, named


def bundle_class_names(folder: Path) -> list[str]:
    """The classes a bundle's metadata.json names for its output (``channel_def``, in channel order, or
    ``label_def`` as some model-zoo bundles write it); [] if none."""
    meta_path = folder / "configs" / "metadata.json"
    try:
        return _class_names(json.loads(meta_path.read_text()) if meta_path.is_file() else {})
    except (OSError, ValueError):
        return []


def _class_names(meta: Any) -> list[str]:
    """The output classes metadata.json's ``channel_def`` (or ``label_def``) names, in channel order; [] if none."""
    try:
        pred = meta.get("network_data_format", {}).get("outputs", {}).get("pred", {})
        channels = pred.get("channel_def") or pred.get("label_def") or {}
        return [str(channels[k]) for k in sorted(channels, key=int)]
    except (ValueError, AttributeError, TypeError):
        return []


def card_from_bundle(
    folder: Path, config: dict[str, Any], config_path: Path, trust: bool
) -> tuple[ModelCard, list[str]]:
    """The card MONAI's run of the bundle implies (metadata.json's classes and name, the image's transforms, the
    inferer's window), and the notes of what it does that no card can say."""
    meta_path = folder / "configs" / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{meta_path}: cannot be read ({brief(exc)}); correct it, or give --card") from None
    class_names = _class_names(meta)  # the file as read just above, not read again
    if not class_names:
        raise ModelError(f"{folder}: bundle has no class names (metadata channel_def); add asfda_card.json")
    values = ConfigValues(config, config_path, folder, trust)
    transforms = image_transforms(values)
    spacing_mm, spacing_notes = spacing(values, transforms)
    setting, intensity_notes = intensity(values, transforms)
    axcodes, orientation_notes = orientation(values, transforms)
    window, inferer = roi_size(values)
    data: dict[str, Any] = {
        "class_names": class_names,
        "name": meta.get("name", folder.name),
        "spacing": spacing_mm,
        "intensity": setting,
        "axcodes": axcodes,
    }
    if window is not None:
        data["roi_size"] = list(window) if isinstance(window, (list, tuple)) else window
    card = card_from_dict(data, str(config_path.parent))
    notes = orientation_notes + spacing_notes + intensity_notes + other_notes(values, transforms)
    if window is None:
        windows = " x ".join(str(r) for r in card.roi_size)
        notes.append(f"{values.name}: its inferer ({inferer}) has no roi_size; ASFDA runs {windows} windows")
    return card, notes
