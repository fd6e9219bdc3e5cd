"""torch.distributed helpers that are no-ops in a single process (as detectron2's ``utils/comm.py``).

Tensor collectives work under gloo (CPU) and nccl (GPU): a CPU tensor given to a helper under nccl travels through
the current CUDA device and comes back on the CPU. Object collectives (:func:`all_gather`, :func:`gather`,
:func:`broadcast_object`) pickle through a gloo group, so they never touch GPU memory.
"""
from __future__ import annotations

import os
from typing import Any, List

import torch
import torch.distributed as dist

__all__ = [
    "is_dist", "get_rank", "get_world_size", "get_local_rank", "get_local_size", "is_main_process",
    "synchronize", "get_cpu_group", "release_cpu_group", "all_reduce_sum", "broadcast_tensor", "all_gather",
    "gather", "broadcast_object",
]


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_local_rank() -> int:
    """Rank of this process on its machine (``LOCAL_RANK``, set by ``launch`` and ``torchrun``)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_dist() else 0


def get_local_size() -> int:
    """Number of processes on this machine (``LOCAL_WORLD_SIZE``, set by ``launch`` and ``torchrun``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    """Barrier over all ranks (no-op in a single process)."""
    if is_dist() and get_world_size() > 1:
        dist.barrier()


def _collective_device(t: torch.Tensor) -> torch.device:
    """Where ``t`` must live for the default backend (nccl only handles CUDA tensors)."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, in place (``t`` itself in a single process)."""
    if is_dist() and get_world_size() > 1:
        dev = _collective_device(t)
        if dev == t.device:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            moved = t.to(dev)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            t.copy_(moved)
    return t


# dtypes gloo reduces and broadcasts; others (int16 codes for K > 256 ...) travel as bytes.
_GLOO_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32,
                torch.int64, torch.bool}


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` in place with rank ``src``'s ``t``; same shape and dtype on all ranks."""
    if is_dist() and get_world_size() > 1:
        contiguous = t.is_contiguous()
        flat = (t if contiguous else t.contiguous()).view(-1)  # shares t's memory when contiguous
        buf = flat.view(torch.uint8) if dist.get_backend() == "gloo" and t.dtype not in _GLOO_DTYPES else flat
        dev = _collective_device(buf)
        moved = buf if dev == buf.device else buf.to(dev)
        dist.broadcast(moved, src)
        if moved is not buf:
            buf.copy_(moved)
        if not contiguous:
            t.copy_(flat.view(t.shape))
    return t


_CPU_GROUP = None  # the gloo group of an nccl run, created on first use


def get_cpu_group():
    """A gloo group over all ranks for CPU tensors and pickled objects.

    ``None`` (the default group, for torch.distributed calls) when the default group is gloo; under nccl a gloo
    group created on first use, which every rank reaches through the same collective call, as ``new_group``
    requires. :func:`release_cpu_group` drops it before the process group is destroyed.
    """
    global _CPU_GROUP
    if dist.get_backend() == "gloo":
        return None  # no reference to the default group: it must die with destroy_process_group
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def release_cpu_group() -> None:
    """Forget the gloo group of :func:`get_cpu_group` (call before ``destroy_process_group``).

    A process group still referenced at interpreter exit aborts the process ("terminate called without an active
    exception") when its worker threads are torn down.
    """
    global _CPU_GROUP
    _CPU_GROUP = None


def all_gather(data: Any) -> List[Any]:
    """Every rank's picklable ``data``, in rank order, on every rank (``[data]`` in a single process)."""
    if not is_dist() or get_world_size() == 1:
        return [data]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, data, group=get_cpu_group())
    return out


def gather(data: Any, dst: int = 0) -> List[Any]:
    """Every rank's picklable ``data`` in rank order on rank ``dst``; ``[]`` on the other ranks."""
    if not is_dist() or get_world_size() == 1:
        return [data]
    group = get_cpu_group()
    if get_rank() == dst:
        out: List[Any] = [None] * get_world_size()
        dist.gather_object(data, out, dst=dst, group=group)
        return out
    dist.gather_object(data, None, dst=dst, group=group)
    return []


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself in a single process)."""
    if not is_dist() or get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=get_cpu_group())
    return box[0]
