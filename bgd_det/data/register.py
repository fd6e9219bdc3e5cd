"""Datasets registered from the config (``DATASETS.REGISTER``), so a user's own data needs no Python."""
from __future__ import annotations

import os
from typing import Dict, Sequence, Tuple

from .catalog import DatasetCatalog, datasets_root
from .coco import register_coco_instances
from .imagenet import register_image_folder

__all__ = ["register_from_config", "DATASET_KINDS"]

#: kind -> the paths an entry gives after its name and kind
DATASET_KINDS = {"coco": ("annotation file", "image folder"), "imagefolder": ("image folder",)}
_REGISTERED: Dict[str, Tuple[str, ...]] = {}  # name -> entry, for the entries registered here


def register_from_config(entries: Sequence[Sequence[str]]) -> None:
    """Register every ``[name, kind, *paths]`` of ``DATASETS.REGISTER`` (``kind`` in :data:`DATASET_KINDS`; relative
    paths under ``$BGD_DATASETS``). Each entry is checked now (shape, kind, files present); the same entry again is
    a no-op, another entry under a registered name an error."""
    for entry in entries:
        entry = tuple(str(x) for x in entry) if isinstance(entry, (list, tuple)) else (str(entry),)
        kind = entry[1] if len(entry) > 1 else ""
        if kind not in DATASET_KINDS or len(entry) != 2 + len(DATASET_KINDS[kind]):
            forms = "; ".join(f"[name, {k!r}, {', '.join(p)}]" for k, p in DATASET_KINDS.items())
            raise ValueError(f"DATASETS.REGISTER entry {list(entry)}; allowed: {forms}")
        name, paths = entry[0], entry[2:]
        if _REGISTERED.get(name) == entry:
            continue
        if name in DatasetCatalog:
            raise ValueError(f"DATASETS.REGISTER: dataset {name!r} is already registered; choose another name")
        for what, path in zip(DATASET_KINDS[kind], paths):
            full = os.path.join(datasets_root(), path)
            if not (os.path.isfile(full) if what == "annotation file" else os.path.isdir(full)):
                raise FileNotFoundError(f"DATASETS.REGISTER {name!r}: {what} {full} not found (relative paths are "
                                        f"under $BGD_DATASETS)")
        if kind == "coco":
            register_coco_instances(name, *paths)
        else:
            register_image_folder(name, *paths)
        _REGISTERED[name] = entry
