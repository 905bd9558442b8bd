"""Memory estimates before work starts, so a volume too large for this machine is refused with a clear
message instead of the process being killed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ASFDALib.errors import VolumeError

GB = 1024**3


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
            import nibabel as nib

            header = nib.load(str(path)).header
            shape = tuple(int(s) for s in header.get_data_shape())
            return shape, np.asarray(header.get_zooms()[:3], dtype=np.float64), header.get_data_dtype().itemsize
        if path.name.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
            import SimpleITK as sitk

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
    needed = scoring_bytes(shape, spacing, itemsize, model_spacing)
    if needed > available:
        raise VolumeError(
            path,
            f"needs about {needed / GB:.1f} GB to score ({'x'.join(map(str, shape[:3]))} voxels), "
            f"{available / GB:.1f} GB are free",
            "crop or downsample it, or free memory",
        )


def training_bytes(batch: int, roi: tuple[int, int, int], bytes_per_voxel: int = 600) -> int:
    """Rough peak of one training step: activations and their gradients for ``batch`` patches, taken as
    600 B per patch voxel (a generous figure for a small float32 3D U-Net; an estimate, not a measurement)."""
    return int(batch * np.prod(roi) * bytes_per_voxel)


def check_training_memory(batch: int, roi: tuple[int, int, int], device: str, available: int | None = None) -> None:
    """Refuse a fine-tuning configuration that cannot fit, naming the setting to change."""
    import torch

    if available is None:
        if device.startswith("cuda") and torch.cuda.is_available():
            available = torch.cuda.mem_get_info(torch.device(device))[0]
        else:
            available = available_bytes()
    if available is None:
        return
    needed = training_bytes(batch, roi)
    if needed > available:
        from ASFDALib.errors import ASFDAError

        raise ASFDAError(
            f"fine-tuning with batch {batch} of {'x'.join(map(str, roi))} patches needs about {needed / GB:.1f} GB, "
            f"{available / GB:.1f} GB are free on {device}: use a smaller --batch-size"
        )
