"""File access: the project's own iopath PathManager (so users can register handlers without touching others'),
atomic ``torch.save`` and safe ``torch.load`` of checkpoint dicts with one-line errors."""
from __future__ import annotations

import os
from typing import Any, Dict

import torch
from iopath.common.file_io import PathManager as _PathManager

PathManager = _PathManager()
__all__ = ["PathManager", "atomic_save", "read_checkpoint_file", "one_line"]


def one_line(e: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` of an exception on one line, cut at ``limit`` characters."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written ``path``."""
    local = PathManager.get_local_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = local + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, local)


def read_checkpoint_file(path: str, *, what: str = "checkpoint") -> Dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only``, CPU); a missing or corrupt file: a one-line error.

    Args:
        what: how the file is named in the "not found" error (e.g. "compressed checkpoint").
    """
    local = PathManager.get_local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a pickle, disallowed global ...
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {one_line(e)}"
        ) from None
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj
