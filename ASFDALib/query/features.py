"""Feature taps and streaming feature summaries G_l(x) = {(mu_lc, var_lc)} of a volume.

Forward hooks on chosen layers (encoder stages, and the inputs of every BatchNorm) fold each window's
activations into per-channel running moments (Chan's parallel update), so the summary of a whole volume
costs one pass and a few floats per channel, never a stored activation map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.networks.layers.simplelayers import SkipConnection

from ASFDALib.atomic import atomic_write_npz
from ASFDALib.checkpoints import output_head

BN_PREFIX = "bn:"
STAGE_PREFIX = "stage:"
LOGITS = "logits"


@dataclass
class FeatureSummary:
    """Per-layer, per-channel mean and variance of a volume's (or a domain's) features."""

    layers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def embedding(self) -> np.ndarray:
        """z(x): concatenated channel means of the stage taps (all taps if none), L2-normalised."""
        names = [n for n in sorted(self.layers) if n.startswith(STAGE_PREFIX)] or sorted(self.layers)
        if not names:
            return np.zeros(1)
        z = np.concatenate([self.layers[n][0] for n in names]).astype(np.float64)
        norm = np.linalg.norm(z)
        return z / norm if norm > 0 else z

    def to_arrays(self, prefix: str = "feat/") -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, (mean, var) in self.layers.items():
            out[f"{prefix}{name}/mean"] = np.asarray(mean, dtype=np.float64)
            out[f"{prefix}{name}/var"] = np.asarray(var, dtype=np.float64)
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "feat/") -> FeatureSummary:
        layers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key in arrays:
            if key.startswith(prefix) and key.endswith("/mean"):
                name = key[len(prefix) : -len("/mean")]
                layers[name] = (np.asarray(arrays[key]), np.asarray(arrays[f"{prefix}{name}/var"]))
        return cls(layers)

    def save(self, path: Path) -> Path:
        """Write as ``.npz`` (no pickles), atomically: the source-statistics file format."""

        return atomic_write_npz(path, self.to_arrays())

    @classmethod
    def load(cls, path: Path) -> FeatureSummary:
        with np.load(path, allow_pickle=False) as data:
            return cls.from_arrays({k: data[k] for k in data.files})


def mean_summaries(summaries: list[FeatureSummary]) -> FeatureSummary:
    """Pool several volumes' summaries into one domain summary (mixture moments, equal weights)."""
    names = set.intersection(*(set(s.layers) for s in summaries))
    pooled: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in sorted(names):
        means = np.stack([s.layers[name][0] for s in summaries])
        variances = np.stack([s.layers[name][1] for s in summaries])
        mean = means.mean(axis=0)
        pooled[name] = (mean, (variances + (means - mean) ** 2).mean(axis=0))
    return FeatureSummary(pooled)


class RunningMoments:
    """Streaming per-channel count, mean and M2 over (N, C, *spatial) tensors, merged batch by batch.

    Large maps are summarised on every ``stride``-th voxel along each spatial axis: thousands of samples
    per window still pin a channel's mean and variance far below the differences DKD looks at, at a
    fraction of the cost. A stride of 3 (odd) keeps the period-2 patterns of strided and transposed
    convolutions from aliasing into the estimate.
    """

    def __init__(self, stride: int = 3, min_voxels: int = 24**3) -> None:
        self.stride = stride
        self.min_voxels = min_voxels
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.stride > 1 and x[0, 0].numel() >= self.min_voxels:
            x = x[(slice(None), slice(None), *[slice(None, None, self.stride)] * (x.ndim - 2))]
        n = x.numel() // x.shape[1]
        if n == 0:
            return
        # One copy to a contiguous (C, N) float32 block, then shifted two-pass moments on rows: several
        # times faster on CPU than reducing the strided (N, C, ...) view or than var_mean, and exact enough.
        x = x.transpose(0, 1).reshape(x.shape[1], -1).float()
        batch_mean = x.mean(dim=1, keepdim=True)
        m2 = (x - batch_mean).square_().sum(dim=1).double()
        mean = batch_mean.flatten().double()
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None:
            return np.zeros(0), np.zeros(0)
        return self.mean.cpu().numpy(), (self.m2 / max(self.count, 1)).cpu().numpy()


def pointwise_head(network: torch.nn.Module, num_classes: int) -> tuple[str, str]:
    """(name, "") of the network's output layer when it is pointwise — a 1×1×1 convolution or a Linear layer
    mapping features to the ``num_classes`` logits, so its weight rows are class prototypes in the feature
    space it reads — else ("", why not)."""
    try:
        name = output_head(network, num_classes)[0]
    except Exception as exc:  # noqa: BLE001 - no head found is a reason, not an error, here
        return "", str(exc)
    module = network.get_submodule(name)
    if isinstance(module, torch.nn.Linear):
        return name, ""
    conv = isinstance(module, torch.nn.modules.conv._ConvNd) and not module.transposed
    if conv and all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride) and module.groups == 1:
        return name, ""
    kernel = "x".join(str(k) for k in getattr(module, "kernel_size", ())) or "?"
    return "", f"the output layer {name} is a {type(module).__name__} (kernel {kernel}), not a pointwise head"


class PrototypeAlignment:
    """Streaming alignment of a volume's features with the pre-trained head's class prototypes.

    A pointwise head computes logit_c = w_c · f + b_c, so its weight row w_c is the direction in feature
    space the pre-training taught for class c. Hooked on the head's input, this folds every ``stride``-th
    voxel's cosine cos(f, w_ĉ) with its predicted class ĉ into sums (foreground voxels and all voxels):
    a volume the source model understands has features that point where its head expects them. The gap
    (:meth:`gap`) needs neither source data nor BatchNorm (docs/method.md).
    """

    def __init__(self, head: torch.nn.Module, stride: int = 2) -> None:
        weight = head.weight.detach().float()
        self.weight = weight.reshape(weight.shape[0], -1)  # (C, F)
        self.bias = None if head.bias is None else head.bias.detach().float()
        self.channels_last = isinstance(head, torch.nn.Linear)
        self.stride = stride
        self.sums = np.zeros(2)  # cosine sums: foreground voxels, all voxels
        self.counts = np.zeros(2, np.int64)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.channels_last:
            f = x.reshape(-1, x.shape[-1])
        else:
            if self.stride > 1:
                x = x[(slice(None), slice(None), *[slice(None, None, self.stride)] * (x.ndim - 2))]
            f = x.movedim(1, -1).reshape(-1, x.shape[1])
        f = f.float()
        weight = self.weight.to(f.device)
        logits = f @ weight.T
        if self.bias is not None:
            logits += self.bias.to(f.device)
        predicted = logits.argmax(dim=1)
        rows = weight[predicted]
        cosine = (f * rows).sum(dim=1) / (f.norm(dim=1) * rows.norm(dim=1)).clamp_min(1e-12)
        foreground = predicted > 0
        self.sums += [float(cosine[foreground].sum()), float(cosine.sum())]
        self.counts += [int(foreground.sum()), cosine.numel()]

    def gap(self) -> float:
        """1 − mean cosine over foreground voxels (over all voxels when none is foreground); NaN if unseen."""
        for total, count in zip(self.sums, self.counts):
            if count:
                return float(1.0 - total / count)
        return float("nan")


def batchnorm_layers(network: torch.nn.Module) -> dict[str, torch.nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that carry running statistics: the source domain's knowledge K_s (form a)."""
    return {
        name: module
        for name, module in network.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        and module.track_running_stats
        and module.running_mean is not None
    }


def batchnorm_knowledge(network: torch.nn.Module, names: list[str] | None = None) -> FeatureSummary:
    """The running statistics of the BatchNorm layers ``names`` (default: all that carry them)."""
    layers = batchnorm_layers(network)
    return FeatureSummary(
        {
            BN_PREFIX + name: (bn.running_mean.double().cpu().numpy(), bn.running_var.double().cpu().numpy())
            for name, bn in layers.items()
            if names is None or name in names
        }
    )


def encoder_stages(network: torch.nn.Module) -> list[str]:
    """Module names of the encoder stages of common MONAI networks and ASFDA's own; a generic guess otherwise."""
    names = dict(network.named_modules())
    cls = type(network).__name__
    if cls == "UNet" and "model" in names:
        stages, node, prefix = [], network.model, "model"
        while isinstance(node, torch.nn.Sequential) and len(node) == 3:
            stages.append(f"{prefix}.0")
            if not isinstance(node[1], SkipConnection):
                stages.append(f"{prefix}.1")
                break
            node, prefix = node[1].submodule, f"{prefix}.1.submodule"
        else:
            stages.append(prefix)
        return stages
    known = {
        "SegResNet": [n for n in names if n.count(".") == 1 and n.startswith("down_layers.")],
        "SwinUNETR": ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10"],
        "DynUNet": [
            "input_block",
            *[n for n in names if n.count(".") == 1 and n.startswith("downsamples.")],
            "bottleneck",
        ],
        "BasicUNet": ["conv_0", "down_1", "down_2", "down_3", "down_4"],
        "BasicUNetPlusPlus": ["conv_0_0", "conv_1_0", "conv_2_0", "conv_3_0", "conv_4_0"],
        # nnU-Net's residual encoder (ASFDALib.models.resenc): each resolution's output, as DynUNet's
        "ResidualEncoderUNet": [n for n in names if n.count(".") == 2 and n.startswith("encoder.stages.")],
    }
    if cls in known:
        return [n for n in known[cls] if n in names]
    # Generic: the outputs of strided (downsampling) 3D convolutions.
    return [
        n for n, m in names.items() if isinstance(m, torch.nn.Conv3d) and any(s > 1 for s in np.atleast_1d(m.stride))
    ]


class FeatureTaps:
    """Context manager that hooks layers and accumulates their running moments during inference."""

    def __init__(
        self,
        network: torch.nn.Module,
        stages: list[str] | None = None,
        batchnorm: bool = True,
        prototype_head: str = "",
    ) -> None:
        self.network = network
        self.moments: dict[str, RunningMoments] = {}
        self.prototypes: PrototypeAlignment | None = None  # with ``prototype_head``: the head's alignment
        self._handles: list = []
        self.enabled = not isinstance(network, torch.jit.ScriptModule)
        if not self.enabled:
            return
        if prototype_head:
            head = network.get_submodule(prototype_head)
            self.prototypes = alignment = PrototypeAlignment(head)
            self._handles.append(head.register_forward_pre_hook(lambda _m, args: alignment.update(args[0])))
        modules = dict(network.named_modules())
        for name in stages if stages is not None else encoder_stages(network):
            if name not in modules:
                raise KeyError(f"feature layer {name!r} is not a module of {type(network).__name__}")
            self._add(STAGE_PREFIX + name, modules[name], pre=False)
        if batchnorm:
            for name, module in batchnorm_layers(network).items():
                self._add(BN_PREFIX + name, module, pre=True)

    def _add(self, key: str, module: torch.nn.Module, pre: bool) -> None:
        acc = self.moments.setdefault(key, RunningMoments())
        if pre:
            self._handles.append(module.register_forward_pre_hook(lambda _m, args: acc.update(args[0])))
        else:
            self._handles.append(module.register_forward_hook(lambda _m, _a, out: acc.update(_first(out))))

    def summary(self) -> FeatureSummary:
        return FeatureSummary({k: m.result() for k, m in self.moments.items() if m.mean is not None})

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first(out):
    if isinstance(out, (list, tuple)):
        return out[0]
    return out
