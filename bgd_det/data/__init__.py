"""Datasets: a catalog of named datasets and their builders."""
from . import coco, imagenet  # noqa: F401  (registers built-in datasets)
from .catalog import DatasetCatalog, datasets_root, num_workers  # noqa: F401
