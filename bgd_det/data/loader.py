"""Data loaders of the tasks, with the DATASETS.BAD_IMAGES policy for images that cannot be decoded."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, List, Optional

from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from .catalog import UnreadableImage, num_workers

__all__ = ["build_loader"]

logger = logging.getLogger(__name__)


class _SkipUnreadable(Dataset):
    """``dataset`` whose unreadable items are None."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.skipped = dataset, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except UnreadableImage as e:
            self.skipped += 1
            logger.warning("skipped (%d so far in this loader): %s", self.skipped, e)
            return None


class _NonEmptyBatches:
    """The loader's batches, less those whose every image was skipped (None)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return (batch for batch in self.loader if batch is not None)


def build_loader(dataset: Dataset, *, batch_size: int, cfg, collate_fn: Optional[Callable[[List], Any]] = None):
    """A sequential DataLoader of ``dataset`` with ``cfg.DATALOADER.NUM_WORKERS`` and ``cfg.DATASETS.BAD_IMAGES``
    (checked by ``build_task``)."""
    collate = collate_fn or default_collate
    workers = num_workers(cfg.DATALOADER.NUM_WORKERS)
    if cfg.DATASETS.BAD_IMAGES != "skip":
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)

    def drop_skipped(items: List) -> Any:
        kept = [item for item in items if item is not None]
        return collate(kept) if kept else None

    return _NonEmptyBatches(DataLoader(_SkipUnreadable(dataset), batch_size=batch_size, shuffle=False,
                                       num_workers=workers, collate_fn=drop_skipped))
