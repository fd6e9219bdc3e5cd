"""ImageNet-style classification datasets.

Two layouts are understood:
- image folder: ``<root>/<wnid>/*.JPEG`` (torchvision ``ImageFolder`` layout);
- flat sample folder: ``<root>/<wnid>_<label>.JPEG`` (one image per class, as ``imagenet-sample``).

In both, the class index of a wnid is its position in ``imagenet_class_index.json`` (torchvision/Keras index)
when that file sits beside the folder or in ``$BGD_DATASETS``; else its position in the sorted wnids found,
which is torchvision's index only when all 1000 ImageNet classes are there (a subset gets a warning).
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Callable, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset
from torchvision import transforms as T

from .catalog import DatasetCatalog, datasets_root, open_rgb

__all__ = ["ImageList", "scan_image_folder", "eval_transform", "train_transform", "register_image_folder"]

logger = logging.getLogger(__name__)

_WNID = re.compile(r"^(n\d{8})")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(resize: int = 256, crop: int = 224) -> Callable:
    """torchvision's ImageNet evaluation transform (resize shorter side, center crop, normalise)."""
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(crop),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(crop: int = 224) -> Callable:
    """Random-resized crop + flip (distillation augmentation)."""
    return T.Compose([T.RandomResizedCrop(crop, scale=(0.25, 1.0)), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ImageList(Dataset):
    """Images with integer labels. Items: ``(Tensor[3, H, W], int)``."""

    def __init__(self, items: Sequence[Tuple[str, int]], transform: Optional[Callable] = None) -> None:
        self.items = list(items)
        self.transform = transform or eval_transform()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return self.transform(open_rgb(path)), label

    def with_transform(self, transform: Callable) -> "ImageList":
        return ImageList(self.items, transform)


CLASS_INDEX_FILE = "imagenet_class_index.json"


def _class_index(root: str, wnids: Sequence[str]) -> dict:
    for folder in (os.path.dirname(os.path.abspath(root)), datasets_root()):
        index_file = os.path.join(folder, CLASS_INDEX_FILE)
        if os.path.isfile(index_file):
            with open(index_file) as f:
                return {v[0]: int(k) for k, v in json.load(f).items()}
    found = sorted(set(wnids))
    if len(found) < 1000:
        logger.warning("%s: %d wnids and no %s beside it or in $BGD_DATASETS: class indices are their sorted "
                       "positions 0..%d, not the ImageNet-1k indices a 1000-class model predicts (fine for a "
                       "dataset of its own classes)", root, len(found), CLASS_INDEX_FILE, len(found) - 1)
    return {w: i for i, w in enumerate(found)}


def scan_image_folder(root: str) -> List[Tuple[str, int]]:
    """``(path, class index)`` for every image under ``root`` (either layout above), sorted by path."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"dataset folder not found: {root} (set $BGD_DATASETS; see datasets/README.md for the expected tree)"
        )
    exts = (".jpeg", ".jpg", ".png")
    subdirs = sorted(d for d in os.listdir(root) if _WNID.match(d) and os.path.isdir(os.path.join(root, d)))
    items: List[Tuple[str, str]] = []
    if subdirs:
        for wnid in subdirs:
            for f in sorted(os.listdir(os.path.join(root, wnid))):
                if f.lower().endswith(exts):
                    items.append((os.path.join(root, wnid, f), wnid))
    else:
        for f in sorted(os.listdir(root)):
            m = _WNID.match(f)
            if m and f.lower().endswith(exts):
                items.append((os.path.join(root, f), m.group(1)))
    if not items:
        raise FileNotFoundError(f"no ImageNet-style images (<wnid>/... or <wnid>_*.JPEG) under {root}")
    index = _class_index(root, [w for _, w in items])
    unknown = sorted({w for _, w in items if w not in index})
    if unknown:
        raise ValueError(f"{root}: wnids {unknown[:5]} are not in the class index")
    return [(p, index[w]) for p, w in items]


def register_image_folder(name: str, subdir: str, *, parity: Optional[int] = None) -> None:
    """Register ``name`` -> ImageList over ``$BGD_DATASETS/<subdir>``.

    Args:
        parity: keep only classes with ``index % 2 == parity`` (0: even, 1: odd); None keeps all.
    """

    def build() -> ImageList:
        items = scan_image_folder(os.path.join(datasets_root(), subdir))
        if parity is not None:
            items = [it for it in items if it[1] % 2 == parity]
        return ImageList(items)

    DatasetCatalog.register(name, build)


# Built-ins. imagenet-sample: one real image per class; even classes calibrate, odd classes evaluate.
register_image_folder("imagenet_sample", "imagenet-sample")
register_image_folder("imagenet_sample_even", "imagenet-sample", parity=0)
register_image_folder("imagenet_sample_odd", "imagenet-sample", parity=1)
register_image_folder("imagenet_train", "imagenet/train")
register_image_folder("imagenet_val", "imagenet/val")
