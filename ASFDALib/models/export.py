"""Export an adapted model as a MONAI bundle (loadable by MONAI's bundle API, hence MONAI Label) or as
TorchScript, always with its model card."""

from __future__ import annotations

from pathlib import Path

import torch

from ASFDALib.atomic import atomic_write, atomic_write_json
from ASFDALib.errors import ModelError
from ASFDALib.models.card import ModelCard
from ASFDALib.models.loading import LoadedModel


def _preprocessing(card: ModelCard) -> list[dict]:
    intensity = card.intensity
    if intensity.mode == "ct":
        scale = {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": intensity.a_min,
            "a_max": intensity.a_max,
            "b_min": intensity.b_min,
            "b_max": intensity.b_max,
            "clip": True,
        }
    elif intensity.mode == "percentile":
        scale = {
            "_target_": "ScaleIntensityRangePercentilesd",
            "keys": "image",
            "lower": intensity.lower,
            "upper": intensity.upper,
            "b_min": intensity.b_min,
            "b_max": intensity.b_max,
            "clip": True,
        }
    elif intensity.mode == "zscore":
        scale = {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True}
    else:
        scale = {"_target_": "Identityd", "keys": "image"}
    return [
        {"_target_": "LoadImaged", "keys": "image", "image_only": False},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": list(card.spacing), "mode": "bilinear"},
        scale,
        {"_target_": "EnsureTyped", "keys": "image"},
    ]


def export_bundle(model: LoadedModel, folder: Path, version: str = "0.1.0") -> Path:
    """A MONAI bundle folder: configs/{inference,metadata}.json, models/model.pt, asfda_card.json."""
    if model.spec is None or model.scripted:
        raise ModelError(f"{model.path}: a bundle needs a MONAI network by name; export this model as torchscript")
    card = model.card
    folder = Path(folder)
    network_def = {"_target_": f"monai.networks.nets.{model.spec.name}", **model.spec.args}
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(card)},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(card.roi_size),
            "sw_batch_size": card.sw_batch_size,
            "overlap": card.overlap,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            ],
        },
    }
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
        "meta_schema_20220324.json",
        "version": version,
        "name": card.name,
        "description": card.description
        or "Adapted with ASFDA (active learning + selective semi-supervised fine-tuning)",
        "monai_version": _monai_version(),
        "pytorch_version": torch.__version__.split("+")[0],
        "network_data_format": {
            "inputs": {
                "image": {"type": "image", "num_channels": 1, "spatial_shape": list(card.roi_size), "dtype": "float32"}
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "num_channels": card.num_classes,
                    "dtype": "float32",
                    "channel_def": {str(i): n for i, n in enumerate(card.class_names)},
                }
            },
        },
    }
    atomic_write_json(folder / "configs" / "inference.json", inference)
    atomic_write_json(folder / "configs" / "metadata.json", metadata)
    state = {k: v.detach().cpu() for k, v in model.network.state_dict().items()}
    atomic_write(folder / "models" / "model.pt", lambda tmp: torch.save(state, tmp))
    card_data = _exported_card(card)
    card_data["network"] = {"name": model.spec.name, "args": model.spec.args}
    atomic_write_json(folder / "asfda_card.json", card_data)
    return folder


def export_torchscript(model: LoadedModel, path: Path) -> Path:
    """``model.ts`` (scripted, or traced when scripting fails) plus ``model.card.json`` beside it."""
    network = model.network.cpu().eval()
    try:
        scripted = torch.jit.script(network)
    except Exception:  # noqa: BLE001 - some MONAI networks only trace
        scripted = torch.jit.trace(network, torch.zeros(1, 1, *model.card.roi_size))
    path = Path(path)
    atomic_write(path, lambda tmp: scripted.save(str(tmp)))
    atomic_write_json(path.with_name(path.name.split(".")[0] + ".card.json"), _exported_card(model.card))
    return path


def _exported_card(card: ModelCard) -> dict:
    """The card of the exported model: its head is the target's now, so the pre-trained head's
    ``source_classes`` no longer describe it (kept, they would re-map the adapted head when loaded)."""
    data = card.to_dict()
    data.pop("source_classes", None)
    return data


def _monai_version() -> str:
    import monai

    return monai.__version__
