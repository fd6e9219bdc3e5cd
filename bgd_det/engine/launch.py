"""``launch()``: run ``main`` in one process, or in several with torch.distributed (as detectron2)."""
from __future__ import annotations

import logging
from typing import Any, Callable, Tuple

logger = logging.getLogger(__name__)

__all__ = ["launch"]


def launch(main_func: Callable[..., Any], num_processes: int = 1, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args: Tuple = ()) -> Any:
    """Call ``main_func(*args)``. Several processes are not supported yet in this build."""
    if num_processes * num_machines > 1:
        raise NotImplementedError("multi-process launch is not available yet")
    return main_func(*args)
