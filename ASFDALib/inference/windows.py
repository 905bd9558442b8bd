"""The one sliding-window engine: every network pass over a volume (scoring, prediction, MC dropout) runs here.

Windows overlap, but each voxel is owned by exactly one window, the one whose centre is nearest, so the
stitched result never needs a per-class accumulator or a count map: a consumer writes each window's owned
block straight into its output. The scoring sweep reduces those blocks on the spot; prediction stores
their softmax. Both therefore see the same logits for every voxel, so the segmentation a clinician is
shown and the ASD computed for that case come from one computation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ASFDALib.errors import ModelError

Slices = tuple[slice, ...]


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


def batch_for_memory(free_bytes: int, roi: tuple[int, int, int], bytes_per_voxel: int = 256, cap: int = 16) -> int:
    """Windows per forward pass that fit in half the free GPU memory (a window costs roughly
    ``bytes_per_voxel`` per voxel in activations for a typical 3D U-Net under AMP)."""
    per_window = int(np.prod(roi)) * bytes_per_voxel
    return int(max(1, min(cap, (free_bytes // 2) // max(per_window, 1))))


@dataclass
class WindowBatch:
    """The logits of a batch of windows (B, C, *roi) and, for each, its window and owned core slices."""

    logits: torch.Tensor
    windows: list[tuple[Slices, Slices]]

    def owned(self, i: int) -> tuple[torch.Tensor, Slices]:
        """Window ``i``'s logits on the voxels it owns (C, ...), dense, and where they go in the padded volume."""
        window, core = self.windows[i]
        local = (i, slice(None), *(slice(c.start - w.start, c.stop - w.start) for c, w in zip(core, window)))
        return self.logits[local].contiguous(), core  # every op on a dense block runs faster


@dataclass
class WindowPlan:
    """How a volume of ``shape`` is covered: padded to at least the ROI, then tiled by ``windows``."""

    shape: tuple[int, ...]
    padded: tuple[int, ...]
    windows: list[tuple[Slices, Slices]]

    @property
    def valid(self) -> Slices:
        """The slices of the padded volume that hold the real one."""
        return tuple(slice(0, s) for s in self.shape)


def plan_windows(shape: tuple[int, ...], roi: tuple[int, int, int], overlap: float) -> WindowPlan:
    padded = tuple(max(int(s), r) for s, r in zip(shape, roi))
    return WindowPlan(tuple(int(s) for s in shape), padded, list(iter_windows(padded, roi, overlap)))


def run_windows(
    network: torch.nn.Module,
    image: torch.Tensor,
    roi: tuple[int, int, int],
    overlap: float,
    batch: int,
    device: torch.device,
    num_classes: int,
    amp: bool = True,
    on_window: Callable[[int, int], None] | None = None,
) -> tuple[WindowPlan, Iterator[WindowBatch]]:
    """Plan the windows of ``image`` (1, X, Y, Z; float16 or float32) and a lazy stream of their logits.

    The caller sets the network's mode (eval, or dropout on) and the grad mode. Padding repeats the
    image's minimum, as background. Deep-supervision outputs are reduced to the full-resolution head.
    ``amp`` applies on CUDA only. ``on_window(done, total)`` reports progress after every batch.
    """
    plan = plan_windows(tuple(image.shape[1:]), roi, overlap)
    x = torch.as_tensor(image).as_subclass(torch.Tensor)
    if x.dtype not in (torch.float16, torch.float32):
        x = x.float()
    if plan.padded != plan.shape:
        pad = [p for s, q in reversed(list(zip(plan.shape, plan.padded))) for p in (0, q - s)]
        x = torch.nn.functional.pad(x, pad, mode="constant", value=float(x.min()))
    if any(t.device != device for t in network.parameters()):
        network = network.to(device)
    use_amp = amp and device.type == "cuda"

    def stream() -> Iterator[WindowBatch]:
        windows = plan.windows
        for first in range(0, len(windows), batch):
            chunk = windows[first : first + batch]
            # Windows are widened to float32 a batch at a time, so a compact float16 volume stays compact.
            inputs = torch.stack([x[(slice(None), *w)] for w, _ in chunk]).to(device, non_blocking=True).float()
            with torch.autocast(device.type, enabled=use_amp):
                logits = network(inputs)
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            logits = logits.float()
            if logits.shape[1] != num_classes:
                raise ModelError(
                    f"the model outputs {logits.shape[1]} channels but its card lists {num_classes} classes"
                )
            yield WindowBatch(logits, chunk)
            if on_window:
                on_window(min(first + batch, len(windows)), len(windows))

    return plan, stream()
