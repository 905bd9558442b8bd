"""torch.distributed helpers, so the same commands scale out under ``torchrun``: volumes are sharded
across ranks, results gathered on every rank, and only rank 0 writes the session and outputs.

Nothing here is home-made transport: it is PyTorch's process group (gloo on CPU, NCCL on GPU), set up
from the environment torchrun provides (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched() -> bool:
    """True inside a torchrun job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto") -> None:
    """Join the process group torchrun describes (no-op for a single process or when already joined)."""
    if not launched() or dist.is_initialized():
        return
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    # Share the machine's cores between the local processes instead of oversubscribing them.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


# What gloo and NCCL raise in this process when another process of the job is gone mid-collective (killed,
# stopped by its scheduler, crashed): the run here did not fail, it lost a peer
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "communicator was aborted", "broken pipe")


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says another process of this torchrun job left (not an error of this one's work)."""
    if not launched() or not isinstance(exc, RuntimeError):
        return False
    return isinstance(exc, getattr(dist, "DistNetworkError", ())) or any(m in str(exc).lower() for m in _PEER_LOST)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: list[T]) -> list[T]:
    """This rank's share of ``items`` (round robin, so large and small volumes spread evenly)."""
    return items[rank() :: world()]


def gather(items: list[Any]) -> list[list[Any]]:
    """Every rank's list, on every rank (rank order)."""
    if not dist.is_initialized():
        return [items]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, items)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device_for_rank(device: str = "auto") -> str:
    """Under torchrun with GPUs, each process takes its own GPU."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shutdown(wait: bool = True) -> None:
    """Leave the process group :func:`init_from_env` joined (a caller's own group is left alone).

    A rank that finished waits for the others first: one that exits while another still holds its
    connections makes gloo abort that process (SIGABRT, no traceback), now and then. A rank that failed
    (``wait`` False) leaves at once, so its barrier cannot pair with a collective the others are in.
    """
    if not (launched() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()
