"""One sliding-window sweep of a volume that yields everything the query metrics need.

Each window's logits are reduced on the spot to per-voxel entropy, foreground probability and class
(stored as uint8 at model spacing, 3 bytes a voxel), while forward hooks fold features into running
moments. No C-channel probability map is ever kept. Voxels covered by several windows take the value
of the window whose centre is nearest, so no per-class accumulator is needed for overlap.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from . import scoring
from .errors import ModelError
from .features import LOGITS, FeatureSummary, FeatureTaps, RunningMoments
from .modelcard import ModelCard

FOREGROUND_FLAG = 128  # high bit of the class map: the overall argmax is a foreground class


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


def _quantise(values: torch.Tensor, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """``offset + scale * values``, a quantity in [0, 1], to uint8 (1/255 steps, rounded): 4x less memory
    than float32, ample for entropy and Otsu. One fused pass: this runs on every voxel of every window."""
    q = values.mul(255.0 * scale).add_(255.0 * offset + 0.5).clamp_(0.0, 255.0)
    return q.to(torch.uint8).numpy(force=True)


def batch_for_memory(free_bytes: int, roi: tuple[int, int, int], bytes_per_voxel: int = 256, cap: int = 16) -> int:
    """Windows per forward pass that fit in half the free GPU memory (a window costs roughly
    ``bytes_per_voxel`` per voxel in activations for a typical 3D U-Net under AMP)."""
    per_window = int(np.prod(roi)) * bytes_per_voxel
    return int(max(1, min(cap, (free_bytes // 2) // max(per_window, 1))))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no CUDA device is available; use --device cpu")
    return torch.device(device)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window origins along one axis, covering [0, size) with the last window flush to the end."""
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    starts = list(range(0, size - roi + 1, step))
    if starts[-1] != size - roi:
        starts.append(size - roi)
    return starts


def core_bounds(starts: list[int], roi: int, size: int) -> list[tuple[int, int]]:
    """The part of each window it owns: up to the midpoint between neighbouring window centres."""
    centres = [s + roi / 2 for s in starts]
    bounds = []
    for i, start in enumerate(starts):
        lo = 0 if i == 0 else math.ceil((centres[i - 1] + centres[i]) / 2)
        hi = size if i == len(starts) - 1 else math.ceil((centres[i] + centres[i + 1]) / 2)
        bounds.append((max(lo, start), min(hi, start + roi)))
    return bounds


def iter_windows(shape: tuple[int, int, int], roi: tuple[int, int, int], overlap: float) -> Iterator[tuple]:
    """(window slices, core slices relative to the volume) for every window of a padded volume."""
    per_axis = []
    for size, r in zip(shape, roi):
        starts = window_starts(size, r, overlap)
        per_axis.append(list(zip(starts, core_bounds(starts, r, size))))
    for combo in itertools.product(*per_axis):
        window = tuple(slice(s, s + r) for (s, _), r in zip(combo, roi))
        core = tuple(slice(lo, hi) for _, (lo, hi) in combo)
        yield window, core


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
    shape = tuple(int(s) for s in image.shape[1:])
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    x = torch.as_tensor(image).as_subclass(torch.Tensor)
    if x.dtype not in (torch.float16, torch.float32):
        x = x.float()
    if padded != shape:
        pad = [p for s, q in reversed(list(zip(shape, padded))) for p in (0, q - s)]
        x = torch.nn.functional.pad(x, pad, mode="constant", value=float(x.min()))
    entropy_q = np.zeros(padded, np.uint8)
    fgprob_q = np.zeros(padded, np.uint8)
    classes = np.zeros(padded, np.uint8)
    fg_hist = np.zeros(256, np.int64)
    energy = np.zeros(padded, np.float16) if config.keep_energy else None
    logit_moments = RunningMoments()
    windows = list(iter_windows(padded, roi, overlap))
    if any(t.device != device for t in network.parameters()):
        network = network.to(device)
    network = network.eval()
    use_amp = config.amp and device.type == "cuda"
    log_c = math.log(card.num_classes)
    with FeatureTaps(network, config.stages, config.batchnorm_taps) as taps, torch.inference_mode():
        for first in range(0, len(windows), batch):
            chunk = windows[first : first + batch]
            inputs = torch.stack([x[(slice(None), *w)] for w, _ in chunk]).to(device, non_blocking=True).float()
            with torch.autocast(device.type, enabled=use_amp):
                logits = network(inputs)
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            logits = logits.float()
            if logits.shape[1] != card.num_classes:
                raise ModelError(
                    f"the model outputs {logits.shape[1]} channels but its card lists {card.num_classes} classes"
                )
            logit_moments.update(logits)
            for i, (window, core) in enumerate(chunk):
                # Reduce only the voxels this window owns: no work, and no temporaries, for overlaps.
                local = (i, slice(None), *(slice(c.start - w.start, c.stop - w.start) for c, w in zip(core, window)))
                owned = logits[local].contiguous()  # every op below runs faster on a dense block
                logp = torch.log_softmax(owned, dim=0)
                p = logp.exp()
                entropy_q[core] = _quantise((p * logp).sum(dim=0), -1.0 / log_c)
                fg_core = _quantise(p[0], -1.0, 1.0)
                fgprob_q[core] = fg_core
                # The Otsu histogram, a window at a time: only the window's counts are ever widened.
                fg_hist += np.bincount(fg_core.ravel(), minlength=256)
                # torch.max over channels is an order of magnitude faster than argmax on CPU.
                fg_best, fg_index = owned[1:].max(dim=0)
                packed = fg_index + 1 + (fg_best > owned[0]) * FOREGROUND_FLAG
                classes[core] = packed.to(torch.uint8).numpy(force=True)
                if energy is not None:
                    # log p_0 = logit_0 - logsumexp, so the free energy -logsumexp comes for free.
                    energy[core] = (logp[0] - owned[0]).to(torch.float16).numpy(force=True)
            if on_window:
                on_window(min(first + batch, len(windows)), len(windows))
        summary = taps.summary()
    summary.layers[LOGITS] = logit_moments.result()
    valid = tuple(slice(0, s) for s in shape)
    entropy_q, fgprob_q, classes = entropy_q[valid], fgprob_q[valid], classes[valid]
    fg_class = classes & (FOREGROUND_FLAG - 1)
    # A volume smaller than the window was padded, and the padding is no part of its histogram.
    hist = fg_hist if padded == shape else None
    region, otsu = scoring.adaptive_foreground(fgprob_q, scale=255, hist=hist)
    asd_value = scoring.class_balanced_entropy(entropy_q, region, fg_class, scale=255)
    # Class counts one class at a time: a bincount would widen the whole map to int64 (8 bytes a voxel).
    counts = np.array([np.count_nonzero(classes == (c | FOREGROUND_FLAG)) for c in range(1, card.num_classes)])
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
        windows=len(windows),
        label=np.where(classes >= FOREGROUND_FLAG, fg_class, 0).astype(np.uint8) if config.keep_label else None,
    )
