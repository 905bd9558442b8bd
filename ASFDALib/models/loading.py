"""Loading a Med-VFM in one of its real forms: a MONAI bundle folder, a TorchScript file, a ``torch.export``
program (``.pt2``), a state dict plus a MONAI network name, or a checkpoint whose own files describe its network
(an nnU-Net training output: :mod:`ASFDALib.models.nnunet`; an nnssl pre-training checkpoint:
:mod:`ASFDALib.models.nnssl`).

Safe by default: weights load with ``torch.load(weights_only=True)``. Formats that run code from the
file (pickled checkpoints, TorchScript, ``.pt2`` programs, bundle configs whose ``_target_`` is not a plain
MONAI network with literal arguments) need ``trust=True``, and the refusal says why.

Weights (a state dict file, a bundle's ``models/model.pt``) go through :func:`ASFDALib.checkpoints.load_pretrained`:
a network built for the card's classes takes a published checkpoint in any layout, with a head for other
classes (re-initialised, rows copied for mapped classes) or none (encoder-only), and the
:class:`~ASFDALib.checkpoints.LoadReport` of what was loaded, new and ignored stays on the :class:`LoadedModel`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ASFDALib.checkpoints import LoadReport, class_map_from_names, load_pretrained
from ASFDALib.errors import ModelError, TrustRequiredError, brief
from ASFDALib.models.bundle import (
    bundle_class_names,
    bundle_code_importable,
    card_from_bundle,
    is_literal,
    monai_parser,
    read_config,
    resolve_references,
)
from ASFDALib.models.card import ModelCard, NetworkSpec, card_from_dict, load_card, read_card_data
from ASFDALib.models.nnssl import is_nnssl_checkpoint
from ASFDALib.models.nnunet import nnunet_plans
from ASFDALib.models.resenc import ResidualEncoderUNet

# Networks ASFDA builds itself, by the name a NetworkSpec gives: those of published models no MONAI network has
ASFDA_NETWORKS: dict[str, type[torch.nn.Module]] = {"ResidualEncoderUNet": ResidualEncoderUNet}
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
    # What the weights loader did (None for TorchScript), and the --class-map it was given (names, as typed).
    load_report: LoadReport | None = None
    class_map: str | dict[str, str] | None = None
    # A session's model: which one it is (the session, source or adapted, the round and its checkpoint's hash),
    # as a prediction's manifest records it; None for a model loaded from its file
    made_by: dict | None = None
    # where the card derived from the model's own config (a MONAI bundle's transforms: models.bundle) gives the
    # network other input than that config's runner would, one sentence each; kept here, not in the load report,
    # as a TorchScript bundle has the card and its notes but no report (rank says them among its notes)
    card_notes: list[str] = field(default_factory=list)

    @property
    def scripted(self) -> bool:
        return isinstance(self.network, torch.jit.ScriptModule) or self.kind == "pt2"  # opaque: no feature taps

    @property
    def head_is_new(self) -> bool:
        """Whether the output head knows none of the target's classes: an encoder-only checkpoint, or a head
        re-initialised for the target with no foreground class's rows copied from the checkpoint. Its
        segmentation is then noise until the first fine-tune (ranking leaves ASD out of round 1)."""
        report = self.load_report
        if report is None:
            return False
        return report.encoder_only or (report.head_reinitialised and not any(t > 0 for t in report.mapped_classes))

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


def _network_class(spec: NetworkSpec) -> type[torch.nn.Module]:
    import monai.networks.nets as nets

    name = spec.name.rsplit(".", 1)[-1]
    cls = ASFDA_NETWORKS.get(name) or getattr(nets, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
        known = [*monai_network_names(), *ASFDA_NETWORKS]
        close = [n for n in known if n.lower().startswith(name.lower()[:3])]
        raise ModelError(
            f"network {spec.name!r} is not a MONAI network nor one of ASFDA's ({', '.join(ASFDA_NETWORKS)})"
            + (f"; did you mean {close}?" if close else "")
        )
    return cls


# arguments published configs still pass that the MONAI this runs on no longer takes
DROPPED_ARGUMENTS = {"SwinUNETR": ("img_size",)}


def build_network(spec: NetworkSpec, seed: int | None = None) -> torch.nn.Module:
    """Instantiate ``monai.networks.nets.<name>(**args)``, or one of :data:`ASFDA_NETWORKS`; only those classes,
    so no foreign code runs.

    With ``seed``, the initialisation is drawn from that seed without touching the caller's random state, so
    tensors a checkpoint does not provide (a new head) are the same every time the model is rebuilt.
    """
    cls = _network_class(spec)
    try:
        if seed is None:
            return cls(**spec.args)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(**spec.args)
    except TypeError as exc:
        import re

        import monai

        if unknown := re.search(r"unexpected keyword argument '(\w+)'", str(exc)):
            name = unknown.group(1)
            # configs written for an older MONAI keep arguments it dropped since
            why = " (an older MONAI's, dropped since)" if name in DROPPED_ARGUMENTS.get(cls.__name__, ()) else ""
            ours = cls.__name__ in ASFDA_NETWORKS
            taker = f"ASFDA's {cls.__name__}" if ours else f"MONAI {monai.__version__}"
            where = f"{cls.__module__}.{cls.__name__}" if ours else f"monai.networks.nets.{cls.__name__}"
            raise ModelError(
                f"network {cls.__name__}: {taker} takes no argument {name!r}{why}; remove or correct it in the "
                f"network's arguments (a bundle's configs network_def, the card's network or --network-args; "
                f"{where} lists those it takes)"
            ) from None
        raise ModelError(f"network {cls.__name__}: bad arguments {spec.args} ({exc})") from None


def spec_for_classes(spec: NetworkSpec, num_classes: int) -> NetworkSpec:
    """``spec`` with its output channels set to the target's class count (a published network's arguments
    name the pre-training classes; the head for the target's classes is then new)."""
    if "out_channels" in inspect.signature(_network_class(spec)).parameters:
        return NetworkSpec(spec.name, {**spec.args, "out_channels": num_classes})
    return spec


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


def load_weights(path: Path, trust: bool = False) -> Any:
    """The object stored in a ``.pt``/``.pth``/``.ckpt`` file, read with ``torch.load(weights_only=True)`` (numpy
    scalars and arrays allowed: training logs keep them, and they hold no code), or a ``.safetensors`` file's
    tensors; a pickle that needs more (a whole module, a config class) only with ``trust``. Unwrapping is the
    checkpoint reader's job."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except FileNotFoundError:
        raise ModelError(f"{path}: weights file not found") from None
    except OSError as exc:  # no permission, a folder, a broken mount
        raise ModelError(f"{path}: cannot read the weights file ({exc.strerror or exc})") from None
    if head[8:9] == b"{" and head[:1] != b"\x80":  # safetensors: an 8-byte header length, then the JSON header
        return read_safetensors(path)
    # torch.save writes a zip archive (a pickle stream before PyTorch 1.6): anything else is not a checkpoint,
    # and --trust would not make it one
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ModelError(
            f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive, safetensors a JSON header; this file "
            f"starts with {head[:4]!r}); is it the model's weights file?"
        )
    # torch before 2.5 has no safe_globals: numpy values there still need trust, nothing else changes
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow(_numpy_data_globals()) if allow else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a global weights_only does not allow: objects that may run code
        if not trust:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            holds = f"it holds {found.group(1)}" if found else type(exc).__name__
            raise TrustRequiredError(
                f"{path}: not a plain weights file; loading it would unpickle arbitrary objects, which can run "
                f"code ({holds}). Re-save its state dict where it was made, or {_TRUST_HINT}"
            ) from None
    except Exception as exc:  # noqa: BLE001 - torch's reader on a damaged archive (a download cut short)
        raise ModelError(
            f"{path}: cannot read weights ({brief(exc, 300)}); the file looks damaged or incomplete: "
            "download or save it again"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as exc:  # a class of the training code, not importable here
        raise ModelError(
            f"{path}: cannot read weights ({exc}): the file holds objects of its training code; re-save its state "
            "dict where that code is (torch.save(model.state_dict(), ...)), or install that code here"
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: cannot read weights ({brief(exc, 300)})") from None


def _numpy_data_globals() -> list:
    """What a pickled numpy scalar or array needs: data, no code (nnU-Net's and Lightning's logs keep them), under
    numpy 2's names and numpy 1's (``numpy.core``: checkpoints saved before numpy 2, most published ones)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = {type(np.dtype(t)) for t in "?bBhHiIlLqQefdgFDGSUV"}
    makers = [core.multiarray.scalar, core.multiarray._reconstruct]
    return [*makers, np.ndarray, np.dtype, *dtypes, *((f, f"numpy.core.multiarray.{f.__name__}") for f in makers)]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors (Hugging Face's format: a JSON header of names, dtypes, shapes and byte
    ranges, then the raw little-endian data). Data only, so no trust is needed; read here without the package."""
    data = Path(path).read_bytes()
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        body = memoryview(data)[8 + size :]
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in _SAFETENSORS_DTYPES:  # readable, just not a type a network here stores
                raise ModelError(
                    f"{path}: tensor {name} is of safetensors dtype {entry['dtype']}, which ASFDA does not read "
                    f"({', '.join(_SAFETENSORS_DTYPES)}); save the weights in one of those"
                )
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            flat = (
                torch.frombuffer(bytearray(body[begin:end]), dtype=dtype)
                if end > begin
                else torch.empty(0, dtype=dtype)
            )
            tensors[name] = flat.reshape(entry["shape"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelError(
            f"{path}: cannot read it as safetensors ({type(exc).__name__}: {exc}); the file looks damaged or incomplete"
        ) from None
    return tensors


def resolve_class_map(
    card: ModelCard, class_map: str | Mapping[str, str] | None, source: Path | str
) -> dict[int, int] | None:
    """{target class index: checkpoint class index} from ``--class-map`` names and the card's ``source_classes``.

    Without ``class_map``, classes whose names agree are paired; without ``source_classes`` there is nothing to
    pair with, and a ``class_map`` is refused.
    """
    if not card.source_classes:
        if class_map:
            raise ModelError(
                f"{source}: a class map needs the pre-trained head's class names; add 'source_classes' to the card"
            )
        return None
    return class_map_from_names(card.class_names, card.source_classes, class_map or None)


def _apply_weights(
    network: torch.nn.Module,
    obj: Any,
    card: ModelCard,
    class_map: str | Mapping[str, str] | None,
    path: Path,
    source_names: list[str] | None = None,
) -> LoadReport:
    """Load a checkpoint object into a network built for the card's classes; refuses tensors that do not fit.
    ``source_names``: the classes a bundle's metadata names, for the hint where no pre-trained row is kept."""
    report = load_pretrained(
        network, obj, num_classes=card.num_classes, class_map=resolve_class_map(card, class_map, path), source=str(path)
    )
    if card.source_classes and report.source_classes not in (None, len(card.source_classes)):
        raise ModelError(
            f"{path}: the card lists {len(card.source_classes)} source_classes but the checkpoint's head has "
            f"{report.source_classes} classes; fix source_classes in the card"
        )
    report.class_names, report.source_class_names = list(card.class_names), list(card.source_classes or [])
    if report.head_reinitialised and not report.mapped_classes and not report.encoder_only and not class_map:
        if report.source_classes and not card.source_classes:  # nothing says which of its classes are which
            named = (
                f" (its metadata names them: {', '.join(source_names)})"
                if source_names and len(source_names) == report.source_classes
                else ""
            )
            report.hint = (
                f"to keep the pre-trained rows of the classes the two share, list the checkpoint's "
                f"{report.source_classes} classes in the card's source_classes{named} (then --class-map pairs "
                "those named otherwise)"
            )
    return report


def _check_inputs(network: torch.nn.Module, path: Path) -> None:
    channels = getattr(network, "in_channels", None)
    if isinstance(channels, int) and channels != 1:
        raise ModelError(
            f"{path}: the network expects {channels} input channels; ASFDA feeds one image channel per volume "
            "(multi-sequence models are not supported yet)"
        )


def card_beside(path: Path) -> Path:
    """The card named for a weights file, beside it: ``model.ts`` -> ``model.card.json``,
    ``adapted.r2.ts`` -> ``adapted.r2.card.json`` (exports write it there; only the last suffix goes, so two
    rounds' exports side by side keep a card each)."""
    path = Path(path)
    return path.with_name(path.with_suffix("").name + ".card.json")


def _card_before_the_first_dot(path: Path) -> Path:
    """Where exports before 2026-12-06 wrote the card of a name with dots (``adapted.r2.ts`` ->
    ``adapted.card.json``): still read, after the card named for the whole stem."""
    return path.with_name(path.name.split(".")[0] + ".card.json")


def card_candidates(path: Path) -> list[Path]:
    """Where a model's card is looked for when none is given, first found first: beside a weights file as
    ``<name>.card.json`` or one of CARD_NAMES; in a bundle folder, or its configs/, as one of CARD_NAMES."""
    if path.is_dir():
        return [path / n for n in CARD_NAMES] + [path / "configs" / n for n in CARD_NAMES]
    named = list(dict.fromkeys([card_beside(path), _card_before_the_first_dot(path)]))
    return named + [path.parent / n for n in CARD_NAMES]


def _card_file(candidates: list[Path], explicit: Path | None) -> Path | None:
    """The card file to read: the one given (``--card``), else the first of ``candidates`` that exists."""
    return explicit if explicit is not None else next((c for c in candidates if c.is_file()), None)


def _find_card(candidates: list[Path], explicit: Path | None) -> ModelCard:
    if (found := _card_file(candidates, explicit)) is not None:
        return load_card(found)
    names = ", ".join(str(c) for c in candidates)
    raise ModelError(f"no model card found (looked for {names}); write one or pass --card")


def _card_as_written(path: Path, card: Path | str | ModelCard | Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """The keys of the card for the model at ``path`` as written (a card's defaults left out, so a model that
    describes its own input fills what it leaves out), and where they come from for a refusal: a card object's
    (a session's, whole), a mapping's (written in Python), a card file's (given, or beside the model), or none."""
    if isinstance(card, ModelCard):
        return card.to_dict(), "the card given"
    if isinstance(card, Mapping):
        return dict(card), "the card given"
    found = _card_file(card_candidates(path), Path(card) if card is not None else None)
    return (read_card_data(found), str(found)) if found else ({}, "the card")


def _load_nnunet(
    path: Path,
    plans: Path,
    card: ModelCard | None,
    explicit: Path | None,
    network: NetworkSpec | None,
    trust: bool,
    class_map: str | Mapping[str, str] | None,
) -> LoadedModel:
    """An nnU-Net training output as MONAI's DynUNet (:mod:`ASFDALib.models.nnunet`): the network and, unless a
    card is given, the card from its plans; a given card's pre-trained classes are the checkpoint's own."""
    from dataclasses import replace

    from ASFDALib.models.nnunet import read_nnunet

    spec, own, state, converted = read_nnunet(path, plans, load_weights(path, trust))
    if card is None and explicit is not None:
        card = load_card(explicit)
    if card is not None and not card.source_classes:  # the checkpoint's head is known: dataset.json names it
        card = replace(card, source_classes=list(own.class_names))
    card = card or own
    spec = spec_for_classes(spec, card.num_classes)
    if network is not None and network != spec:
        raise ModelError(f"{path}: an nnU-Net model's network comes from its plans ({plans}); leave --network out")
    net = build_network(spec, seed=0)
    report = _apply_weights(net, state, card, class_map, path)
    report.key_mapping = converted
    digest = _file_digest(path, *_digest_parts(card, class_map))
    return LoadedModel(net.eval(), card, "state_dict", path, digest, spec, report, class_map)


def _load_nnssl(
    path: Path,
    card: Path | str | ModelCard | Mapping[str, Any] | None,
    network: NetworkSpec | None,
    trust: bool,
    class_map: str | Mapping[str, str] | None,
) -> LoadedModel:
    """An nnssl pre-training checkpoint (:mod:`ASFDALib.models.nnssl`): the network its adaptation plan describes,
    built for the card's classes, its stem and encoder loaded, decoder and head new; the card's keys as written,
    the pre-training plan's spacing, window and intensity where it leaves them out."""
    from ASFDALib.models.nnssl import read_nnssl

    if class_map:
        raise ModelError(
            f"{path}: an nnssl pre-training checkpoint has no segmentation head to pair classes with; "
            "leave --class-map out"
        )
    given, source = _card_as_written(path, card)
    nnssl = read_nnssl(path, load_weights(path, trust), given, source)
    spec = nnssl.spec
    if network is not None and network != spec:
        raise ModelError(f"{path}: an nnssl checkpoint's network comes from its adaptation plan; leave --network out")
    net = build_network(spec, seed=0)
    report = _apply_weights(net, nnssl.state, nnssl.card, None, path)
    report.key_mapping = nnssl.note
    report.ignored = sorted([*report.ignored, *nnssl.ignored])
    # a plan read beside the checkpoint describes the network as the checkpoint's own would: a changed plan, a model
    plan = [nnssl.plan_file] if nnssl.plan_file else []
    digest = _file_digest(path, *plan, *_digest_parts(nnssl.card, None))
    return LoadedModel(net.eval(), nnssl.card, "state_dict", path, digest, spec, report)


@dataclass(frozen=True)
class ModelSource:
    """A model as the user named it (``--model``, ``--card``, ``--network``, ``--trust``, ``--class-map``), to
    load as often as a caller needs the same starting weights again (every benchmark training starts from them)."""

    path: Path
    card: Path | None = None
    network: NetworkSpec | None = None
    trust: bool = False
    class_map: str | None = None

    def load(self) -> LoadedModel:
        return load_model(self.path, self.card, self.network, self.trust, self.class_map)


def load_model(
    path: Path | str,
    card: Path | str | ModelCard | Mapping[str, Any] | None = None,
    network: NetworkSpec | None = None,
    trust: bool = False,
    class_map: str | Mapping[str, str] | None = None,
) -> LoadedModel:
    """Load a bundle folder, a TorchScript file (trust) or a state dict (+ network from ``network`` or card).

    A network named by ``network`` or the card is built for the card's classes; ``class_map``
    (``"liver=liver,kidney=right kidney"``: target=source names, sources from the card's ``source_classes``)
    says which pre-trained head rows to copy. The report of what loaded is ``LoadedModel.load_report``.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: model not found")
    # before nnU-Net's: nnssl writes plans.json above its fold folders too, plans of no segmentation network; and
    # before the card is read whole, as the card's keys as written are what the checkpoint's plan does not fill
    if path.is_file() and is_nnssl_checkpoint(path):
        return _load_nnssl(path, card, network, trust, class_map)
    if isinstance(card, Mapping):  # a card written in Python, as the card file would hold it
        card = card_from_dict(dict(card), source="the card given")
    explicit = Path(card) if isinstance(card, (str, Path)) else None
    if (plans := nnunet_plans(path)) is not None:  # nnU-Net's own training output: the plans say the network
        return _load_nnunet(
            path, plans, card if isinstance(card, ModelCard) else None, explicit, network, trust, class_map
        )
    bundle = _bundle_holding(path)
    if bundle is not None and card is None and not any(c.is_file() for c in card_candidates(path)):
        path = bundle  # a bundle's weights or config picked in a file dialog (the panel's browses files): the bundle
    if path.is_dir():
        return _load_bundle(path, card if isinstance(card, ModelCard) else None, explicit, trust, class_map)
    try:
        loaded_card = card if isinstance(card, ModelCard) else _find_card(card_candidates(path), explicit)
    except ModelError as exc:
        if (folder := _bundle_of(path)) is not None and path.parent.name == "models":
            raise ModelError(  # another checkpoint of a bundle: the bundle describes its network and classes
                f"{path}: {exc}. It sits in the MONAI bundle {folder}: --model {folder} loads the bundle's own "
                "weights; for this checkpoint, give a --card (the bundle's asfda_card.json, if it holds one)"
            ) from None
        raise
    digest = _file_digest(path, *_digest_parts(loaded_card, class_map))
    if path.suffix.lower() == ".pt2":
        return _load_exported_program(path, loaded_card, digest, trust)
    if _is_torchscript(path):
        if not trust:
            raise TrustRequiredError(f"{path}: TorchScript runs code stored in the file; {_TRUST_HINT}")
        net = torch.jit.load(str(path), map_location="cpu")
        return LoadedModel(net.eval(), loaded_card, "torchscript", path, digest)
    spec = network or loaded_card.network
    if spec is None:
        raise ModelError(
            f"{path}: weights need a network to load into; add 'network' (name and args) to the card, or pass "
            "--network and --network-args where the command takes them (rank, stats, benchmark)"
        )
    spec = spec_for_classes(spec, loaded_card.num_classes)
    net = build_network(spec, seed=0)
    _check_inputs(net, path)
    report = _apply_weights(net, load_weights(path, trust), loaded_card, class_map, path)
    return LoadedModel(net.eval(), loaded_card, "state_dict", path, digest, spec, report, class_map)


WEIGHT_NAMES = ("model.pt", "model.pth", "model.ts")  # a bundle's weights in models/, the first found loaded
INFERENCE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")


def _bundle_weights(folder: Path) -> Path | None:
    return next((w for w in (folder / "models" / n for n in WEIGHT_NAMES) if w.is_file()), None)


def _bundle_of(path: Path) -> Path | None:
    """The MONAI bundle folder (one with an inference config) whose models/ or configs/ ``path`` is in."""
    folder = path.parent.parent
    inside = not path.is_dir() and path.parent.name in ("models", "configs")
    return folder if inside and any((folder / "configs" / n).is_file() for n in INFERENCE_CONFIGS) else None


def _bundle_holding(path: Path) -> Path | None:
    """The MONAI bundle folder whose weights (the file the bundle loads: models/model.pt, ...) or inference
    config ``path`` is, else None: another checkpoint in models/ (model_best_epoch90.pt) is its own model."""
    folder = _bundle_of(path)
    if folder is None:
        return None
    return folder if path in (_bundle_weights(folder), *(folder / "configs" / n for n in INFERENCE_CONFIGS)) else None


def _digest_parts(card: ModelCard, class_map: str | Mapping[str, str] | None) -> list[bytes]:
    """The card, and a class map when there is one (it changes the head's weights; "v2": a map adds to the
    same-name pairs since 2026-12-01, so the same text no longer names the same weights as before)."""
    parts = [json.dumps(card.to_dict(), sort_keys=True).encode()]
    if class_map:
        parts.append(b"class-map-v2:" + json.dumps(class_map, sort_keys=True).encode())
    return parts


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


def _safe_network_spec(network_def: Any, config: dict[str, Any] | None = None) -> NetworkSpec | None:
    """A MONAI network with literal arguments can be built without running the config (arguments that refer to
    literal values elsewhere in the config, ``"@num_classes"``, are literal too)."""
    if isinstance(network_def, dict) and config is not None:
        network_def = {k: v if k == "_target_" else resolve_references(v, config) for k, v in network_def.items()}
    if not isinstance(network_def, dict) or not isinstance(network_def.get("_target_"), str):
        return None
    target = network_def["_target_"]
    name = target.rsplit(".", 1)[-1]
    if target not in (name, f"monai.networks.nets.{name}") or name not in monai_network_names():
        return None
    args = {k: v for k, v in network_def.items() if k != "_target_"}
    return NetworkSpec(name, args) if is_literal(args) else None


def _load_bundle(
    folder: Path,
    card: ModelCard | None,
    explicit: Path | None,
    trust: bool,
    class_map: str | Mapping[str, str] | None = None,
) -> LoadedModel:
    configs = [folder / "configs" / n for n in INFERENCE_CONFIGS]
    config_path = next((c for c in configs if c.is_file()), None)
    if config_path is None:
        raise ModelError(
            f"{folder}: not a MONAI bundle (no configs/inference.json): add the bundle's inference config, or give "
            "the weights file itself (--model FOLDER/models/model.pt) with a card that names its network (--card)"
        )
    try:
        config = read_config(config_path)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{config_path}: cannot parse bundle config ({exc})") from None
    notes: list[str] = []  # what MONAI's run of the bundle does that the card derived from it cannot say
    if card is None and (found := _card_file(card_candidates(folder), explicit)) is not None:
        card = load_card(found)
    if card is None:
        card, notes = card_from_bundle(folder, config, config_path, trust)
    weight_path = _bundle_weights(folder)
    if weight_path is None:
        raise ModelError(f"{folder}: bundle has no weights (models/model.pt or models/model.ts)")
    digest = _file_digest(config_path, weight_path, *_digest_parts(card, class_map))
    if weight_path.suffix == ".ts":
        if not trust:
            raise TrustRequiredError(f"{weight_path}: TorchScript runs code stored in the file; {_TRUST_HINT}")
        net = torch.jit.load(str(weight_path), map_location="cpu")
        return LoadedModel(net.eval(), card, "bundle", folder, digest, card_notes=notes)
    spec = _safe_network_spec(config.get("network_def"), config)
    if spec is not None:
        spec = spec_for_classes(spec, card.num_classes)
        net = build_network(spec, seed=0)
    elif not trust:
        raise TrustRequiredError(
            f"{config_path}: network_def is not a plain MONAI network with literal arguments; building it would run "
            f"code named in the config; {_TRUST_HINT}"
        )
    else:
        parser = monai_parser(config_path, folder)
        with bundle_code_importable(folder):
            try:
                with torch.random.fork_rng(devices=[]):  # a new head is the same every time the model is rebuilt
                    torch.manual_seed(0)
                    net = parser.get_parsed_content("network_def")
            except Exception as exc:  # noqa: BLE001 - the bundle's own code: any error it raises, in one line
                raise ModelError(f"{config_path}: cannot build network_def ({brief(exc, 300)})") from None
    _check_inputs(net, folder)
    report = _apply_weights(
        net, load_weights(weight_path, trust), card, class_map, weight_path, bundle_class_names(folder)
    )
    return LoadedModel(net.eval(), card, "bundle", folder, digest, spec, report, class_map, card_notes=notes)
