"""Loading a Med-VFM in one of its real forms: a MONAI bundle folder, a TorchScript file, a ``torch.export``
program (``.pt2``), or a state dict plus a MONAI network name.

Safe by default: weights load with ``torch.load(weights_only=True)``. Formats that run code from the
file (pickled checkpoints, TorchScript, ``.pt2`` programs, bundle configs whose ``_target_`` is not a plain
MONAI network with literal arguments) need ``trust=True``, and the refusal says why.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ASFDALib.errors import ModelError, TrustRequiredError
from ASFDALib.models.card import IntensityConfig, ModelCard, NetworkSpec, card_from_dict, load_card

CARD_NAMES = ("asfda_card.json", "asfda_card.yaml", "model_card.json", "model_card.yaml")
_TRUST_HINT = "pass --trust (trust=True) only if you trust whoever made this file"


@dataclass
class LoadedModel:
    """A network ready for inference, with its card and a digest that identifies weights + card."""

    network: torch.nn.Module
    card: ModelCard
    kind: str
    path: Path
    digest: str
    spec: NetworkSpec | None = None

    @property
    def scripted(self) -> bool:
        return isinstance(self.network, torch.jit.ScriptModule) or self.kind == "pt2"  # opaque: no feature taps

    def source_stats_path(self) -> Path | None:
        if not self.card.source_stats:
            return None
        base = self.path if self.path.is_dir() else self.path.parent
        return base / self.card.source_stats


def monai_network_names() -> list[str]:
    import monai.networks.nets as nets

    return sorted(
        name
        for name, obj in vars(nets).items()
        if inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and not name.startswith("_")
    )


def build_network(spec: NetworkSpec) -> torch.nn.Module:
    """Instantiate ``monai.networks.nets.<name>(**args)``; only MONAI classes, so no foreign code runs."""
    import monai.networks.nets as nets

    name = spec.name.rsplit(".", 1)[-1]
    cls = getattr(nets, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
        close = [n for n in monai_network_names() if n.lower().startswith(name.lower()[:3])]
        raise ModelError(
            f"network {spec.name!r} is not a MONAI network" + (f"; did you mean {close}?" if close else "")
        )
    try:
        return cls(**spec.args)
    except TypeError as exc:
        raise ModelError(f"network {name}: bad arguments {spec.args} ({exc})") from None


def _file_digest(*parts: Path | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            digest.update(part)
            continue
        files = sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part]
        for file in files:
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def load_weights(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt``/``.pth``/``.ckpt`` file; unwraps common checkpoint layouts and DDP prefixes."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: weights file not found") from None
    except Exception as exc:  # noqa: BLE001 - weights_only refusal or corrupt file
        if not trust:
            raise TrustRequiredError(
                f"{path}: not a plain weights file; loading it would unpickle arbitrary objects, which can run "
                f"code ({type(exc).__name__}). Re-save it as a state dict, or {_TRUST_HINT}"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001
            raise ModelError(f"{path}: cannot read weights ({exc2})") from None
    for key in ("state_dict", "model_state_dict", "model", "network", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), (dict, torch.nn.Module)):
            obj = obj[key]
            break
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: no state dict (tensor mapping) found in this file")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _apply_weights(network: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        detail = "; ".join(
            part
            for part in (
                f"size mismatch {shapes[:3]}" if shapes else "",
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
            )
            if part
        )
        raise ModelError(f"{path}: weights do not fit {what} ({detail}); check the card's network and class_names")
    network.load_state_dict(state)


def _check_classes(network: torch.nn.Module, card: ModelCard, path: Path) -> None:
    channels = getattr(network, "in_channels", None)
    if isinstance(channels, int) and channels != 1:
        raise ModelError(
            f"{path}: the network expects {channels} input channels; ASFDA feeds one image channel per volume "
            "(multi-sequence models are not supported yet)"
        )
    out = getattr(network, "out_channels", None)
    if isinstance(out, int) and out != card.num_classes:
        raise ModelError(
            f"{path}: the network has {out} output channels but the card lists {card.num_classes} classes "
            f"{card.class_names}; fix class_names in the card"
        )


def _find_card(candidates: list[Path], explicit: Path | None) -> ModelCard:
    if explicit is not None:
        return load_card(explicit)
    for candidate in candidates:
        if candidate.is_file():
            return load_card(candidate)
    names = ", ".join(str(c) for c in candidates)
    raise ModelError(f"no model card found (looked for {names}); write one or pass --card")


def load_model(
    path: Path | str,
    card: Path | str | ModelCard | None = None,
    network: NetworkSpec | None = None,
    trust: bool = False,
) -> LoadedModel:
    """Load a bundle folder, a TorchScript file (trust) or a state dict (+ network from ``network`` or card)."""
    path = Path(path)
    explicit = Path(card) if isinstance(card, (str, Path)) else None
    if not path.exists():
        raise ModelError(f"{path}: model not found")
    if path.is_dir():
        return _load_bundle(path, card if isinstance(card, ModelCard) else None, explicit, trust)
    loaded_card = (
        card
        if isinstance(card, ModelCard)
        else _find_card(
            [path.with_name(path.name.split(".")[0] + ".card.json")] + [path.parent / n for n in CARD_NAMES], explicit
        )
    )
    digest = _file_digest(path, json.dumps(loaded_card.to_dict(), sort_keys=True).encode())
    if path.suffix.lower() == ".pt2":
        return _load_exported_program(path, loaded_card, digest, trust)
    if _is_torchscript(path):
        if not trust:
            raise TrustRequiredError(f"{path}: TorchScript runs code stored in the file; {_TRUST_HINT}")
        net = torch.jit.load(str(path), map_location="cpu")
        return LoadedModel(net.eval(), loaded_card, "torchscript", path, digest)
    spec = network or loaded_card.network
    if spec is None:
        raise ModelError(f"{path}: a state dict needs a network; add 'network' to the card or pass --network")
    net = build_network(spec)
    _check_classes(net, loaded_card, path)
    _apply_weights(net, load_weights(path, trust), path, f"MONAI {spec.name}")
    return LoadedModel(net.eval(), loaded_card, "state_dict", path, digest, spec)


def _load_exported_program(path: Path, card: ModelCard, digest: str, trust: bool) -> LoadedModel:
    """A ``torch.export`` program (``.pt2``, :mod:`ASFDALib.models.program`); it needs trust because
    ``torch.export.load`` unpickles parts of the archive."""
    from ASFDALib.models.program import ExportedNetwork, check_program, load_program

    if not trust:
        raise TrustRequiredError(
            f"{path}: loading a torch.export program unpickles parts of the file, which can run code; {_TRUST_HINT}"
        )
    program = load_program(path)
    check_program(program, card.roi_size, card.num_classes, path)
    return LoadedModel(ExportedNetwork(program), card, "pt2", path, digest)


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/code/__torch__.py") or "/code/" in name for name in archive.namelist())


# --- MONAI bundles -----------------------------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def _is_literal(value: Any) -> bool:
    if isinstance(value, str):
        return not value.startswith(("@", "$", "%", "#"))
    if isinstance(value, dict):
        return "_target_" not in value and all(_is_literal(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_is_literal(v) for v in value)
    return True


def _safe_network_spec(network_def: Any) -> NetworkSpec | None:
    """A MONAI network with literal arguments can be built without running the config."""
    if not isinstance(network_def, dict) or not isinstance(network_def.get("_target_"), str):
        return None
    target = network_def["_target_"]
    name = target.rsplit(".", 1)[-1]
    if target not in (name, f"monai.networks.nets.{name}") or name not in monai_network_names():
        return None
    args = {k: v for k, v in network_def.items() if k != "_target_"}
    return NetworkSpec(name, args) if _is_literal(args) else None


def _card_from_bundle(folder: Path, config: dict[str, Any]) -> ModelCard:
    """Derive a card from the bundle's metadata.json and literal transform settings."""
    meta_path = folder / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    channels = meta.get("network_data_format", {}).get("outputs", {}).get("pred", {}).get("channel_def", {})
    if not channels:
        raise ModelError(f"{folder}: bundle has no class names (metadata channel_def); add asfda_card.json")
    class_names = [channels[k] for k in sorted(channels, key=int)]
    data: dict[str, Any] = {"class_names": class_names, "name": meta.get("name", folder.name)}
    for transform in _walk_dicts(config.get("preprocessing", config)):
        target = str(transform.get("_target_", "")).rsplit(".", 1)[-1]
        if target in ("Spacingd", "Spacing") and _is_literal(transform.get("pixdim")):
            data["spacing"] = transform["pixdim"]
        elif target in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            keys = ("a_min", "a_max", "b_min", "b_max")
            if all(_is_literal(transform.get(k)) and k in transform for k in keys):
                data["intensity"] = IntensityConfig("ct", **{k: float(transform[k]) for k in keys})
        elif target in ("NormalizeIntensityd", "NormalizeIntensity"):
            data["intensity"] = IntensityConfig("zscore")
    inferer = config.get("inferer", {})
    if isinstance(inferer, dict) and _is_literal(inferer.get("roi_size")) and inferer.get("roi_size"):
        data["roi_size"] = inferer["roi_size"]
    return card_from_dict(data, str(meta_path))


def _walk_dicts(node: Any):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk_dicts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_dicts(value)


def _load_bundle(folder: Path, card: ModelCard | None, explicit: Path | None, trust: bool) -> LoadedModel:
    configs = [folder / "configs" / n for n in ("inference.json", "inference.yaml", "inference.yml")]
    config_path = next((c for c in configs if c.is_file()), None)
    if config_path is None:
        raise ModelError(f"{folder}: not a MONAI bundle (no configs/inference.json)")
    try:
        config = _read_config(config_path)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{config_path}: cannot parse bundle config ({exc})") from None
    if card is None:
        card_files = [folder / n for n in CARD_NAMES] + [folder / "configs" / n for n in CARD_NAMES]
        card = (
            load_card(explicit)
            if explicit
            else next((load_card(c) for c in card_files if c.is_file()), None) or _card_from_bundle(folder, config)
        )
    weights = [folder / "models" / n for n in ("model.pt", "model.pth", "model.ts")]
    weight_path = next((w for w in weights if w.is_file()), None)
    if weight_path is None:
        raise ModelError(f"{folder}: bundle has no weights (models/model.pt or models/model.ts)")
    digest = _file_digest(config_path, weight_path, json.dumps(card.to_dict(), sort_keys=True).encode())
    if weight_path.suffix == ".ts":
        if not trust:
            raise TrustRequiredError(f"{weight_path}: TorchScript runs code stored in the file; {_TRUST_HINT}")
        net = torch.jit.load(str(weight_path), map_location="cpu")
        return LoadedModel(net.eval(), card, "bundle", folder, digest)
    spec = _safe_network_spec(config.get("network_def"))
    if spec is not None:
        net = build_network(spec)
    elif not trust:
        raise TrustRequiredError(
            f"{config_path}: network_def is not a plain MONAI network with literal arguments; building it would run "
            f"code named in the config; {_TRUST_HINT}"
        )
    else:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(config_path))
        parser["bundle_root"] = str(folder)
        net = parser.get_parsed_content("network_def")
    _check_classes(net, card, folder)
    _apply_weights(net, load_weights(weight_path, trust), weight_path, "the bundle's network_def")
    return LoadedModel(net.eval(), card, "bundle", folder, digest, spec)
