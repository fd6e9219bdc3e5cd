"""torch.distributed helpers that are no-ops in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_dist", "get_rank", "get_world_size", "is_main_process", "synchronize", "all_reduce_sum"]


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    if is_dist() and get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (``t`` itself in a single process)."""
    if is_dist() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
