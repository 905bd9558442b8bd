"""Which device work runs on: the one asked for, or CUDA when ``auto`` finds it, else the CPU."""

from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; an explicit CUDA device without CUDA is an error naming the fix."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no CUDA device is available; use --device cpu")
    return torch.device(device)
