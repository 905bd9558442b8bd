"""Export an adapted model as a runnable MONAI bundle, a ``torch.export`` program (``.pt2``) or TorchScript,
always with its model card, and with metadata saying what the model is and how it was adapted.

The bundle runs as MONAI's model-zoo bundles do::

    python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\
        --meta_file BUNDLE/configs/metadata.json --bundle_root BUNDLE \\
        --dataset_dir /data/target --output_dir /data/predictions

``configs/inference.json`` has their structure: a dataset and data loader over ``dataset_dir``
(``datalist`` overrides the file list), the card's preprocessing (orientation, spacing, intensity), the
sliding-window inferer, postprocessing that inverts the preprocessing (``Invertd``) so label maps land on
each input's own grid, a ``SaveImaged`` writer into ``output_dir``, a ``SupervisedEvaluator``, and the
``initialize`` / ``run`` / ``finalize`` sections. MONAI's evaluator needs ``pytorch-ignite``, and
``python -m monai.bundle`` needs ``fire`` (``pip install 'monai[ignite,fire]'``). ``network_def``,
``preprocessing`` and ``inferer`` are MONAI components with literal arguments, so ASFDA reads the bundle
back without ``--trust``; the only ``$`` expressions are MONAI's usual glue (device, file list,
checkpoint path, ``evaluator.run()``), which ASFDA never evaluates.

A bundle whose network needed ``--trust`` (code in its config) is re-exported as the same bundle with
the adapted weights in place of its own, so it keeps running the way its authors made it run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ASFDALib.atomic import atomic_folder, atomic_write, atomic_write_json, remove_scratch
from ASFDALib.errors import ASFDAError, ModelError, as_arg
from ASFDALib.models.card import ModelCard
from ASFDALib.models.formats import (
    FORMATS,
    format_named_by,
    formats_without_bundle,
    program_file,
    recorded_network,
    session_format,
)
from ASFDALib.models.loading import WEIGHT_NAMES, LoadedModel, card_beside
from ASFDALib.outputs import (
    SESSION_FILE,
    refuse_existing,
    refuse_folder_holding,
    refuse_inside_session,
    refuse_overwrite,
    session_files,
)

UNKNOWN = "unknown: see the base model"
ASFDA_QUERY = (
    "ranked by DKD (distance from the pre-trained model's source knowledge, times diversity) + ASD "
    "(segmentation difficulty)"
)
# How asfda predict stitches windows, for anyone running the exported network with another inferer
SLIDING_WINDOW_NOTE = (
    "asfda predict runs windows of {roi} voxels at the card's spacing, overlapping by {overlap}, and takes each voxel "
    "from the window whose centre is nearest it. A MONAI SlidingWindowInferer blends windows instead: the exported "
    "bundle's, with centre weights (mode gaussian, sigma_scale 0.125), agrees with asfda predict on most voxels, not "
    "all (where the model is unsure, which window decides matters); MONAI's default plain average (mode constant) "
    "lets a voxel's border views outvote its central one and differs more"
)
BUILTIN_LICENCE = "Apache-2.0 (ASFDA's built-in model, trained by the ASFDA project on synthetic phantoms)"


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
            "clip": intensity.clip,
        }
    elif intensity.mode == "percentile":
        scale = {
            "_target_": "ScaleIntensityRangePercentilesd",
            "keys": "image",
            "lower": intensity.lower,
            "upper": intensity.upper,
            "b_min": intensity.b_min,
            "b_max": intensity.b_max,
            "clip": intensity.clip,
        }
    elif intensity.mode == "zscore":
        scale = {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": intensity.nonzero}
    else:
        scale = {"_target_": "Identityd", "keys": "image"}
    # The same transforms, with the same arguments, as ASFDALib.data.preprocess (float32 resampling too).
    return [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": card.axcodes, "labels": None},
        {"_target_": "Spacingd", "keys": "image", "pixdim": list(card.spacing), "mode": "bilinear", "dtype": "float32"},
        scale,
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "float32"},
    ]


def inference_config(card: ModelCard, network_def: dict[str, Any]) -> dict[str, Any]:
    """``configs/inference.json``: model-zoo structure, MONAI components only."""
    return {
        "imports": ["$import glob", "$import os", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "image_pattern": "*.nii*",  # MONAI's default readers; NRRD/MetaImage/DICOM need itk installed
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, @image_pattern)))",
        "output_dir": "$@bundle_root + '/eval'",
        "output_postfix": "seg",
        "output_ext": ".nii.gz",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(card)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,  # no worker processes by default (Slicer, small machines); override to speed up
        },
        # Centre-weighted blending: the nearest ASFDA's own rule (each voxel from its most central window) that
        # a MONAI inferer has; plain averaging lets a voxel's border views outvote its central one.
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(card.roi_size),
            "sw_batch_size": card.sw_batch_size,
            "overlap": card.overlap,
            "mode": "gaussian",
            "sigma_scale": 0.125,
        },
        # argmax at model spacing, then nearest-neighbour back to each input's grid: what `asfda predict` does.
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": True,
                    "to_tensor": True,
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "@output_postfix",
                    "output_ext": "@output_ext",
                    "output_dtype": "uint8",  # the card allows at most 256 classes
                    "resample": False,
                    "separate_folder": False,
                },
            ],
        },
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "@checkpoint", "load_dict": {"model": "@network"}},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,  # float32 as ASFDA scored and trained it on the CPU; --evaluator#amp true on a GPU
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
        "finalize": ["$monai.utils.set_determinism(seed=None)"],
    }


# --- provenance --------------------------------------------------------------------------------------


def _package_version(name: str, fallback: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return fallback


def _bundle_metadata(folder: Path) -> dict[str, Any]:
    path = folder / "configs" / "metadata.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _licence(model: LoadedModel, meta: dict[str, Any]) -> str:
    from ASFDALib.models.defaults import resources_dir

    for key in ("license", "licence"):
        if isinstance(meta.get(key), str) and meta[key].strip():
            return meta[key].strip()
    if model.path.is_dir():
        for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "docs/LICENSE", "docs/LICENSE.txt"):
            path = model.path / name
            if path.is_file():
                lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
                return f"{lines[0] if lines else 'see'} (the base bundle's {name})"
    if model.path.resolve().parent == (resources_dir() / "Model").resolve():
        return BUILTIN_LICENCE
    return UNKNOWN


def base_model_info(model: LoadedModel, session_model_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the adapted model started from: name, form, file, digest, licence, authors, version."""
    meta = _bundle_metadata(model.path) if model.path.is_dir() else {}
    info = session_model_info or {}
    return {
        "name": meta.get("name") or model.card.name,
        "form": info.get("kind", model.kind),
        "path": str(info.get("path", model.path)),
        "digest": info.get("digest", model.digest),
        "version": meta.get("version", UNKNOWN),
        "authors": meta.get("authors", UNKNOWN),
        "copyright": meta.get("copyright", UNKNOWN),
        "license": _licence(model, meta),
        "description": meta.get("description") or model.card.description or UNKNOWN,
    }


def provenance(session: Any, model: LoadedModel) -> dict[str, Any]:
    """The adaptation record for metadata: ASFDA version and method, the session, the target domain, the
    base model, and per fine-tuned round what it trained on (from ``session.json``)."""
    import ASFDALib

    data = session.data
    images = data.get("images") or {}
    files = images.get("files", [])
    pool = hashlib.sha256("".join(f"{f['name']}:{f['sha256']};" for f in files).encode()).hexdigest()[:16]
    rounds = []
    for entry in data.get("rounds", []):
        if not entry.get("checkpoint"):
            continue
        metrics = entry.get("metrics") or {}
        rounds.append(
            {
                "round": entry["index"],
                "query": entry.get("query", []),
                "strategy": entry.get("strategy") or {},
                "labelled": metrics.get("labelled", []),
                "pseudo_labelled": metrics.get("pseudo_labelled", []),
                "iterations": metrics.get("iterations", {}),
            }
        )
    labelled = sorted({n for r in rounds for n in r["labelled"]})
    return {
        "asfda": {
            "version": ASFDALib.__version__,
            "adapted": bool(rounds),
            "method": _method(rounds),
            "rounds": len(rounds),
            "labelled_count": len(labelled),
            "labelled": labelled,
            "per_round": rounds,
        },
        "session": {
            "path": str(Path(session.root).resolve()),
            "created": data.get("created"),
            "updated": data.get("updated"),
            "model_digest": model.digest,
        },
        "target_domain": {
            "description": f"{len(files)} volumes in {images.get('root', UNKNOWN)}",
            "images": images.get("root", UNKNOWN),
            "volumes": len(files),
            "pool_digest": pool,
        },
        "base_model": base_model_info(model, data.get("model")),
    }


def _method(rounds: list[dict[str, Any]]) -> str:
    """What was done, from what the session recorded as run (strategy per round, stage 2 and its volumes)."""
    if not rounds:
        return "not fine-tuned: the base model's weights, exported by ASFDA"
    names = sorted({str(r["strategy"].get("name", "asfda")) for r in rounds})
    query = ASFDA_QUERY if names == ["asfda"] else f"chosen by the {'/'.join(names)} strategy"
    stage2 = any(r["iterations"].get("stage2", 0) for r in rounds)
    # stage 2 runs on the labels alone when no volume passed the gate: only kept volumes mean pseudo-labels
    pseudo = any(r["iterations"].get("stage2", 0) and r.get("pseudo_labelled") for r in rounds)
    if pseudo:
        then = ", then with selective pseudo-labels of the reliable unlabelled volumes"
    elif stage2:
        then = ", then longer on the labels alone (no unlabelled volume passed the pseudo-label gate)"
    else:
        then = " (no pseudo-label stage)"
    return (
        f"ASFDA active source-free domain adaptation: target volumes {query}, the queried ones labelled, and the "
        "model fine-tuned on them" + then
    )


def _adaptation(record: dict[str, Any]) -> str:
    """What the session did to the base model's weights, in a phrase (from :func:`provenance`'s record)."""
    asfda = record.get("asfda", {})
    if asfda.get("adapted"):
        target = record.get("target_domain", {})
        return (
            f"adapted with ASFDA {asfda.get('version')} to {target.get('description', 'a target domain')}: "
            f"{asfda.get('rounds', 0)} round(s), {asfda.get('labelled_count', 0)} labelled volume(s)"
        )
    # an unadapted session exported with --source-model: the base model's own weights
    return f"not adapted: the base model's weights, exported by ASFDA {asfda.get('version', '')}".strip()


def exported_description(card: ModelCard, record: dict[str, Any] | None) -> str:
    """The exported model's description: the base model's name, what the session did to it, then the base
    card's own description (which alone would present the adapted weights as the base model's)."""
    if record is None:
        return card.description
    base = record.get("base_model", {})
    return f"{base.get('name', card.name)}, {_adaptation(record)}. {card.description}".strip()


def bundle_metadata(card: ModelCard, version: str, record: dict[str, Any] | None) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's metadata fields plus ASFDA's adaptation record."""
    import monai
    import numpy

    record = record or {}
    base = record.get("base_model", {})
    target = record.get("target_domain", {})
    classes = ", ".join(card.class_names[1:])
    # MONAI's schema requires a value range; [] where there is none (z-scored input, logits out)
    windowed = card.intensity.mode in ("ct", "percentile") and card.intensity.clip  # unclipped: no bounds
    value_range = [card.intensity.b_min, card.intensity.b_max] if windowed else []
    image = {
        "type": "image",
        "format": "hounsfield" if card.intensity.mode == "ct" else "magnitude",  # the model zoo's two formats
        "num_channels": 1,
        "spatial_shape": list(card.roi_size),
        "dtype": "float32",
        "value_range": value_range,
        "is_patch_data": True,
        "channel_def": {"0": "image"},
    }
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
        "meta_schema_20220324.json",
        "version": version,
        "changelog": {version: _adaptation(record)},
        "name": card.name,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {
            "nibabel": _package_version("nibabel", "5.0"),
            "pytorch-ignite": _package_version("pytorch-ignite", "0.4.11"),  # MONAI's evaluator needs it
        },
        "task": f"Segmentation of {classes}",
        "description": exported_description(card, record),
        "authors": base.get("authors", UNKNOWN),
        "copyright": base.get("copyright", UNKNOWN),
        "license": base.get("license", UNKNOWN),
        "data_source": target.get("description", UNKNOWN),
        "data_type": "nibabel",
        "image_classes": f"single channel image, intensity normalised ({card.intensity.mode}) as the model card says",
        "label_classes": f"single channel label map: {_class_list(card)}",
        "pred_classes": f"{card.num_classes} channels of logits, one per class (softmax gives probabilities, the "
        f"argmax the label map): {_class_list(card)}",
        "intended_use": "Research. Adapted from few labels: check it on your own labelled cases before relying on it.",
        "sliding_window": SLIDING_WINDOW_NOTE.format(roi=list(card.roi_size), overlap=card.overlap),
        "network_data_format": {
            "inputs": {"image": image},
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": card.num_classes,
                    "spatial_shape": list(card.roi_size),
                    "dtype": "float32",
                    "value_range": [],  # logits: unbounded
                    "is_patch_data": True,
                    "channel_def": {str(i): n for i, n in enumerate(card.class_names)},
                }
            },
        },
        **{k: record[k] for k in ("asfda", "session", "target_domain", "base_model") if k in record},
    }


def _class_list(card: ModelCard) -> str:
    return ", ".join(f"{i} is {n}" for i, n in enumerate(card.class_names))


# --- writers -----------------------------------------------------------------------------------------


def _write_weights(network: torch.nn.Module, path: Path) -> Path:
    if isinstance(network, torch.jit.ScriptModule):
        return atomic_write(path, lambda tmp: network.save(str(tmp)))
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def _write_card(model: LoadedModel, path: Path, record: dict[str, Any] | None) -> Path:
    card_data = _exported_card(model.card, record)
    if model.spec is not None:
        card_data["network"] = {"name": model.spec.name, "args": model.spec.args}
    return atomic_write_json(path, card_data)


def _refuse_overwriting_the_base(model: LoadedModel, written: list[Path]) -> None:
    """Never write over the base model, its card or anything inside a base bundle: the session refers to them."""
    from ASFDALib.models.loading import card_candidates

    base = model.path.resolve()
    protected = {base}
    if base.is_file():
        protected |= set(card_candidates(base))
    for path in written:
        target = Path(path).resolve()
        if target in protected or base in target.parents:
            raise ModelError(f"{path}: writing it would overwrite the base model {base}; export somewhere else")


def export_bundle(
    model: LoadedModel, folder: Path, version: str = "0.1.0", record: dict[str, Any] | None = None
) -> Path:
    """A runnable MONAI bundle: configs/{inference,metadata}.json, models/model.pt, asfda_card.json.

    ``record`` (from :func:`provenance`) goes into the metadata. A trusted bundle (network built by its own
    config) is copied with the adapted weights instead. Written whole or not at all (:func:`atomic_folder`): an
    export stopped part-way leaves no half bundle that MONAI would load, nor a folder its rerun refuses.
    """
    folder = Path(folder)
    written = [folder / "configs" / "inference.json", folder / "configs" / "metadata.json", folder / "asfda_card.json"]
    _refuse_overwriting_the_base(model, [*written, *(folder / "models" / n for n in WEIGHT_NAMES)])
    if refusal := bundle_refusal(f"{model.path}: this model", model.kind, model.spec.name if model.spec else None):
        raise ModelError(refusal)
    again = model.spec is None  # a bundle built by its own config (the only network without a name a bundle takes)
    remove_scratch(folder)  # an export killed part-way left its scratch folder
    with atomic_folder(folder) as stage:
        if again:
            _reexport_bundle(model, stage, record)
        else:
            _write_bundle(model, stage, version, record)
    return folder


def _write_bundle(model: LoadedModel, folder: Path, version: str, record: dict[str, Any] | None) -> None:
    """A bundle of the model's MONAI network into ``folder``: its configs, weights, card and source statistics."""
    card = model.card
    network_def = {"_target_": f"monai.networks.nets.{model.spec.name}", **model.spec.args}
    atomic_write_json(folder / "configs" / "inference.json", inference_config(card, network_def))
    atomic_write_json(folder / "configs" / "metadata.json", bundle_metadata(card, version, record))
    _write_weights(model.network, folder / "models" / "model.pt")
    _write_card(model, folder / "asfda_card.json", record)
    stats = model.source_stats_path()
    if stats is not None and stats.is_file():  # the base model's source knowledge, where the card says it is
        (folder / model.card.source_stats).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(stats, folder / model.card.source_stats)
    if model.path.is_dir():  # a literal bundle rebuilt: keep its licence text beside the weights derived from it
        for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
            if (model.path / name).is_file():
                shutil.copy2(model.path / name, folder / name)


def _reexport_bundle(model: LoadedModel, folder: Path, record: dict[str, Any] | None) -> None:
    """The base bundle as it was (configs, scripts, docs), with the adapted weights and merged metadata."""
    source = model.path
    weight = next((source / "models" / n for n in WEIGHT_NAMES if (source / "models" / n).is_file()), None)
    if weight is None:
        raise ModelError(f"{source}: the base bundle's weights are gone (models/model.pt); cannot re-export it")
    for item in source.iterdir():
        if item.name in ("models", "eval"):  # the base weights (and any other form of them) and old outputs
            continue
        destination = folder / item.name
        if item.is_dir():
            shutil.copytree(item, destination, dirs_exist_ok=True)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, destination)
    _write_weights(model.network, folder / "models" / weight.name)
    meta = _bundle_metadata(source)
    base_version = str(meta.get("version", "0.0.0"))
    version = f"{base_version}+asfda" if "+" not in base_version else f"{base_version}.asfda"
    ours = bundle_metadata(model.card, version, record)
    # The base bundle's own fields stay (name, task, authors, licence, intended use, what its code needs);
    # what changed with the adaptation is ours: version, description, versions it ran with, the record.
    merged = dict(meta)
    changed = ("version", "description", "monai_version", "pytorch_version", "numpy_version", "data_source")
    merged.update({k: ours[k] for k in (*changed, "asfda", "session", "target_domain", "base_model") if k in ours})
    for key in ("name", "license", "copyright", "authors", "task", "intended_use"):
        merged.setdefault(key, ours[key])
    merged["required_packages_version"] = {
        **(meta.get("required_packages_version") or {}),
        **ours["required_packages_version"],
    }
    merged["network_data_format"] = meta.get("network_data_format") or ours["network_data_format"]
    merged["network_data_format"].setdefault("outputs", {}).setdefault("pred", {})["channel_def"] = ours[
        "network_data_format"
    ]["outputs"]["pred"]["channel_def"]
    merged["changelog"] = {**ours["changelog"], **(meta.get("changelog") or {})}
    atomic_write_json(folder / "configs" / "metadata.json", merged)
    _write_card(model, folder / "asfda_card.json", record)


def _refuse_program_name(path: Path, fmt: str) -> None:
    """Refuse a single-file export (``fmt``: "pt2", "torchscript") whose name would not load back as it is: ASFDA
    reads a ``.pt2`` file as a ``torch.export`` program by its suffix (TorchScript by its content, under any name)."""
    if fmt == "pt2" and path.suffix.lower() != ".pt2":
        raise ModelError(f"{path}: a torch.export program is loaded by its .pt2 suffix; name the file *.pt2")
    if fmt == "torchscript" and path.suffix.lower() == ".pt2":
        raise ModelError(
            f"{path}: a .pt2 file is loaded as a torch.export program, so TorchScript named so would not load back; "
            "name the file *.ts"
        )


def staged_program(path: Path) -> Path:
    """Where a single-file export (TorchScript, ``torch.export``) is written whole before its card: hidden beside
    ``path`` (``.<name>.partial``), which it becomes last. A run stopped after its card (Ctrl-C, a kill) leaves the
    card beside this file, never beside the model file: a rerun knows that card as its own, and completes it."""
    return path.with_name(f".{path.name}.partial")


def _remove_killed_writes(path: Path) -> None:
    """The scratch files a single-file export killed mid-write left (of its staged program, of its card): the rerun's
    own outputs, so nobody else's."""
    for written in (staged_program(path), card_beside(path)):
        remove_scratch(written)


def _card_then_program(staged: Path, path: Path, card: dict[str, Any]) -> Path:
    """The card beside ``path``, then the program written whole to ``staged`` (:func:`staged_program`) moved to
    ``path``: the model file appears only with its card, and a file at ``path`` is never one this export left
    part-done (a rerun refuses it as finished, or as the user's)."""
    atomic_write_json(card_beside(path), card)
    os.replace(staged, path)
    return path


def export_torchscript(model: LoadedModel, path: Path, record: dict[str, Any] | None = None) -> Path:
    """``model.ts`` (scripted, or traced when scripting fails; the metadata inside it as ``metadata.json``, which
    ``torch.jit.load(path, _extra_files={"metadata.json": ""})`` reads) plus ``model.card.json`` beside it."""
    path = Path(path)
    _refuse_program_name(path, "torchscript")
    _refuse_overwriting_the_base(model, [path, card_beside(path)])
    _remove_killed_writes(path)
    network = model.network.cpu().eval()
    try:
        scripted = torch.jit.script(network)
    except Exception:  # noqa: BLE001 - some MONAI networks only trace
        scripted = torch.jit.trace(network, torch.zeros(1, 1, *model.card.roi_size))
    metadata = json.dumps(bundle_metadata(model.card, "0.1.0", record), indent=2)
    staged = atomic_write(
        staged_program(path), lambda tmp: scripted.save(str(tmp), _extra_files={"metadata.json": metadata})
    )
    return _card_then_program(staged, path, _exported_card(model.card, record, program=True))


def _exported_card(card: ModelCard, record: dict[str, Any] | None, program: bool = False) -> dict:
    """The card of the exported model: its head is the target's now, so the pre-trained head's
    ``source_classes`` no longer describe it (kept, they would re-map the adapted head when loaded). A program
    (TorchScript, torch.export) has no layer to tap, so source statistics cannot serve it: its card names none
    (a bundle's copies them beside it)."""
    data = card.to_dict()
    data["description"] = exported_description(card, record)
    data.pop("source_classes", None)
    if program:
        data.pop("source_stats", None)
    return data


def export_pt2(model: LoadedModel, path: Path, record: dict[str, Any] | None = None) -> Path:
    """``model.pt2`` (a ``torch.export`` program for (batch, 1, *roi) windows, the metadata inside it) plus
    ``model.card.json`` beside it; ``asfda`` loads it back with ``--trust`` (see :mod:`ASFDALib.models.program`)."""
    from ASFDALib.models.program import export_program

    path = Path(path)
    _refuse_program_name(path, "pt2")
    _refuse_overwriting_the_base(model, [path, card_beside(path)])
    _remove_killed_writes(path)
    metadata = bundle_metadata(model.card, "0.1.0", record)
    staged = export_program(model.network, model.card.roi_size, staged_program(path), metadata)
    return _card_then_program(staged, path, _exported_card(model.card, record, program=True))


def bundle_refusal(what: str, kind: str, network: str | None, cli: bool = True) -> str:
    """Why a MONAI bundle cannot carry the model ``what`` names (as the user knows it: the session's fine-tuned
    model, a file) and the formats that can, in a line; "" where a bundle can (:func:`formats_without_bundle`).
    ``cli``: the formats as ``--format`` options, else by name as the panel lists them."""
    formats = formats_without_bundle(kind, network)
    if not formats:
        return ""
    if network is not None:
        # a bundle's network_def is built by MONAI's runner, which has no such class (and ASFDA reads back only
        # MONAI networks without --trust): the programs carry the network with them
        why = f"a {network} (ASFDA's rebuild of an nnU-Net network), which MONAI's bundle runner cannot build"
    else:
        program = "TorchScript model" if kind == "torchscript" else "torch.export program"
        why = f"a {program}, with no MONAI network by name"
    first, *others = (f"--format {f}" if cli else f for f in formats)
    how = f"with {first}" if cli else f"as {first}"
    return f"{what} is {why}, so it cannot be a MONAI bundle; export it {how}" + "".join(f" (or {o})" for o in others)


def export_session(session: Any, model: LoadedModel, out: Path, fmt: str = "bundle") -> Path:
    """Export the session's model (``model``, usually its adapted one) in ``fmt``, with its provenance. Checks
    nothing of the session's: :func:`export_session_model` is the export with every check."""
    out = Path(out)
    record = provenance(session, model)
    if fmt == "bundle":
        return export_bundle(model, out, record=record)
    target = program_file(out, fmt)
    if fmt == "pt2":
        return export_pt2(model, target, record)
    if fmt == "torchscript":
        return export_torchscript(model, target, record)
    raise ModelError(f"export format {fmt!r} unknown; use one of {', '.join(FORMATS)}")


# --- a session's export, every check first: asfda export and the panel's Export ------------------------------


@dataclass(frozen=True)
class Exported:
    """What an export wrote: ``path`` (the bundle's folder, or the program's file, its card beside it), and the
    line that names what it wrote, which model it holds and how to load it back."""

    path: Path
    message: str


def _which(session: Any, source_model: bool) -> str:
    """The model an export of the session holds, as the user knows it."""
    latest = None if source_model else session.adapted_round()
    return f"round {latest['index']}'s fine-tuned model ({latest['checkpoint']})" if latest else "the source model"


def _refuse_unadapted(session: Any, name: str, cli: bool) -> None:
    """A session whose fine-tuned model is not there to export: why, and the way on (to finish its run, to wait
    for it, to fine-tune; where the command has ``--source-model``, to export the model as it came)."""
    from ASFDALib.adaptation.runs import finish_hint, handover_pending, newest_run, unfinished_run

    if handover_pending(session, newest_run(session)):  # its record is not its model's
        raise ASFDAError(f"{name}: {unfinished_run(session)}; {finish_hint(session, name, cli)}, then export")
    if session.adapted_checkpoint() is not None:
        return
    source = ", or pass --source-model to export the model as it came" if cli else ""
    if holder := session.in_use():  # a first fine-tune is running: its model comes when it ends
        raise ASFDAError(
            f"{name}: not fine-tuned yet, and in use by {holder} (a fine-tune running?); export when it ends{source}"
        )
    if unfinished := unfinished_run(session):  # a first fine-tune interrupted: finishing it is the way on
        raise ASFDAError(f"{name}: not fine-tuned yet: {unfinished}; {finish_hint(session, name, cli)}{source}")
    way = f"run 'asfda finetune {as_arg(name)}' first" if cli else "fine-tune it first"
    raise ASFDAError(f"{name}: not fine-tuned yet, so there is no adapted model to export; {way}{source}")


def _refuse_target(session: Any, out: Path, fmt: str, cli: bool) -> None:
    """Refuse where the export goes (``out``, or for a program given a folder, its default name there) if it would
    write over an export, a file the session references or a card of another model, or into the session or among
    its scans. A program's card left by an export stopped before its model moved in is its own: not refused (the
    export completes it)."""
    protected = session_files(session) | {session.root / SESSION_FILE}
    fix = "choose a new folder for the export"
    option = "--out " if cli else ""
    if fmt == "bundle":
        refuse_folder_holding(out, protected, "a file the session references", fix)
        refuse_existing(out, "a folder with files in it", fix)
        target = out
    else:
        target = program_file(out, fmt)
        _refuse_program_name(target, fmt)
        # a folder given: name a file the next export there can take (model.ts and model.pt2 share model.card.json)
        name = "" if out.suffix else f", e.g. {option}{as_arg(target.with_name('model2' + target.suffix))}"
        refuse_overwrite([target], protected, "a file the session references", fix)
        refuse_existing(target, "the file", f"choose a new file name{name}")
        if not staged_program(target).is_file():  # else the card is an export's stopped before its model moved in
            card = card_beside(target)
            # a model of another format beside it, named alike (m.pt2 beside m.ts): the card is named by the stem
            twins = sorted(p.name for p in card.parent.glob(f"{glob.escape(target.stem)}.*") if p != card)
            shared = f" (it is {twins[0]}'s: a card is named by the file's stem)" if twins else ""
            if twins and not name:
                other = target.with_name(f"{target.stem}_{target.suffix[1:]}{target.suffix}")
                name = f", e.g. {option}{as_arg(other)}"
            refuse_existing(card, f"the card written beside the export{shared}", f"choose a new file name{name}")
    refuse_inside_session(target, fix)
    # a model among the scans (anywhere under them where the pool is searched recursively)
    pool = session.data.get("images") or {}
    if pool:
        root, where = session.image_root.resolve(), Path(target).resolve()
        if where.parent == root or (pool.get("recursive") and where.is_relative_to(root)):
            raise ASFDAError(f"{target}: is inside the session's images folder {root}; {fix} outside it")


def load_back(fmt: str, path: Path, cli: bool = True) -> str:
    """How the exported model is loaded back into ASFDA: a program only with trust (it runs code stored in it)."""
    if fmt == "bundle":
        if cli:
            return (
                f"Load it back with asfda rank --model {as_arg(path)} --images SCANS --out NEW_SESSION; MONAI's "
                "bundle runner runs it (asfda export --help)"
            )
        return "Load it back as the Setup's model; MONAI Label and MONAI's bundle runner run it too"
    if cli:
        return (
            f"Load it back with asfda rank --model {as_arg(path)} --trust --images SCANS --out NEW_SESSION (it runs "
            "code stored in the file)"
        )
    return "Load it back as the Setup's model with Trust this file ticked (it runs code stored in the file)"


def export_session_model(
    session: Any,
    out: Path,
    fmt: str | None = None,
    *,
    source_model: bool = False,
    name: str | Path | None = None,
    cli: bool = True,
) -> Exported:
    """Export the session's fine-tuned model (``source_model``: the model as it came) in ``fmt`` (None: the one
    ``out``'s suffix names, ``.pt2`` or ``.ts``, else the session's own,
    :func:`ASFDALib.models.formats.session_format`) to ``out`` (a new or empty folder for a bundle; a new file for a
    program, or a folder for its default name), after every check, before the model loads: never over an
    existing export, a file the session references, the base model or its card, nor into the session or among its
    scans; a session whose fine-tuned model is not there (never fine-tuned, a first fine-tune running or
    interrupted, a finished one not recorded yet) is refused, naming the way on; and so is a bundle of a model that
    a bundle cannot carry, naming the formats that can. The command and the panel both export through this.
    ``name``: the session as the user gave it, for the messages; ``cli``: the messages name ``asfda export``'s
    options and ``asfda finetune``'s commands (the panel has neither: they name its buttons)."""
    from ASFDALib.adaptation.pipeline import session_model
    from ASFDALib.adaptation.runs import unfinished_run

    recorded = session.data.get("model")
    fmt = fmt or format_named_by(Path(out)) or session_format(recorded)  # m.pt2 is no bundle folder's name
    if fmt not in FORMATS:
        raise ModelError(f"export format {fmt!r} unknown; use one of {', '.join(FORMATS)}")
    name = str(name or session.root)
    out = Path(out)
    if not source_model:
        _refuse_unadapted(session, name, cli)
    which = _which(session, source_model)
    if fmt == "bundle" and recorded:  # known from what session.json records: said before the model loads
        if refusal := bundle_refusal(f"{name}: {which}", *recorded_network(recorded), cli=cli):
            raise ModelError(refusal)
    _refuse_target(session, out, fmt, cli)
    if not source_model and (unfinished := unfinished_run(session)):  # its weights are the model as it finished
        which += f"; {unfinished}, so this is the model as it finished before"
    model = session_model(session, adapted=not source_model)
    path = export_session(session, model, out, fmt)
    card = "" if fmt == "bundle" else f", its card to {card_beside(path)}"
    left = ""
    if fmt != "bundle" and model.card.source_stats:  # _exported_card drops them: a program has no layer to tap
        keep = "" if formats_without_bundle(*recorded_network(recorded or {})) else "; a bundle keeps them"
        left = (
            ". Its source statistics stay behind (a program has no layer to tap), so a session started from it ranks "
            f"the knowledge gap by the head's free energy{keep}"
        )
    return Exported(path, f"Exported {fmt} to {path}{card}: {which}. {load_back(fmt, path, cli)}{left}")
