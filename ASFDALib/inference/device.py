"""Which device work runs on: the one asked for, or CUDA when ``auto`` finds it, else the CPU."""

from __future__ import annotations

import torch

from ASFDALib.errors import ASFDAError


def cuda_problem(device: str) -> str:
    """Why ``device`` (cuda, cuda:N) cannot run here, in words naming the fix; "" when it can."""
    if not device.startswith("cuda"):
        return ""
    if not torch.cuda.is_available():
        return (
            f"{device} was asked for, but this machine has no CUDA device (or this torch is a CPU build); use "
            "--device cpu or auto"
        )
    count = torch.cuda.device_count()
    if int(device.partition(":")[2] or 0) >= count:
        return f"{device} was asked for, but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
    return ""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; an explicit CUDA device that is not here is an error naming the fix."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if problem := cuda_problem(device):
        raise ASFDAError(problem)
    return torch.device(device)
