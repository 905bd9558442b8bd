"""nnssl self-supervised pre-training checkpoints (github.com/MIC-DKFZ/nnssl; the OpenMind benchmark's published
ResEnc-L encoders) as a segmentation network for the card's classes: the network the checkpoint describes, its
pre-trained stem and encoder, a new decoder and head.

nnssl's trainer saves (``AbstractBaseTrainer.save_checkpoint``; Hugging Face repositories ship it as
``checkpoint_final.pth`` beside ``adaptation_plan.json``) ``{"network_weights": the pretext network's state dict,
"nnssl_adaptation_plan": {...}, "optimizer_state", "init_args", "trainer_name", ...}``. Some trainers (SparkTrainer)
save no plan in it: their plan is the ``adaptation_plan.json`` the trainer writes in its output folder (above
``fold_N``) from the start, read here beside the checkpoint or in the folder above; where neither holds one, nnssl's
``add_adaptation_plan`` adds it. The adaptation plan (``adaptation_planning/adaptation_plan.py``; the JSON file is
its ``serialize()``, with ``trainer_name`` where ``add_adaptation_plan`` wrote it) holds:

- ``architecture_plans``: ``arch_class_name`` ``ResEncL`` or ``NoSkipResEncL`` (nnssl's fixed ResEnc-L, of one
  encoder, ``arch_kwargs`` null: see :data:`PRESETS`), ``ResidualEncoderUNet`` or ``PlainConvUNet`` with nnU-Net's
  ``arch_kwargs``, or ``PrimusS/B/M/L`` (transformers); ResEnc-L and ResidualEncoderUNet are built here as
  :class:`ASFDALib.models.resenc.ResidualEncoderUNet`, the others are refused naming the way round;
- ``key_to_stem`` / ``key_to_encoder``: where the stem and the encoder's stages are in ``network_weights``
  (``encoder.stem``, ``encoder.stages``, under nnU-Net's module names whichever pretext network holds the encoder:
  MAE's whole U-Net with its reconstruction decoder, VoCo's and SimCLR's projector, SwinUNETR's pretext heads);
- ``pretrain_plan``: nnssl's plans, with ``transpose_forward`` and one configuration's ``spacing``,
  ``normalization_schemes`` and ``use_mask_for_norm``; ``recommended_downstream_patchsize``;
  ``pretrain_num_input_channels``.

What loads follows nnssl's segmentation adaptation (its nnU-Net fork's
``PretrainedTrainer.load_pretrained_weights``): the tensors under ``key_to_stem`` and ``key_to_encoder``, into the
segmentation network's stem and stages; its decoder and head start anew, even where the pretext network had a
decoder of the same shape (MAE's, trained to reconstruct intensities). The checkpoint's other tensors are
ignored and named. Axes as for nnU-Net's models (:func:`ASFDALib.models.nnunet.ras_axes`): kernels permuted from
nnssl's array order to RAS, exact for RAS-stored pre-training images.

The checkpoint names no classes: the card gives them. Spacing, window and intensity come from the pre-training
plan (its spacing, the recommended downstream patch, its normalisation) where the card leaves them out.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ASFDALib.errors import ModelError
from ASFDALib.models.card import ModelCard, NetworkSpec, card_from_dict
from ASFDALib.models.nnunet import (
    RESENC_L,
    intensity_of,
    kernel_order,
    normalisation_scheme,
    plans_architecture,
    ras_axes,
    refuse_unbuildable,
    resenc_spec,
)

PLAN_KEY = "nnssl_adaptation_plan"
PLAN_FILE = "adaptation_plan.json"
# an init argument of nnssl's trainers alone (AbstractBaseTrainer's pretrain_json; nnU-Net's trainer has
# dataset_json): every nnssl checkpoint's init_args name it, with or without the plan
TRAINER_MARK = "pretrain_json"
# the presets nnssl names without arch_kwargs, as nnU-Net's plans' arch_kwargs: NoSkipResEncL (PCLRv2's pretext
# network) has ResEnc-L's encoder, and only its decoder, which starts anew here, lacks the skips
PRESETS = {"ResEncL": RESENC_L, "NoSkipResEncL": RESENC_L}
# the rebuild's own stem and stages, where nnssl's adaptation loads the checkpoint's (dynamic_network_architectures'
# ResidualEncoderUNet names them so: its key_to_stem and key_to_encoder)
STEM, STAGES = "encoder.stem", "encoder.stages"


@dataclass
class NnsslModel:
    """What an nnssl checkpoint gives: the network for the card's classes, the card, the stem and encoder tensors
    under the network's names, the checkpoint tensors not loaded, and the mapping in words for the report."""

    spec: NetworkSpec
    card: ModelCard
    state: dict[str, torch.Tensor]
    ignored: list[str]
    note: str
    plan_file: Path | None = None  # the adaptation_plan.json read, where the checkpoint holds no plan


def is_nnssl_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a ``torch.save`` archive of nnssl's trainer: its pickle holds the adaptation plan, or the
    init arguments only nnssl's trainers save (:data:`TRAINER_MARK`; the plan may then lie beside it). Only the
    archive's pickle is read (tensors lie in entries of their own), so other checkpoints are not loaded twice."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            pickle = next((n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")), None)
            held = archive.read(pickle) if pickle is not None else b""
            return PLAN_KEY.encode() in held or TRAINER_MARK.encode() in held
    except (OSError, zipfile.BadZipFile):  # unreadable: the weights reader says why
        return False


def plan_file_of(path: Path) -> Path | None:
    """The ``adaptation_plan.json`` of checkpoint ``path``: beside it (a Hugging Face repository), else in the
    folder above (nnssl's trainer output, ``fold_N`` below it); None where neither holds one."""
    return next((f / PLAN_FILE for f in (path.parent, path.parent.parent) if (f / PLAN_FILE).is_file()), None)


def _adaptation_plan(path: Path, checkpoint: Mapping[str, Any]) -> tuple[Any, Path | None]:
    """The checkpoint's adaptation plan, else its :func:`plan_file_of`'s (with that file); refused naming nnssl's
    way to add one where neither exists."""
    if PLAN_KEY in checkpoint:
        return checkpoint[PLAN_KEY], None
    file = plan_file_of(path)
    if file is None:
        trainer = checkpoint.get("trainer_name") or "nnssl's trainer"
        raise ModelError(
            f"{path}: an nnssl pre-training checkpoint ({trainer}) that holds no adaptation plan, and no {PLAN_FILE} "
            f"lies beside it or in the folder above; copy its training output's {PLAN_FILE} beside it, or add the plan "
            "to it with nnssl's add_adaptation_plan (nnssl/utilities/add_adaptation_plan.py)"
        )
    try:
        return json.loads(file.read_text(encoding="utf-8")), file
    except (OSError, ValueError) as exc:
        raise ModelError(f"{file}: cannot read it as nnssl's adaptation plan ({exc})") from None


def read_nnssl(path: Path, checkpoint: Any, given: Mapping[str, Any], card_source: str) -> NnsslModel:
    """The network, card and weights of an nnssl checkpoint (``checkpoint``: the loaded object). ``given``: the
    card's keys as written (``card_source`` names where), which win over what the pre-training plan records."""
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, Mapping) else None
    if not isinstance(weights, Mapping):
        raise ModelError(f"{path}: no network_weights in it (nnssl's trainer saves them)")
    plan, plan_file = _adaptation_plan(path, checkpoint)
    if not isinstance(plan, Mapping):
        raise ModelError(f"{plan_file or path}: its nnssl adaptation plan is no mapping of the plan's keys")
    try:  # a plan of another nnssl version, or edited by hand: one line, not a traceback
        name, arch = _architecture(path, plan)
        pretrain = plan.get("pretrain_plan") or {}
        axes = ras_axes(pretrain.get("transpose_forward") or [0, 1, 2])
        config = next(iter((pretrain.get("configurations") or {}).values()), {})
        channels = int(plan.get("pretrain_num_input_channels") or 1)
        recorded = _recorded_input(plan, config, axes)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"{path}: cannot read its nnssl adaptation plan ({exc!r})") from None
    if channels != 1:
        raise ModelError(
            f"{path}: the encoder was pre-trained on {channels} input channels; ASFDA feeds one scan per volume"
        )
    card = _card(path, name, checkpoint, config, recorded, given, card_source)
    state, ignored, keys = _encoder_state(path, weights, plan, axes)
    trainer = checkpoint.get("trainer_name") or "nnssl"
    note = (
        f"from nnssl's {name} pre-training ({trainer}): its stem and encoder ({keys}) into ASFDA's "
        "ResidualEncoderUNet (kernels in RAS axis order, as for RAS-stored images); decoder and head new, as nnssl's "
        "segmentation adaptation starts them"
    )
    return NnsslModel(resenc_spec(arch, axes, card.num_classes), card, state, ignored, note, plan_file)


def _architecture(path: Path, plan: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The architecture's name and its stages as :func:`~ASFDALib.models.nnunet.plans_architecture` reads them;
    one ASFDA does not build is refused naming the way round."""
    plans = plan["architecture_plans"]
    name = str(plans.get("arch_class_name")).rsplit(".", 1)[-1]
    if name not in (*PRESETS, "ResidualEncoderUNet"):
        transformer = name.startswith("Primus")
        kind = " (a transformer)" if transformer else ""
        way = (
            "use the ResEnc-L checkpoint of the same pre-training (the OpenMind benchmark publishes both), or "
            "fine-tune this one with nnssl's segmentation adaptation (its nnU-Net fork) and load that network traced "
            "to TorchScript with --card and --trust"
            if transformer
            else "fine-tune it with nnssl's segmentation adaptation (its nnU-Net fork) and load that network traced to "
            "TorchScript with --card and --trust"
        )
        raise ModelError(
            f"{path}: an nnssl pre-training checkpoint of {name}{kind}, which ASFDA does not build (it builds nnssl's "
            f"ResEnc-L, NoSkipResEncL and ResidualEncoderUNet encoders); {way}"
        )
    kwargs = PRESETS.get(name) or plans["arch_kwargs"]
    if not isinstance(kwargs, Mapping):
        raise ModelError(
            f"{path}: its nnssl adaptation plan names {name} without arch_kwargs (its stages, features and kernels), "
            f"which only nnssl's presets ({', '.join(PRESETS)}) go without"
        )
    config = {"architecture": {"network_class_name": "ResidualEncoderUNet", "arch_kwargs": kwargs}}
    arch = plans_architecture(config, path, "this nnssl pre-training checkpoint", "its adaptation plan's arch_kwargs")
    refuse_unbuildable(arch, path, "this nnssl pre-training checkpoint")
    return name, arch


def _recorded_input(plan: Mapping[str, Any], config: Mapping[str, Any], axes: list[int]) -> dict[str, Any]:
    """The card keys the pre-training plan records, in RAS axis order: its spacing (none for nnssl's
    ``noresample``), the downstream patch it recommends (else its own), its normalisation where a card has it."""
    recorded: dict[str, Any] = {}
    if config.get("spacing") is not None:
        recorded["spacing"] = [float(config["spacing"][a]) for a in axes]
    patch = plan.get("recommended_downstream_patchsize") or config.get("patch_size")
    if patch is not None:
        recorded["roi_size"] = [int(patch[a]) for a in axes]
    # nnssl's plans keep no intensity statistics: CT normalisation has no window here
    intensity = intensity_of(normalisation_scheme(config), config, None)
    if intensity is not None:
        recorded["intensity"] = intensity.to_dict()
    return recorded


# what a card gives where the checkpoint does not, in words for the refusal
_NEEDED = {
    "class_names": "class_names (the target task's classes, background first: the checkpoint has no segmentation head)",
    "spacing": "spacing (the pre-training plan records none: nnssl's noresample)",
    "roi_size": "roi_size (the pre-training plan records no patch size)",
    "intensity": "intensity (the pre-training normalisation {scheme} has no card counterpart)",
}


def _card(
    path: Path,
    name: str,
    checkpoint: Mapping[str, Any],
    config: Mapping[str, Any],
    recorded: dict[str, Any],
    given: Mapping[str, Any],
    card_source: str,
) -> ModelCard:
    missing = [key for key in _NEEDED if key not in given and key not in recorded]
    if missing:
        needed = ", ".join(_NEEDED[k].format(scheme=normalisation_scheme(config)) for k in missing)
        raise ModelError(f"{path}: this nnssl pre-training checkpoint needs --card with {needed}")
    if given.get("network"):
        raise ModelError(
            f"{card_source}: an nnssl checkpoint's network comes from its adaptation plan; leave 'network' out of "
            "the card"
        )
    if given.get("source_classes"):  # they would pair the card's classes with head rows it does not have
        raise ModelError(
            f"{card_source}: an nnssl pre-training checkpoint has no segmentation head whose classes source_classes "
            "could name; leave 'source_classes' out of the card"
        )
    own = {
        "name": f"nnssl {name}",
        "description": f"nnssl {name} encoder pre-trained by {checkpoint.get('trainer_name') or 'nnssl'}; decoder "
        "and head new",
    }
    return card_from_dict({**own, **recorded, **given}, card_source)


def _encoder_state(
    path: Path, weights: Mapping[str, torch.Tensor], plan: Mapping[str, Any], axes: list[int]
) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """The tensors under the plan's ``key_to_stem`` and ``key_to_encoder``, under the rebuild's stem and stages,
    kernels in RAS order; the checkpoint's tensors not taken (second names of a taken tensor aside: nnU-Net's
    ``all_modules``, a decoder's copy of the encoder); the two keys, for the report. A key that names no tensor
    (a plan written for other weights) is refused naming it and what the checkpoint holds."""
    perm = kernel_order(axes)
    keys = {name: str(plan.get(name) or own) for name, own in (("key_to_stem", STEM), ("key_to_encoder", STAGES))}
    sources = {keys["key_to_stem"]: STEM, keys["key_to_encoder"]: STAGES}
    state: dict[str, torch.Tensor] = {}
    taken: set[int] = set()
    matched: set[str] = set()
    for key, tensor in weights.items():
        source = next((s for s in sources if key.startswith(s + ".")), None)
        if source is None or ".all_modules." in key or not isinstance(tensor, torch.Tensor):
            continue
        state[sources[source] + key[len(source) :]] = tensor.permute(perm).contiguous() if tensor.dim() == 5 else tensor
        taken.add(tensor.untyped_storage().data_ptr())
        matched.add(source)
    if unmatched := [f"{name} {key!r}" for name, key in keys.items() if key not in matched]:
        raise ModelError(
            f"{path}: its nnssl adaptation plan's {' and '.join(unmatched)} name{'s' * (len(unmatched) == 1)} no "
            f"tensor of its network_weights, which hold {_held(weights)}; the plan was written for other weights: give "
            "the checkpoint its own pre-training's plan"
        )
    ignored = sorted(
        key
        for key, tensor in weights.items()
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in taken
    )
    return state, ignored, ", ".join(sources)


def _held(weights: Mapping[str, Any]) -> str:
    """What a state dict holds, in words: how many tensors under each of their names' first two parts, the first
    six (``encoder.stages (120), encoder.stem (3)``)."""
    counts: dict[str, int] = {}
    for key in weights:
        prefix = ".".join(str(key).split(".")[:2])
        counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return "no tensors"
    shown = ", ".join(f"{prefix} ({n})" for prefix, n in sorted(counts.items())[:6])
    return shown + (f" and {len(counts) - 6} more" if len(counts) > 6 else "")
