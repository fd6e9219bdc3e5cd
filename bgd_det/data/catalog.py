"""Dataset catalog: names -> functions that build datasets, rooted at ``$BGD_DATASETS`` (default ``./datasets``)."""
from __future__ import annotations

import os
from typing import Callable, Dict, List

__all__ = ["DatasetCatalog", "datasets_root", "open_rgb", "UnreadableImage", "num_workers"]


def datasets_root() -> str:
    """``$BGD_DATASETS`` if set, else ``./datasets``."""
    return os.path.expanduser(os.environ.get("BGD_DATASETS", "datasets"))


class _DatasetCatalog:
    """Global name -> builder map. ``get(name)`` calls the builder (lazily touching the disk)."""

    def __init__(self) -> None:
        self._builders: Dict[str, Callable[[], object]] = {}

    def register(self, name: str, builder: Callable[[], object]) -> None:
        if name in self._builders:
            raise KeyError(f"dataset {name!r} is already registered")
        self._builders[name] = builder

    def get(self, name: str):
        if name not in self._builders:
            raise KeyError(f"unknown dataset {name!r}; registered datasets: {self.list()}")
        return self._builders[name]()

    def list(self) -> List[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders


DatasetCatalog = _DatasetCatalog()


def num_workers(setting: int) -> int:
    """DataLoader workers for DATALOADER.NUM_WORKERS: the value when >= 0; -1 (automatic): half the CPU cores up to
    8, and none on a machine of <= 2 cores (a worker would take a core from the model's threads)."""
    if setting >= 0:
        return setting
    if setting != -1:
        raise ValueError(f"DATALOADER.NUM_WORKERS={setting}; allowed: -1 (automatic) or an integer >= 0")
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores // 2)


class UnreadableImage(ValueError):
    """An image file that cannot be decoded (truncated, not an image); the message names it."""


def open_rgb(path: str):
    """The image at ``path`` as an RGB ``PIL.Image`` (loaded); an unreadable or truncated file is a one-line
    ``ValueError`` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableImage(f"unreadable image {path} ({type(e).__name__}: {e}); remove or replace the file, or "
                              f"set DATASETS.BAD_IMAGES skip") from None

