"""The few distributed helpers the training loop needs (as NVlabs/edm's torch_utils/distributed.py):
which rank of how many this process is, a mean over ranks, and the device to train on. Without
torch.distributed initialised every helper is the single-process identity."""
from __future__ import annotations

import torch
import torch.distributed as dist


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as given; None or "auto": the GPU if there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside DDP."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """The mean of `values` over the ranks (a copy; `values` itself when alone)."""
    if world_size > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world_size
    return values
