"""One sliding-window sweep of a volume that yields everything the query metrics need.

The windows come from :mod:`ASFDALib.inference.windows`, the engine prediction uses too. Each window's
logits are reduced on the spot to per-voxel entropy, foreground probability and class (stored as uint8
at model spacing, 3 bytes a voxel; 4 with more than 127 foreground classes), while forward hooks fold
features into running moments. No C-channel probability map is ever kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ASFDALib.errors import ModelError
from ASFDALib.inference.device import resolve_device
from ASFDALib.inference.windows import batch_for_memory, run_windows
from ASFDALib.models.card import MAX_CLASSES, ModelCard
from ASFDALib.query import scoring
from ASFDALib.query.features import LOGITS, FeatureSummary, FeatureTaps, RunningMoments

FOREGROUND_FLAG = 128  # high bit of a uint8 class map: the overall argmax is a foreground class
WIDE_FOREGROUND_FLAG = 1 << 15  # the same bit of a uint16 map, for models with 128-255 foreground classes


def class_map_layout(num_classes: int) -> tuple[type, int]:
    """The class map's dtype and flag bit: 1 byte a voxel up to 127 foreground classes, else 2 bytes."""
    if num_classes <= FOREGROUND_FLAG:
        return np.uint8, FOREGROUND_FLAG
    if num_classes <= MAX_CLASSES:
        return np.uint16, WIDE_FOREGROUND_FLAG
    raise ModelError(f"the model has {num_classes} classes; ASFDA supports at most {MAX_CLASSES}")


@dataclass
class SweepConfig:
    """How to run the sweep: device, AMP, sliding-window batch, and which extras to collect."""

    device: str = "auto"
    amp: bool = True
    sw_batch_size: int | None = None
    overlap: float | None = None
    stages: list[str] | None = None
    batchnorm_taps: bool = True
    keep_energy: bool = False
    keep_label: bool = False
    prototype_head: str = ""  # a pointwise output layer's name: measure PrototypeAlignment on its input


@dataclass
class SweepResult:
    """Per-volume reductions of one sweep: the raw material of every query strategy."""

    asd: float
    entropy: float
    energy: float
    fg_ml: float
    otsu: float
    class_fractions: np.ndarray
    summary: FeatureSummary
    shape: tuple[int, ...]
    windows: int
    label: np.ndarray | None = field(default=None, repr=False)
    prototype_gap: float = math.nan  # PrototypeAlignment.gap(), when the sweep was asked for it


def _quantise(values: torch.Tensor, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """``offset + scale * values``, a quantity in [0, 1], to uint8 (1/255 steps, rounded): 4x less memory
    than float32, ample for entropy and Otsu. One fused pass: this runs on every voxel of every window."""
    q = values.mul(255.0 * scale).add_(255.0 * offset + 0.5).clamp_(0.0, 255.0)
    return q.to(torch.uint8).numpy(force=True)


def sweep(
    network: torch.nn.Module,
    image: torch.Tensor,
    card: ModelCard,
    config: SweepConfig | None = None,
    voxel_ml: float | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Run the network over ``image`` (1, X, Y, Z) window by window and reduce everything on the fly.

    ``image`` may be float16 (see :func:`preprocess.compact`): windows are widened to float32 one batch
    at a time.
    """
    config = config or SweepConfig()
    device = resolve_device(config.device)
    roi = card.roi_size
    overlap = card.overlap if config.overlap is None else config.overlap
    batch = config.sw_batch_size or card.sw_batch_size
    if config.sw_batch_size is None and device.type == "cuda":
        batch = max(batch, batch_for_memory(torch.cuda.mem_get_info(device)[0], roi))
    network = network.eval()
    plan, batches = run_windows(network, image, roi, overlap, batch, device, card.num_classes, config.amp, on_window)
    padded = plan.padded
    entropy_q = np.zeros(padded, np.uint8)
    fgprob_q = np.zeros(padded, np.uint8)
    class_dtype, flag = class_map_layout(card.num_classes)
    torch_class_dtype = torch.uint8 if class_dtype == np.uint8 else torch.int32
    classes = np.zeros(padded, class_dtype)
    fg_hist = np.zeros(256, np.int64)
    energy = np.zeros(padded, np.float16) if config.keep_energy else None
    logit_moments = RunningMoments()
    log_c = math.log(card.num_classes)
    with (
        FeatureTaps(network, config.stages, config.batchnorm_taps, config.prototype_head) as taps,
        torch.inference_mode(),
    ):
        for window_batch in batches:
            logit_moments.update(window_batch.logits)
            for i in range(len(window_batch.windows)):
                # Reduce only the voxels this window owns: no work, and no temporaries, for overlaps.
                owned, core = window_batch.owned(i)
                logp = torch.log_softmax(owned, dim=0)
                p = logp.exp()
                entropy_q[core] = _quantise((p * logp).sum(dim=0), -1.0 / log_c)
                fg_core = _quantise(p[0], -1.0, 1.0)
                fgprob_q[core] = fg_core
                # The Otsu histogram, a window at a time: only the window's counts are ever widened.
                fg_hist += np.bincount(fg_core.ravel(), minlength=256)
                # torch.max over channels is an order of magnitude faster than argmax on CPU.
                fg_best, fg_index = owned[1:].max(dim=0)
                packed = fg_index + 1 + (fg_best > owned[0]) * flag
                classes[core] = packed.to(torch_class_dtype).numpy(force=True).astype(class_dtype, copy=False)
                if energy is not None:
                    # log p_0 = logit_0 - logsumexp, so the free energy -logsumexp comes for free.
                    energy[core] = (logp[0] - owned[0]).to(torch.float16).numpy(force=True)
        summary = taps.summary()
    summary.layers[LOGITS] = logit_moments.result()
    shape, valid = plan.shape, plan.valid
    entropy_q, fgprob_q, classes = entropy_q[valid], fgprob_q[valid], classes[valid]
    fg_class = classes & (flag - 1)
    # A volume smaller than the window was padded, and the padding is no part of its histogram.
    hist = fg_hist if padded == shape else None
    region, otsu = scoring.adaptive_foreground(fgprob_q, scale=255, hist=hist)
    asd_value = scoring.class_balanced_entropy(entropy_q, region, fg_class, scale=255)
    # Class counts one class at a time: a bincount would widen the whole map to int64 (8 bytes a voxel).
    counts = np.array([np.count_nonzero(classes == (c | flag)) for c in range(1, card.num_classes)])
    fractions = np.concatenate([[classes.size - counts.sum()], counts]) / classes.size
    ml = voxel_ml if voxel_ml is not None else float(np.prod(card.spacing)) / 1000.0
    energy_value = float(energy[valid][region].astype(np.float64).mean()) if energy is not None else float("nan")
    return SweepResult(
        asd=asd_value,
        entropy=float(np.mean(entropy_q, dtype=np.float64)) / 255.0,
        energy=energy_value,
        fg_ml=float(counts.sum()) * ml,
        otsu=otsu,
        class_fractions=fractions.astype(np.float64),
        summary=summary,
        shape=shape,
        windows=len(plan.windows),
        label=np.where(classes >= flag, fg_class, 0).astype(class_dtype) if config.keep_label else None,
        prototype_gap=taps.prototypes.gap() if taps.prototypes is not None else math.nan,
    )
