"""Just-in-time build of the compiled ``bgd::`` ops (``torch.utils.cpp_extension.load`` + ninja).

The library is compiled once into a cache directory and reused by every later process:
``$BGD_EXT_DIR`` if set, else ``~/.cache/bgd_det_ext/<torch version>-<python>``. Sources changing
triggers a rebuild (torch hashes the sources and flags). Set ``BGD_NO_EXT=1`` to skip the build and
use the reference decode.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import torch

logger = logging.getLogger(__name__)

__all__ = ["build_dir", "load_library"]

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = [os.path.join(_CSRC, "ops.cpp"), os.path.join(_CSRC, "kernels.cpp")]
NAME = "bgd_det_ops"


def build_dir() -> str:
    """Directory holding the built library (created if missing)."""
    path = os.environ.get("BGD_EXT_DIR")
    if not path:
        py = f"py{sys.version_info[0]}{sys.version_info[1]}"
        tag = f"torch{torch.__version__.replace('+', '_')}-{py}"
        path = os.path.join(os.path.expanduser("~"), ".cache", "bgd_det_ext", tag)
    os.makedirs(path, exist_ok=True)
    return path


def load_library(*, verbose: bool = False) -> Optional[str]:
    """Build (if needed) and load the ops library into ``torch.ops.bgd``.

    Returns:
        None on success, else a one-line reason why the ops are not available.
    """
    if os.environ.get("BGD_NO_EXT", "") not in ("", "0"):
        return "disabled by BGD_NO_EXT"
    try:
        from torch.utils.cpp_extension import load

        load(
            name=NAME,
            sources=SOURCES,
            # -fopenmp: at::parallel_for is inline and only runs in parallel when compiled with
            # OpenMP (it binds to the libgomp that torch already loaded).
            extra_cflags=["-O3", "-DNDEBUG", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[_CSRC],
            with_cuda=False,
            build_directory=build_dir(),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as e:  # no compiler, no ninja, compile error: fall back, never crash
        first = str(e).strip().splitlines()
        return f"{type(e).__name__}: {first[-1] if first else ''}"[:300]
    return None
