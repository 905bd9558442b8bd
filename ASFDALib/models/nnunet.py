"""nnU-Net v2 training outputs (``fold_N/checkpoint_final.pth`` beside ``plans.json`` and ``dataset.json``, as
TotalSegmentator and most nnU-Net models ship) as a network built here: the spec, weights and card they describe.

nnU-Net builds a ``PlainConvUNet`` or, for its residual-encoder presets (nnUNetResEncUNetM/L/XLPlans), a
``ResidualEncoderUNet`` from its plans. A PlainConvUNet becomes MONAI's DynUNet (the network nnU-Net's design
was rebuilt in): with the plans' stages, features, kernels and strides, instance norm and leaky ReLU it computes
the same function once the weights are renamed. A ResidualEncoderUNet becomes ASFDA's own rebuild of it
(:mod:`ASFDALib.models.resenc`, no MONAI network has its blocks), which takes nnU-Net's weights under their own
names and every per-stage kernel; so does nnssl's ResEnc-L (:data:`RESENC_L`), which the plans of nnssl's nnU-Net
fork name ``ResEncL`` without arguments where they fine-tune its pre-training. The differences this module takes
care of or states:

- Axes. nnU-Net feeds the network the file's voxel array as SimpleITK reads it (slowest axis first), permuted by
  the plans' ``transpose_forward``; ASFDA feeds it in RAS order (fastest first). Every kernel, stride, the patch
  and the spacing are permuted to match, which is exact for a model trained on RAS-stored images (TotalSegmentator
  reorients to RAS before nnU-Net). A model trained on images stored otherwise sees mirrored scans: nnU-Net's
  mirroring augmentation makes most models indifferent to that, left/right classes are not.
- Biases (DynUNet). nnU-Net's convolutions carry biases, DynUNet's not: an instance norm follows every one,
  which removes a per-channel constant, so dropping a convolution's bias is exact. The transposed convolutions
  keep theirs (DynUNet's ``trans_bias``): the next convolution's zero padding would not let them cancel.
- Decoder kernels (DynUNet). DynUNet's decoder block uses the kernel of the stage below it, nnU-Net's that of its own
  stage: PlainConvUNet plans whose kernels differ by stage (anisotropic data) are refused, naming them.
- Blocks (ResidualEncoderUNet). The rebuild has nnU-Net's basic residual block, instance norm and leaky ReLU:
  plans with bottleneck blocks, other norms or activations, or dropout are refused, naming them.
- Cascades. The second stage of nnU-Net's cascade (``3d_cascade_fullres``, ``previous_stage`` in its configuration)
  takes the scan plus the first stage's segmentation as one-hot channels, which no panel or command gives it: it
  is refused, naming the first stage's model, which loads on its own.

The card comes from the plans and dataset.json: the classes (``labels``), the configuration's spacing and patch
size, and its normalisation (``CTNormalization``'s clip-then-z-score is a CT window mapped to the same values).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ASFDALib.errors import ModelError
from ASFDALib.models.card import IntensityConfig, ModelCard, NetworkSpec

PLANS = "plans.json"
DATASET = "dataset.json"
NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet")  # the nnU-Net networks a model here is built as
# nnssl's ResEnc-L (architectures/architecture_registry.get_res_enc_l), worded as nnU-Net's plans' arch_kwargs: nnssl's
# checkpoints name it "ResEncL" without arguments, and so do the plans of its nnU-Net fork's fine-tuning of them
RESENC_L = {
    "features_per_stage": [32, 64, 128, 256, 320, 320],
    "kernel_sizes": [[3, 3, 3]] * 6,
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
    "n_conv_per_stage_decoder": [1, 1, 1, 1, 1],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None,
    "nonlin": "torch.nn.modules.activation.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},  # torch's default slope, 0.01
}
PRESETS = {"ResEncL": RESENC_L}  # a ResidualEncoderUNet named by a preset's name, its arch_kwargs left out
# where a layout cannot be rebuilt here: the network runs as TorchScript made where nnU-Net runs
TRACE_HINT = (
    "trace it to TorchScript where nnU-Net runs (torch.jit.trace on a patch) and load that with --card and --trust"
)


def nnunet_plans(path: Path) -> Path | None:
    """The plans of an nnU-Net training output (``checkpoint_*.pth`` in a fold folder), or None."""
    if not (path.is_file() and path.name.startswith("checkpoint_") and path.suffix == ".pth"):
        return None
    return next((f / PLANS for f in (path.parent, path.parent.parent) if (f / PLANS).is_file()), None)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read it ({exc})") from None


def _configuration(plans: dict, name: str, plans_path: Path) -> dict:
    """The named configuration with what it inherits (nnU-Net's ``inherits_from``)."""
    configurations = plans.get("configurations", {})
    if name not in configurations:
        raise ModelError(f"{plans_path}: no configuration {name!r} (it has {', '.join(configurations) or 'none'})")
    config, seen = dict(configurations[name]), {name}
    while parent := config.pop("inherits_from", None):
        if parent in seen or parent not in configurations:
            raise ModelError(f"{plans_path}: configuration {name!r} inherits from {parent!r}, which cannot be read")
        seen.add(parent)
        config = {**configurations[parent], **config}
    return config


def plans_architecture(
    config: dict, plans_path: Path, what: str = "this nnU-Net model", plans: str = "its plans"
) -> dict[str, Any]:
    """Stages, features, kernels, strides and convolutions (residual blocks, for a residual encoder) per stage,
    from either plans format (a preset of PRESETS named without arguments: its arguments). A network other than
    those of NETWORKS, or plans that lack what it needs, are refused naming it (``what``: the model, ``plans``: where
    its architecture is written, as the refusal words them)."""
    architecture = config.get("architecture") or {}
    name = str(architecture.get("network_class_name") or config.get("UNet_class_name")).rsplit(".", 1)[-1]
    if name in PRESETS and not architecture.get("arch_kwargs"):  # the nnssl fork's plans of a preset
        config = {"architecture": {"network_class_name": "ResidualEncoderUNet", "arch_kwargs": PRESETS[name]}}
        name = "ResidualEncoderUNet"
    unbuildable = f"{plans_path}: {what} cannot be built here: its network is {name}"
    if name not in NETWORKS:
        raise ModelError(f"{unbuildable} (nnU-Net's {' and '.join(NETWORKS)} models load); {TRACE_HINT}")
    try:
        return _read_architecture(config, plans_path)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{unbuildable}, but {plans} lack {exc}") from None


def _read_architecture(config: dict, plans_path: Path) -> dict[str, Any]:
    if "architecture" in config:  # nnU-Net >= 2.4
        arch = config["architecture"]
        kwargs = arch["arch_kwargs"]
        name = arch["network_class_name"].rsplit(".", 1)[-1]
        # a residual encoder counts blocks (of two convolutions each) where a plain one counts convolutions
        encoder = kwargs["n_blocks_per_stage" if name == "ResidualEncoderUNet" else "n_conv_per_stage"]
        stages = len(kwargs["features_per_stage"])
        return {
            "class": name,
            "features": list(kwargs["features_per_stage"]),
            "kernels": [list(k) for k in kwargs["kernel_sizes"]],
            "strides": [list(s) for s in kwargs["strides"]],
            "encoder": _listed(encoder, stages),
            "decoder": _listed(kwargs["n_conv_per_stage_decoder"], stages - 1),
            "norm": kwargs.get("norm_op", ""),
            "nonlin": kwargs.get("nonlin", ""),
            "slope": (kwargs.get("nonlin_kwargs") or {}).get("negative_slope", 0.01),
            "bias": kwargs.get("conv_bias", True),
            "norm_args": kwargs.get("norm_op_kwargs") or {"eps": 1e-5, "affine": True},
            "dropout": kwargs.get("dropout_op"),
            "block": str(kwargs.get("block") or "BasicBlockD").rsplit(".", 1)[-1],
            "stem": kwargs.get("stem_channels"),
        }
    if "UNet_class_name" in config:  # the first nnU-Net v2 plans
        kernels = [list(k) for k in config["conv_kernel_sizes"]]
        base, most = config["UNet_base_num_features"], config.get("unet_max_num_features", 320)
        return {
            "class": config["UNet_class_name"],
            "features": [min(base * 2**i, most) for i in range(len(kernels))],
            "kernels": kernels,
            "strides": [list(s) for s in config["pool_op_kernel_sizes"]],
            # nnU-Net read a ResidualEncoderUNet's blocks per stage from n_conv_per_stage_encoder then
            "encoder": list(config["n_conv_per_stage_encoder"]),
            "decoder": list(config["n_conv_per_stage_decoder"]),
            "norm": "InstanceNorm",
            "nonlin": "LeakyReLU",
            "slope": 0.01,
            "bias": True,
            "norm_args": {"eps": 1e-5, "affine": True},
            "dropout": None,
            "block": "BasicBlockD",
            "stem": None,
        }
    raise ModelError(f"{plans_path}: no network architecture in the configuration (an nnU-Net v2 plans file?)")


def _listed(value: int | list[int], count: int) -> list[int]:
    """A per-stage count as a list: nnU-Net takes one number for every stage too."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def refuse_unbuildable(arch: dict, where: Path, what: str = "this nnU-Net model") -> None:
    """Refuses, naming why and the way round, an architecture (``plans_architecture``'s dict) the rebuilds lack."""
    why = []
    # only what differs from what the rebuilds have (instance norm, leaky ReLU)
    if "InstanceNorm" not in str(arch["norm"]):
        why.append(f"it normalises with {arch['norm']} (the rebuild's norm is instance norm)")
    if "LeakyReLU" not in str(arch["nonlin"]):
        why.append(f"it activates with {arch['nonlin']} (the rebuild's is leaky ReLU)")
    if arch["class"] == "ResidualEncoderUNet":
        if arch["block"] != "BasicBlockD":
            why.append(f"its residual blocks are {arch['block']} (nnU-Net's presets' BasicBlockD are rebuilt)")
        if arch["dropout"]:  # inference would agree, fine-tuning not: the rebuild has no dropout to train with
            why.append(f"it trains with dropout ({arch['dropout']})")
        if any(len(k) != 3 for k in arch["kernels"]):
            why.append(f"its kernels are not 3D ({arch['kernels']})")
        if why:
            raise ModelError(
                f"{where}: {what} cannot be built as ASFDA's ResidualEncoderUNet: {'; '.join(why)}; " + TRACE_HINT
            )
        return
    convs = [*arch["encoder"], *arch["decoder"]]
    if any(n != 2 for n in convs):
        why.append(f"its stages have {sorted(set(convs))} convolutions (DynUNet's have 2)")
    if not arch["bias"] or not arch["norm_args"].get("affine", False):  # DynUNet's transposed bias, affine norms
        why.append(f"its convolutions have conv_bias {arch['bias']} and norms affine {arch['norm_args'].get('affine')}")
    if any(k != arch["kernels"][0] for k in arch["kernels"]) or len(arch["kernels"][0]) != 3:
        why.append(f"its kernels differ by stage or are not 3D ({arch['kernels']}; DynUNet's decoder needs them alike)")
    if why:
        raise ModelError(f"{where}: {what} cannot be built as MONAI's DynUNet: {'; '.join(why)}")


def _classes(dataset: dict, where: Path) -> list[str]:
    """dataset.json's classes in the order of their values, background first; refused where a label names several
    values (nnU-Net's region-based training: overlapping regions, not one class per voxel) or the values are not
    0..n-1."""
    # an "ignore" label (sparse annotation; nnU-Net makes it the highest value) is no output channel
    labels = {k: v for k, v in dataset.get("labels", {}).items() if k != "ignore"}
    if not labels or any(not isinstance(v, int) for v in labels.values()):
        raise ModelError(f"{where}: dataset.json's labels are not one value per class (region-based training?)")
    by_value = sorted(labels.items(), key=lambda kv: kv[1])
    if [v for _, v in by_value] != list(range(len(by_value))):
        raise ModelError(f"{where}: dataset.json's label values are not 0..{len(by_value) - 1}")
    return [k for k, _ in by_value]


def _card(plans: dict, config: dict, dataset: dict, name: str, axes: list[int], where: Path) -> ModelCard:
    classes = _classes(dataset, where)
    channels = dataset.get("channel_names") or dataset.get("modality") or {"0": ""}
    if len(channels) != 1:
        raise ModelError(f"{where}: the model takes {len(channels)} channels ({channels}); ASFDA gives it one scan")
    scheme = normalisation_scheme(config)
    intensity = intensity_of(scheme, config, plans.get("foreground_intensity_properties_per_channel"))
    if intensity is None:
        raise ModelError(f"{where}: normalisation {scheme} has no counterpart in a model card")
    return ModelCard(
        class_names=classes,
        spacing=tuple(float(config["spacing"][a]) for a in axes),
        roi_size=tuple(int(config["patch_size"][a]) for a in axes),
        intensity=intensity,
        name=f"{plans.get('dataset_name', 'nnU-Net')} {name}",
        description=f"nnU-Net model of {plans.get('dataset_name', 'its dataset')}, configuration {name}",
        source_classes=list(classes),
    )


def normalisation_scheme(config: dict) -> str:
    """The first channel's normalisation of an nnU-Net (or nnssl) configuration; nnU-Net's default where none."""
    return str((config.get("normalization_schemes") or ["ZScoreNormalization"])[0])


def intensity_of(scheme: str, config: dict, properties: dict | None) -> IntensityConfig | None:
    """nnU-Net's (and nnssl's) normalisation ``scheme`` of a configuration as a card's intensity, or None where no
    card setting is it (CT normalisation without the plans' foreground intensity ``properties``, say)."""
    if scheme == "CTNormalization" and properties:  # clip to the 0.5..99.5 percentiles, then z-score: a CT window
        props = properties["0"]
        low, high, mean, std = (float(props[k]) for k in ("percentile_00_5", "percentile_99_5", "mean", "std"))
        std = max(std, 1e-8)
        return IntensityConfig("ct", a_min=low, a_max=high, b_min=(low - mean) / std, b_max=(high - mean) / std)
    if scheme == "ZScoreNormalization":  # over the non-zero voxels where the plans mask (use_mask_for_norm), or
        # every voxel (nnU-Net's, of the scan cropped to its non-zero box: outer zero padding aside, the same)
        return IntensityConfig("zscore", nonzero=bool((config.get("use_mask_for_norm") or [False])[0]))
    if scheme in ("RescaleTo01Normalization", "RescaleTo01"):  # nnssl's name for it is the shorter
        return IntensityConfig("percentile", lower=0.0, upper=100.0)
    if scheme == "NoNormalization":
        return IntensityConfig("none")
    return None


def ras_axes(transpose_forward: list[int]) -> list[int]:
    """For each RAS axis, the network axis of nnU-Net's array that holds it: the array is the file's, slowest
    axis first (S, A, R for a RAS-stored image), then permuted by ``transpose_forward``."""
    return [list(transpose_forward).index(2 - axis) for axis in range(3)]


def read_nnunet(
    path: Path, plans_path: Path, weights: Any
) -> tuple[NetworkSpec, ModelCard, dict[str, torch.Tensor], str]:
    """The network spec (DynUNet or ResidualEncoderUNet), the card, the weights under the network's names of an
    nnU-Net training output (``weights``: the loaded checkpoint) and what the conversion did, in words for the
    loading report."""
    if not isinstance(weights, dict) or "network_weights" not in weights:
        raise ModelError(f"{path}: no network_weights in it (an nnU-Net v2 checkpoint holds them)")
    init = weights.get("init_args") or {}
    # as nnU-Net's own predictor: the model folder's plans and dataset.json, the checkpoint's copies otherwise
    plans = _read_json(plans_path)
    dataset_path = plans_path.with_name(DATASET)
    dataset = _read_json(dataset_path) if dataset_path.is_file() else init.get("dataset_json") or {}
    # the fold folder's parent is Trainer__Plans__configuration
    name = init.get("configuration") or path.parent.parent.name.rsplit("__", 1)[-1]
    config = _configuration(plans, name, plans_path)
    where = dataset_path if dataset else plans_path
    if previous := config.get("previous_stage"):  # its one-hot channels are one per class: read them first
        raise ModelError(_cascade_refusal(path, name, previous, _classes(dataset, where)))
    arch = plans_architecture(config, plans_path)
    refuse_unbuildable(arch, plans_path)
    try:  # a plans file edited by hand, or of a version that words them otherwise: one line, not a traceback
        axes = ras_axes(plans.get("transpose_forward", [0, 1, 2]))
        card = _card(plans, config, dataset, name, axes, where)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ModelError(f"{plans_path}: cannot read the model's {name} configuration from it ({exc!r})") from None
    stages = len(arch["features"])
    if arch["class"] == "ResidualEncoderUNet":
        spec = resenc_spec(arch, axes, len(card.class_names))
        return spec, card, resenc_state(weights["network_weights"], stages, axes), RESENC_NOTE
    kernels = [[k[a] for a in axes] for k in arch["kernels"]]
    strides = [[s[a] for a in axes] for s in arch["strides"]]
    spec = NetworkSpec(
        "DynUNet",
        {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": len(card.class_names),
            "kernel_size": kernels,
            "strides": strides,
            "upsample_kernel_size": strides[1:],
            "filters": arch["features"],
            "norm_name": ["INSTANCE", {"affine": True, "eps": float(arch["norm_args"].get("eps", 1e-5))}],
            "act_name": ["leakyrelu", {"negative_slope": arch["slope"], "inplace": True}],
            "trans_bias": True,
        },
    )
    return spec, card, dynunet_state(weights["network_weights"], stages, axes), CONVERTED_NOTE


def _cascade_refusal(path: Path, name: str, previous: str, classes: list[str]) -> str:
    """Why the second stage of nnU-Net's cascade does not load, and the stand-alone model of the same training."""
    # nnU-Net's determine_num_input_channels: the scan's channels, then one per foreground label
    labels = classes[1:]
    folder = path.parent.parent
    first = folder.with_name(folder.name.rsplit("__", 1)[0] + f"__{previous}") / path.parent.name / path.name
    return (
        f"{path}: this nnU-Net model is the second stage of a cascade (configuration {name}, previous_stage "
        f"{previous}): its network takes the scan plus the {previous} model's segmentation as {len(labels)} one-hot "
        f"channels, which ASFDA cannot give it (it feeds one scan per volume, from the panel or the command line); "
        f"load the {previous} model of the same training ({first}), or a 3d_fullres one"
    )


def resenc_spec(arch: dict[str, Any], axes: list[int], num_classes: int) -> NetworkSpec:
    """ASFDA's ResidualEncoderUNet for an architecture as ``plans_architecture`` reads it, kernels and strides in RAS
    axis order (``axes``: :func:`ras_axes`), one input channel, ``num_classes`` outputs."""
    args = {
        "in_channels": 1,
        "out_channels": num_classes,
        "features_per_stage": arch["features"],
        "kernel_sizes": [[k[a] for a in axes] for k in arch["kernels"]],
        "strides": [[s[a] for a in axes] for s in arch["strides"]],
        "n_blocks_per_stage": arch["encoder"],
        "n_conv_per_stage_decoder": arch["decoder"],
        "conv_bias": bool(arch["bias"]),
        "norm_eps": float(arch["norm_args"].get("eps", 1e-5)),
        "norm_affine": bool(arch["norm_args"].get("affine", False)),  # torch's InstanceNorm3d default
        "negative_slope": float(arch["slope"]),
    } | ({"stem_channels": int(arch["stem"])} if arch["stem"] else {})
    return NetworkSpec("ResidualEncoderUNet", args)


def kernel_order(axes: list[int]) -> list[int]:
    """The permutation of a 3D convolution's weight (out, in, *kernel; in, out, *kernel transposed) that puts its
    kernel in RAS axis order."""
    return [0, 1, *(2 + a for a in axes)]


def resenc_state(state: dict[str, torch.Tensor], stages: int, axes: list[int]) -> dict[str, torch.Tensor]:
    """nnU-Net's ResidualEncoderUNet weights for :class:`ASFDALib.models.resenc.ResidualEncoderUNet`, which
    names its modules as nnU-Net does, kernels permuted to RAS axis order. Left out: the second name nnU-Net
    registers every convolution and norm under (``all_modules``), the decoder's copy of the encoder, and the
    deep-supervision heads of the lower resolutions; the full-resolution one is ``decoder.head``."""
    perm = kernel_order(axes)
    head = f"decoder.seg_layers.{stages - 2}."
    if head + "weight" not in state:
        raise ModelError(f"nnU-Net weights lack {head}weight: not a ResidualEncoderUNet of these plans")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".all_modules." in name or name.startswith("decoder.encoder."):
            continue
        if name.startswith("decoder.seg_layers."):
            if not name.startswith(head):
                continue
            name = "decoder.head." + name.removeprefix(head)
        out[name] = tensor.permute(perm).contiguous() if tensor.dim() == 5 else tensor
    return out


def dynunet_state(state: dict[str, torch.Tensor], stages: int, axes: list[int]) -> dict[str, torch.Tensor]:
    """nnU-Net's PlainConvUNet weights under DynUNet's names, kernels permuted to RAS axis order. Left out:
    convolution biases (an instance norm follows each), the deep-supervision heads of the lower resolutions, and
    the decoder's copy of the encoder."""
    perm = kernel_order(axes)

    def block(source: str, target: str) -> dict[str, torch.Tensor]:
        out = {}
        for k in range(2):
            conv = f"{source}.convs.{k}"
            out[f"{target}.conv{k + 1}.conv.weight"] = state[f"{conv}.conv.weight"].permute(perm).contiguous()
            out[f"{target}.norm{k + 1}.weight"] = state[f"{conv}.norm.weight"]
            out[f"{target}.norm{k + 1}.bias"] = state[f"{conv}.norm.bias"]
        return out

    try:
        out: dict[str, torch.Tensor] = {}
        for s in range(stages):
            target = "input_block" if s == 0 else "bottleneck" if s == stages - 1 else f"downsamples.{s - 1}"
            out |= block(f"encoder.stages.{s}.0", target)
        for i in range(stages - 1):
            out[f"upsamples.{i}.transp_conv.conv.weight"] = (
                state[f"decoder.transpconvs.{i}.weight"].permute(perm).contiguous()
            )
            out[f"upsamples.{i}.transp_conv.conv.bias"] = state[f"decoder.transpconvs.{i}.bias"]
            out |= block(f"decoder.stages.{i}", f"upsamples.{i}.conv_block")
        head = f"decoder.seg_layers.{stages - 2}"
        out["output_block.conv.conv.weight"] = state[f"{head}.weight"].permute(perm).contiguous()
        out["output_block.conv.conv.bias"] = state[f"{head}.bias"]
    except KeyError as exc:
        raise ModelError(f"nnU-Net weights lack {exc.args[0]}: not a PlainConvUNet of these plans") from None
    return out


RESENC_NOTE = (
    "from nnU-Net's ResidualEncoderUNet to ASFDA's rebuild of it (ASFDALib/models/resenc.py; kernels in RAS axis "
    "order, as for RAS-stored training images)"
)
CONVERTED_NOTE = (
    "from nnU-Net's PlainConvUNet to MONAI's DynUNet (kernels in RAS axis order, as for RAS-stored training images; "
    "convolution biases left out, each cancelled by the instance norm after it)"
)
