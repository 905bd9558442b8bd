"""Memory estimates before work starts, so a volume too large for this machine is refused with a clear
message instead of the process being killed."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from ASFDALib.errors import ASFDAError, VolumeError

GB = 1024**3
# Peak training memory per patch / the sum of layer outputs of one forward pass. Calibrated on
# benchmarks/bench_foundation.py: SwinUNETR (feature size 48) at 96^3, batch 1, on the CPU peaked 6.6 GB
# above what the process held before (layer outputs sum to 8.95 GB, gradients + AdamW state 0.75 GB:
# ratio 0.65; autograd keeps views and in-place results once). 0.75 errs on the safe side.
ACTIVATION_FACTOR = 0.75


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def header_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray, int] | None:
    """(shape, spacing, bytes per voxel) from the header alone; None for DICOM folders or unreadable headers."""
    path = Path(path)
    try:
        if path.name.lower().endswith((".nii", ".nii.gz")):
            header = nib.load(str(path)).header
            shape = tuple(int(s) for s in header.get_data_shape())
            return shape, np.asarray(header.get_zooms()[:3], dtype=np.float64), header.get_data_dtype().itemsize
        if path.name.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            itemsize = np.dtype(sitk.GetArrayViewFromImage(sitk.Image(1, 1, reader.GetPixelID())).dtype).itemsize
            return tuple(reader.GetSize()), np.asarray(reader.GetSpacing(), dtype=np.float64), itemsize
    except Exception:  # noqa: BLE001 - the reader will report a broken header properly
        return None
    return None


def scoring_bytes(shape: tuple[int, ...], spacing: np.ndarray, itemsize: int, model_spacing) -> int:
    """Peak bytes of read + resample + sweep: the native array, its float32 copy and resampling output,
    the resampled volume and the sweep's maps (measured: benchmarks/bench_scoring.py)."""
    native = int(np.prod(shape[:3]))
    scale = np.prod(np.asarray(spacing[:3], dtype=np.float64) / np.asarray(model_spacing, dtype=np.float64))
    resampled = int(native * max(scale, 1e-9))
    return native * (itemsize + 8) + resampled * (4 + 3 + 4)


def check_scoring_memory(path: Path, model_spacing, available: int | None = None) -> None:
    """Raise VolumeError when scoring ``path`` would need more memory than is available."""
    geometry = header_geometry(path)
    available = available_bytes() if available is None else available
    if geometry is None or available is None:
        return
    shape, spacing, itemsize = geometry
    if len(shape) < 3 or len(spacing) < 3:  # no volume: reading it says so, with the fix
        return
    needed = scoring_bytes(shape, spacing, itemsize, model_spacing)
    if needed > available:
        raise VolumeError(
            path,
            f"needs about {needed / GB:.1f} GB to score ({'x'.join(map(str, shape[:3]))} voxels), "
            f"{available / GB:.1f} GB are free",
            "crop or downsample it, or free memory",
        )


def _probe_shape(roi: tuple[int, int, int]) -> tuple[int, int, int]:
    """A patch small enough to run quickly and shaped as networks need: the ROI itself up to 64 per axis,
    else 64 (a multiple of 32, as every U-Net depth up to 5 needs, and large enough that SwinUNETR's
    bottleneck keeps more than one voxel for its instance norm)."""
    return tuple(min(r, 64) for r in roi)


def activation_bytes_per_voxel(network, roi: tuple[int, int, int]) -> float:
    """Bytes of layer outputs per input voxel in one forward pass, measured on a probe patch: the sum of
    every leaf module's output (what autograd keeps for the backward pass, give or take)."""

    probe = _probe_shape(roi)
    if isinstance(network, torch.jit.ScriptModule):  # no forward hooks there: what autograd saves instead
        return _saved_bytes(network, probe) / float(np.prod(probe))
    total = 0

    def hook(_module, _inputs, output) -> None:
        nonlocal total
        for out in output if isinstance(output, (list, tuple)) else (output,):
            if isinstance(out, torch.Tensor):
                total += out.numel() * out.element_size()

    leaves = [m for m in network.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    training = network.training
    try:
        # Eval mode: a probe patch of one is too small for batch statistics, and no running statistic moves.
        with torch.no_grad():
            network.eval()(torch.zeros((1, 1, *probe), device=device))
    finally:
        network.train(training)
        for handle in handles:
            handle.remove()
    return total / float(np.prod(probe))


def _saved_bytes(network, probe: tuple[int, ...]) -> int:
    """Bytes autograd keeps for the backward pass of one probe patch (a TorchScript model's measure: it takes no
    forward hooks; about 0.7 of the leaf outputs' sum on MONAI's UNet, where both can be measured). The weights
    it keeps are counted once elsewhere (training_bytes' fixed part), and a tensor two operations keep, once."""
    weights = {p.data_ptr() for p in network.parameters()}
    seen: set[tuple[int, int]] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (tensor.data_ptr(), tensor.numel())
        if tensor.data_ptr() not in weights and key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        return tensor

    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    training = network.training
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            network.eval()(torch.zeros((1, 1, *probe), device=device))
    finally:
        network.train(training)
    return total


def training_bytes(network, batch: int, roi: tuple[int, int, int]) -> tuple[int, int]:
    """Peak of one training step, estimated from the network itself, as (fixed bytes, bytes per patch):
    weights, gradients and AdamW's two moments (4x the parameters), and for each patch the layer outputs
    autograd keeps times ``ACTIVATION_FACTOR`` (the gradients alive during the backward pass)."""
    per_patch = int(ACTIVATION_FACTOR * np.prod(roi) * activation_bytes_per_voxel(network, roi))
    fixed = 4 * sum(p.numel() * p.element_size() for p in network.parameters())
    return fixed, per_patch


def check_training_memory(
    network, batch: int, roi: tuple[int, int, int], device: str, available: int | None = None
) -> None:
    """Refuse a fine-tuning configuration that cannot fit, naming the setting to change (the largest
    batch that fits, or the patch size when not even one patch does)."""

    if available is None:
        if device.startswith("cuda") and torch.cuda.is_available():
            available = torch.cuda.mem_get_info(torch.device(device))[0]
        else:
            available = available_bytes()
    if available is None:
        return
    fixed, per_patch = training_bytes(network, batch, roi)
    needed = fixed + batch * per_patch
    if needed <= available:
        return

    fits = (available - fixed) // max(per_patch, 1)
    fix = (
        f"use --batch-size {fits} or less"
        if fits >= 1
        else "not even one patch fits: use a smaller roi_size in the model card, or a machine with more memory"
    )
    raise ASFDAError(
        f"fine-tuning with batch {batch} of {'x'.join(map(str, roi))} patches needs about {needed / GB:.1f} GB, "
        f"{available / GB:.1f} GB are free on {device}: {fix}"
    )
