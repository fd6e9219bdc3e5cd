"""COCO-style instance-segmentation datasets (detectron2's ``register_coco_instances``, over pycocotools).

A registered dataset is built lazily by :data:`DatasetCatalog` (``DatasetCatalog.get(name)``); relative paths are
resolved under ``$BGD_DATASETS`` (default ``./datasets``) at that moment. Built-ins (see ``datasets/README.md``):

=================  =====================================================  ==================================
name               annotations                                            images
=================  =====================================================  ==================================
coco_2017_train    ``coco/annotations/instances_train2017.json``          ``coco/train2017/``
coco_2017_val      ``coco/annotations/instances_val2017.json``            ``coco/val2017/``
coco_tiny_train    ``coco-tiny/annotations/instances_train2017.json``     ``coco-tiny/images/train2017/``
coco_tiny_val      ``coco-tiny/annotations/instances_val2017.json``       ``coco-tiny/images/val2017/``
=================  =====================================================  ==================================

Labels: a model with ``num_classes == len(categories) + 1`` uses contiguous labels (sorted category ids ->
1..N, 0 = background, detectron2's convention); a model with more classes than the largest category id uses the
category ids themselves (torchvision's COCO models, ``num_classes=91``). :func:`label_map` decides, and raises when
neither fits (with 91 classes, the category names must be COCO's too).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision.models._meta import _COCO_CATEGORIES
from torchvision.transforms.functional import pil_to_tensor

from .catalog import DatasetCatalog, datasets_root, open_rgb

logger = logging.getLogger(__name__)

__all__ = ["CocoInstances", "load_coco_api", "valid_annotations", "register_coco_instances", "label_map",
           "annotations_to_target", "hflip", "decode_segmentation"]


def load_coco_api(json_file: str) -> COCO:
    """A pycocotools ``COCO`` of ``json_file``, with one clear error for a missing or malformed file."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"COCO annotation file not found: {json_file} (set $BGD_DATASETS; see datasets/README.md)"
        )
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"COCO annotation file {json_file} is not valid JSON: {e}") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"COCO annotation file {json_file} has no {missing} (not a COCO instances file)")
    data["annotations"] = valid_annotations(data, json_file)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _segmentation_fault(segm: Any) -> Optional[str]:
    """Why ``segm`` cannot be decoded into a mask, or None. Polygons of fewer than 3 points are dropped from the
    list in place (detectron2 drops them too); an annotation left with none is degenerate."""
    if isinstance(segm, list):
        segm[:] = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        return None if segm else "no polygon of 3 or more points"
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        return None
    return f"segmentation of type {type(segm).__name__} is neither polygons nor RLE"


def valid_annotations(data: Mapping[str, Any], json_file: str) -> List[Dict]:
    """The annotations of a COCO instances dict that every consumer (targets, masks, COCOeval) can use.

    Dropped, with one warning that counts them by reason (as detectron2's loader does): annotations of an unknown
    image or category, a box of zero or negative size, or a segmentation with no usable polygon. Checked when the
    file is loaded, before any model runs.
    """
    images = {img["id"] for img in data["images"]}
    cats = {c["id"] for c in data["categories"]}
    kept: List[Dict] = []
    dropped: Dict[str, int] = {}
    for ann in data["annotations"]:
        box = ann.get("bbox")
        if ann.get("image_id") not in images:
            why = "unknown image_id"
        elif ann.get("category_id") not in cats:
            why = "unknown category_id"
        elif not (isinstance(box, list) and len(box) == 4 and box[2] > 0 and box[3] > 0):
            why = "empty or malformed bbox"
        else:
            why = _segmentation_fault(ann["segmentation"]) if "segmentation" in ann else None
        if why is None:
            kept.append(ann)
        else:
            dropped[why] = dropped.get(why, 0) + 1
    if dropped:
        logger.warning("%s: dropped %d of %d annotations (%s)", json_file, sum(dropped.values()),
                       len(data["annotations"]), ", ".join(f"{n} {why}" for why, n in sorted(dropped.items())))
    if any("keypoints" in ann for ann in kept):
        logger.warning("%s: its keypoints are ignored (boxes and masks are used)", json_file)
    return kept


class CocoInstances(Dataset):
    """Images of a COCO instances file, in ascending image-id order.

    Items: ``{"image": Tensor[3, H, W] float in [0, 1], "image_id": int, "height": int, "width": int,
    "annotations": list of COCO annotation dicts}``.

    Attributes:
        name, json_file, image_root; coco: the pycocotools ``COCO`` ground truth; image_ids: sorted image ids;
        cat_ids: sorted category ids; thing_classes: category names in ``cat_ids`` order.
    """

    def __init__(self, name: str, json_file: str, image_root: str, *, coco: Optional[COCO] = None) -> None:
        if not os.path.isdir(image_root):
            raise FileNotFoundError(
                f"image folder of dataset {name!r} not found: {image_root} (set $BGD_DATASETS; see "
                f"datasets/README.md)"
            )
        self.name, self.json_file, self.image_root = name, json_file, image_root
        self.coco = coco if coco is not None else load_coco_api(json_file)
        self.image_ids: List[int] = sorted(self.coco.imgs)
        self.cat_ids: List[int] = sorted(self.coco.cats)
        self.thing_classes = [self.coco.cats[c]["name"] for c in self.cat_ids]
        if not self.cat_ids:
            raise ValueError(f"COCO annotation file {json_file} lists no categories")

    def __len__(self) -> int:
        return len(self.image_ids)

    def label_map(self, num_classes: int) -> Dict[int, int]:
        """Category id -> label of a model with ``num_classes`` classes (:func:`label_map`)."""
        return label_map(self.cat_ids, num_classes, dataset=self.name,
                         names={c: self.coco.cats[c]["name"] for c in self.cat_ids})

    def image_path(self, image_id: int) -> str:
        return os.path.join(self.image_root, self.coco.imgs[image_id]["file_name"])

    def __getitem__(self, i: int) -> Dict[str, Any]:
        image_id = self.image_ids[i]
        info = self.coco.imgs[image_id]
        path = self.image_path(image_id)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {path} of dataset {self.name!r} (id {image_id}) not found")
        image = pil_to_tensor(open_rgb(path)).float().div_(255.0)
        return {"image": image, "image_id": image_id, "height": int(info["height"]), "width": int(info["width"]),
                "annotations": self.coco.imgToAnns.get(image_id, [])}


def label_map(cat_ids: Sequence[int], num_classes: int, *, dataset: str = "dataset",
              names: Optional[Mapping[int, str]] = None) -> Dict[int, int]:
    """Category id -> model label (0 is background).

    Args:
        cat_ids: the dataset's category ids; num_classes: the model's classes including background.
        names: category id -> name; with ``num_classes == 91`` (torchvision's COCO label space) every name must
            be COCO's name of that id.

    Raises:
        ValueError: when the model's classes fit neither contiguous labels nor the category ids.
    """
    cat_ids = sorted(int(c) for c in cat_ids)
    if num_classes == len(cat_ids) + 1:
        return {c: i + 1 for i, c in enumerate(cat_ids)}
    if cat_ids and min(cat_ids) >= 1 and max(cat_ids) < num_classes:
        if num_classes == len(_COCO_CATEGORIES) and names is not None:
            wrong = [(c, names[c], _COCO_CATEGORIES[c]) for c in cat_ids if names[c] != _COCO_CATEGORIES[c]]
            if wrong:
                raise ValueError(
                    f"category mismatch: the model uses torchvision's 91 COCO classes (labels = COCO category ids) "
                    f"but the categories of {dataset} are not COCO's: (id, name, COCO name) {wrong[:3]}; set "
                    f"MODEL.NUM_CLASSES {len(cat_ids) + 1} for contiguous labels"
                )
        return {c: c for c in cat_ids}
    raise ValueError(
        f"category mismatch: the model has {num_classes} classes (MODEL.NUM_CLASSES, or the checkpoint's), but "
        f"{dataset} has {len(cat_ids)} categories with ids {cat_ids[0]}..{cat_ids[-1]}; allowed: "
        f"{len(cat_ids) + 1} (contiguous labels) or more than {cat_ids[-1]} (category ids as labels, as "
        f"torchvision's 91-class COCO models)"
    )


def annotations_to_target(annotations: Sequence[Dict], *, height: int, width: int, labels: Dict[int, int],
                          with_masks: bool = True) -> Dict[str, torch.Tensor]:
    """torchvision detection target of one image's non-crowd annotations.

    Returns:
        ``{"boxes": Tensor[N, 4] float xyxy, "labels": Tensor[N] int64, "masks": Tensor[N, H, W] uint8}``
        (masks only when ``with_masks``); annotations with empty boxes are dropped.
    """
    boxes, classes, masks = [], [], []
    for ann in annotations:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            continue
        boxes.append([x, y, min(x + w, width), min(y + h, height)])
        classes.append(labels[ann["category_id"]])
        if with_masks:
            masks.append(decode_segmentation(ann["segmentation"], height, width))
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(classes, dtype=torch.int64)}
    if with_masks:
        target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                           else torch.zeros(0, height, width, dtype=torch.uint8))
    return target


def hflip(image: torch.Tensor, target: Optional[Dict[str, torch.Tensor]]
          ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
    """Mirror Tensor[3, H, W] ``image`` and its detection ``target`` (boxes, masks) left-right."""
    image = image.flip(-1)
    if target is not None:
        target = dict(target)
        w = image.shape[-1]
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
    return image, target


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
    """bool-like uint8[H, W] mask of one COCO segmentation (polygons, uncompressed or compressed RLE)."""
    if isinstance(segm, list):  # polygons
        rle = mask_util.merge(mask_util.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):  # uncompressed RLE
        rle = mask_util.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_util.decode(rle).astype(np.uint8)


def register_coco_instances(name: str, json_file: str, image_root: str) -> None:
    """Register ``name`` -> :class:`CocoInstances` of ``json_file`` and ``image_root``.

    Relative paths are taken under ``$BGD_DATASETS`` (default ``./datasets``) when the dataset is built.
    """

    def build() -> CocoInstances:
        root = datasets_root()
        return CocoInstances(name, os.path.join(root, json_file), os.path.join(root, image_root))

    DatasetCatalog.register(name, build)


register_coco_instances("coco_2017_train", "coco/annotations/instances_train2017.json", "coco/train2017")
register_coco_instances("coco_2017_val", "coco/annotations/instances_val2017.json", "coco/val2017")
register_coco_instances("coco_tiny_train", "coco-tiny/annotations/instances_train2017.json",
                        "coco-tiny/images/train2017")
register_coco_instances("coco_tiny_val", "coco-tiny/annotations/instances_val2017.json", "coco-tiny/images/val2017")
