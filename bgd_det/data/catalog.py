"""Dataset catalog: names -> functions that build datasets, rooted at ``$BGD_DATASETS`` (default ``./datasets``)."""
from __future__ import annotations

import os
from typing import Callable, Dict, List

__all__ = ["DatasetCatalog", "datasets_root"]


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
