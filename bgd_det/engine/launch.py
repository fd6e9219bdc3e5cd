"""``launch()``: run ``main`` in one process, or in several with torch.distributed (as detectron2).

Three ways to run a tool:

- one process: ``launch`` calls ``main_func(*args)`` directly;
- several processes on this machine (``--num-processes N``), and several machines (``--num-machines M
  --machine-rank R --dist-url tcp://HOST:PORT`` on every machine): ``launch`` spawns one process per local rank
  with ``torch.multiprocessing`` and initialises torch.distributed in each (nccl on GPUs, gloo on CPUs);
- under ``torchrun``: the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``) defines the
  processes; ``launch`` initialises from it and calls ``main_func`` in the current process.

Failures never hang: every collective has a finite timeout (``$BGD_DIST_TIMEOUT`` seconds, default 30 minutes),
and a spawned process that raises or dies makes ``launch`` raise :class:`DistributedLaunchError` naming the rank
and its exit code, after the other local processes are terminated.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import tempfile
from datetime import timedelta
from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..utils import comm

logger = logging.getLogger(__name__)

__all__ = ["launch", "DEFAULT_TIMEOUT", "default_timeout", "default_backend", "DistributedLaunchError"]

DEFAULT_TIMEOUT = timedelta(minutes=30)
_RESULT_FILE = "result.pkl"


class DistributedLaunchError(RuntimeError):
    """A process of a multi-process run raised or died. Attributes: ``rank`` (global), ``exit_code``."""

    def __init__(self, msg: str, *, rank: int, exit_code: Optional[int] = None) -> None:
        super().__init__(msg)
        self.rank, self.exit_code = rank, exit_code


def default_timeout() -> timedelta:
    """Timeout of every collective: ``$BGD_DIST_TIMEOUT`` seconds when set, else :data:`DEFAULT_TIMEOUT`."""
    value = os.environ.get("BGD_DIST_TIMEOUT", "")
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"BGD_DIST_TIMEOUT={value!r}; expected a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"BGD_DIST_TIMEOUT={value!r}; expected a positive number of seconds")
    return timedelta(seconds=seconds)


def default_backend() -> str:
    """``$BGD_DIST_BACKEND`` when set, else "nccl" when CUDA is available, else "gloo".

    Set ``BGD_DIST_BACKEND=gloo`` to run CPU processes (``MODEL.DEVICE cpu``) on a machine with GPUs.
    """
    backend = os.environ.get("BGD_DIST_BACKEND", "")
    if backend:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"BGD_DIST_BACKEND={backend!r}; allowed: 'gloo', 'nccl'")
        return backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))  # the OS picks a free port; it may be taken again before use (rare)
        return sock.getsockname()[1]


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) and not dist.is_initialized()


def _set_cpu_threads(local_size: int) -> None:
    """Split this machine's cores between its CPU processes unless ``OMP_NUM_THREADS`` says otherwise."""
    if local_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local_size))


def _init_group(backend: str, init_method: str, *, rank: int, world_size: int, local_rank: int,
                timeout: timedelta) -> None:
    if backend == "nccl":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"backend 'nccl' needs a GPU per process: local rank {local_rank}, "
                               f"{torch.cuda.device_count()} visible GPUs (use BGD_DIST_BACKEND=gloo for CPU)")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank, timeout=timeout)
    # Fail here, with a clear timeout, when a process of the group never arrives.
    if backend == "nccl":
        dist.barrier(device_ids=[local_rank])
    else:
        dist.barrier()


def _run_under_torchrun(main_func: Callable[..., Any], args: Tuple, backend: str, timeout: timedelta) -> Any:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if backend == "gloo":
        _set_cpu_threads(local_size)
    _init_group(backend, "env://", rank=rank, world_size=world, local_rank=local_rank, timeout=timeout)
    result = main_func(*args)
    _shutdown(backend, local_rank)
    return result


def _shutdown(backend: str, local_rank: int) -> None:
    """Tear the group down once every rank is done with it, so no rank closes its connections while a peer
    still uses them. After an exception the group is left to the process exit: its peers fail on their own."""
    if backend == "nccl":
        dist.barrier(device_ids=[local_rank])
    else:
        dist.barrier()
    comm.release_cpu_group()
    dist.destroy_process_group()


def _distributed_worker(local_rank: int, main_func: Callable[..., Any], world_size: int, num_processes: int,
                        machine_rank: int, dist_url: str, args: Tuple, backend: str, timeout: timedelta,
                        result_dir: str) -> None:
    rank = machine_rank * num_processes + local_rank
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(num_processes), GROUP_RANK=str(machine_rank))
    if backend == "gloo":
        _set_cpu_threads(num_processes)
    _init_group(backend, dist_url, rank=rank, world_size=world_size, local_rank=local_rank, timeout=timeout)
    result = main_func(*args)
    if local_rank == 0 and result is not None:
        try:
            with open(os.path.join(result_dir, _RESULT_FILE), "wb") as f:
                pickle.dump(result, f)
        except Exception as e:  # a result that does not pickle is not an error of the run
            logger.warning("main_func's return value could not be passed back (%s); launch returns None", e)
    _shutdown(backend, local_rank)


def launch(main_func: Callable[..., Any], num_processes: int = 1, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args: Tuple = (), *, backend: Optional[str] = None,
           timeout: Optional[timedelta] = None) -> Any:
    """Run ``main_func(*args)`` in ``num_processes`` processes on each of ``num_machines`` machines.

    Call it on every machine with the same ``num_processes``, ``num_machines`` and ``dist_url``. Under
    ``torchrun`` the environment decides the processes and the first four arguments are ignored.

    Args:
        main_func: a module-level function (spawned processes import it by name).
        num_processes: processes per machine (one per GPU with nccl; CPU processes with gloo).
        num_machines: machines taking part; machine_rank: this machine's index in ``[0, num_machines)``.
        dist_url: ``tcp://HOST:PORT`` of machine 0 reachable from all machines, or "auto" (one machine only: a
            free local port).
        args: arguments of ``main_func`` (picklable).
        backend: "gloo" or "nccl"; default :func:`default_backend`.
        timeout: of every collective; default :func:`default_timeout`.

    Returns:
        ``main_func``'s return value: directly in one process; in several, the one of this machine's local rank 0
        (passed back by pickle; None when it does not pickle).

    Raises:
        DistributedLaunchError: a process raised or died (the message names its rank and exit code).
    """
    backend = backend or default_backend()
    timeout = timeout or default_timeout()
    if _under_torchrun():
        if num_processes * num_machines > 1:
            logger.warning("under torchrun: ignoring num_processes=%d, num_machines=%d (torchrun decides)",
                           num_processes, num_machines)
        return _run_under_torchrun(main_func, args, backend, timeout)

    world_size = num_processes * num_machines
    if num_processes < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise ValueError(f"invalid topology: num_processes={num_processes}, num_machines={num_machines}, "
                         f"machine_rank={machine_rank}")
    if world_size == 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines > 1:
            raise ValueError("dist_url='auto' only works on one machine; pass --dist-url tcp://HOST:PORT with "
                             "the address of machine 0 on every machine")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    logger.info("launching %d processes on machine %d/%d (%s, %s, timeout %s)", num_processes, machine_rank,
                num_machines, backend, dist_url, timeout)
    with tempfile.TemporaryDirectory(prefix="bgd_launch_") as result_dir:
        try:
            mp.start_processes(_distributed_worker, nprocs=num_processes, start_method="spawn",
                               args=(main_func, world_size, num_processes, machine_rank, dist_url, args, backend,
                                     timeout, result_dir))
        except mp.ProcessExitedException as e:
            rank = machine_rank * num_processes + e.error_index
            how = f"signal {e.signal_name}" if e.signal_name else f"exit code {e.exit_code}"
            raise DistributedLaunchError(
                f"rank {rank} (machine {machine_rank}, local rank {e.error_index}, pid {e.error_pid}) died with "
                f"{how}; the other local processes were terminated", rank=rank, exit_code=e.exit_code) from None
        except mp.ProcessRaisedException as e:
            rank = machine_rank * num_processes + e.error_index
            hint = (f" A collective timed out ({timeout.total_seconds():g}s, $BGD_DIST_TIMEOUT): another rank "
                    f"died, hangs or took a different code path." if "Timed out" in str(e) else "")
            raise DistributedLaunchError(
                f"rank {rank} (machine {machine_rank}, local rank {e.error_index}, pid {e.error_pid}) raised an "
                f"exception; the other local processes were terminated.{hint} Its traceback:\n{e}",
                rank=rank, exit_code=1) from None
        path = os.path.join(result_dir, _RESULT_FILE)
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return pickle.load(f)
