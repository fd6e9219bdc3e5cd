"""Copy-paste composite detection sets: real COCO instance masks pasted onto real ImageNet backgrounds.

No COCO-trained detector exists offline, so the detection fidelity measurement trains its own teacher on a set
made here (``tools/make_composite.py``; ``docs/detection_fidelity.md``). The source instances of ``coco-tiny``
(train and val files pooled) are split by *source image* (alternate images of the sorted image ids: even
positions -> train, odd -> test), and the backgrounds by ImageNet class parity (even classes -> train, odd ->
test), so neither an object nor a background of the test set is seen in training.

Each composite image is one background (longer side resized to ``size``) with 1..``max_objects`` instances, each
scaled so that its longer side is a log-uniform fraction of the image's shorter side, randomly flipped and placed;
a later object occludes earlier ones, whose masks lose the covered pixels (a placement that would hide more than
half of an earlier object is redrawn). Boxes are recomputed from the visible masks; masks are stored as RLE.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from .catalog import open_rgb
from .coco import decode_segmentation, load_coco_api

logger = logging.getLogger(__name__)

__all__ = ["Instance", "Sources", "load_sources", "source_instances", "shared_categories", "make_composite"]


@dataclass
class Instance:
    """One source object: ``rgb`` uint8[h, w, 3] and ``mask`` bool[h, w], cropped to the mask's box."""

    category_id: int
    rgb: np.ndarray
    mask: np.ndarray
    source: str  # "<file name>#<annotation id>"


@dataclass
class Sources:
    """The source COCO files, read once: ``images`` (image id, its ``COCO``, its image root), sorted by id, and
    ``names`` (category id -> name)."""

    images: List[Tuple[int, Any, str]]
    names: Dict[int, str]


def load_sources(json_files: Sequence[str], image_roots: Sequence[str]) -> Sources:
    """Read the COCO instances files (``json_files[i]``'s images under ``image_roots[i]``)."""
    images: List[Tuple[int, Any, str]] = []
    names: Dict[int, str] = {}
    for json_file, root in zip(json_files, image_roots):
        coco = load_coco_api(json_file)
        images += [(image_id, coco, root) for image_id in coco.imgs]
        names.update({c: cat["name"] for c, cat in coco.cats.items()})
    images.sort(key=lambda x: x[0])
    return Sources(images, names)


def source_instances(sources: Sources, *, half: int, min_area: float = 576.0) -> List[Instance]:
    """Non-crowd instances of area >= ``min_area`` from the source images of one half: ``half`` 0 takes the even
    positions of the sorted images, 1 the odd ones."""
    if half not in (0, 1):
        raise ValueError(f"half={half!r}; allowed: 0 (train) or 1 (test)")
    out: List[Instance] = []
    for image_id, coco, root in sources.images[half::2]:
        info = coco.imgs[image_id]
        rgb = np.asarray(open_rgb(os.path.join(root, info["file_name"])))
        for ann in sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a["id"]):
            if ann.get("iscrowd", 0) or ann["area"] < min_area:
                continue
            mask = decode_segmentation(ann["segmentation"], info["height"], info["width"]).astype(bool)
            ys, xs = np.nonzero(mask)
            if len(ys) == 0:
                continue
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            out.append(Instance(int(ann["category_id"]), rgb[y0:y1, x0:x1].copy(), mask[y0:y1, x0:x1].copy(),
                                f"{info['file_name']}#{ann['id']}"))
    return out


def shared_categories(train: Sequence[Instance], test: Sequence[Instance], *, min_count: int = 4) -> List[int]:
    """Category ids with at least ``min_count`` instances in both halves (sorted)."""
    count = [Counter(inst.category_id for inst in half) for half in (train, test)]
    return sorted(c for c in count[0] if min(count[0][c], count[1][c]) >= min_count)


def _resize(inst: Instance, long_side: int, flip: bool) -> Tuple[np.ndarray, np.ndarray]:
    h, w = inst.mask.shape
    s = long_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    rgb = np.asarray(Image.fromarray(inst.rgb).resize(size, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(inst.mask.astype(np.uint8) * 255).resize(size, Image.BILINEAR)) >= 128
    if flip:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    return rgb, mask


def _compose(background: Image.Image, instances: Sequence[Instance], rng: random.Random, *, size: int,
             max_objects: int, scale: Tuple[float, float]) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One composite: uint8[H, W, 3] and its visible ``(category id, bool[H, W] mask)`` objects."""
    s = size / max(background.size)
    bg = background.resize((max(1, round(background.width * s)), max(1, round(background.height * s))),
                           Image.BILINEAR)
    canvas = np.array(bg)
    height, width = canvas.shape[:2]
    objects: List[Tuple[int, np.ndarray, int]] = []  # category, full-image mask, pasted area
    for _ in range(rng.randint(1, max_objects)):
        inst = rng.choice(instances)
        long_side = round(min(height, width) * math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1]))))
        rgb, mask = _resize(inst, max(8, long_side), rng.random() < 0.5)
        h, w = mask.shape
        if h > height or w > width:
            continue
        for _attempt in range(10):
            y, x = rng.randint(0, height - h), rng.randint(0, width - w)
            full = np.zeros((height, width), bool)
            full[y:y + h, x:x + w] = mask
            if all((m & ~full).sum() >= 0.5 * area for _, m, area in objects):
                break
        else:
            continue
        canvas[full] = rgb[mask]
        objects = [(c, m & ~full, area) for c, m, area in objects]
        objects.append((inst.category_id, full, int(mask.sum())))
    return canvas, [(c, m) for c, m, _ in objects if m.sum() >= 16]


def make_composite(instances: Sequence[Instance], backgrounds: Sequence[str], out_dir: str, *,
                   categories: Dict[int, str], n_images: int, seed: int, size: int = 512, max_objects: int = 4,
                   scale: Tuple[float, float] = (0.2, 0.7), quality: int = 85) -> str:
    """Write ``n_images`` composites to ``out_dir/images/`` and a COCO instances file ``out_dir/annotations.json``.

    Args:
        instances: the source objects (only those of ``categories`` are pasted).
        backgrounds: image files, used in a seeded shuffled cycle (each once before any repeats).
        categories: category id -> name of the set.
        scale: range of an object's longer side as a fraction of the image's shorter side (log-uniform).
        quality: JPEG quality of the written images.

    Returns:
        The annotation file's path.
    """
    if n_images < 1 or not backgrounds:
        raise ValueError(f"n_images={n_images} with {len(backgrounds)} backgrounds; need >= 1 of each")
    pool = [inst for inst in instances if inst.category_id in categories]
    if not pool:
        raise ValueError(f"no source instance of categories {sorted(categories)}")
    rng = random.Random(seed)
    order: List[str] = []
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, n_images + 1):
        if not order:
            order = list(backgrounds)
            rng.shuffle(order)
        bg_path = order.pop()
        canvas, objects = _compose(open_rgb(bg_path), pool, rng, size=size, max_objects=max_objects, scale=scale)
        name = f"{image_id:06d}.jpg"
        Image.fromarray(canvas).save(os.path.join(out_dir, "images", name), quality=quality)
        images.append({"id": image_id, "file_name": name, "height": canvas.shape[0], "width": canvas.shape[1],
                       "background": os.path.basename(bg_path)})
        for category_id, mask in objects:
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "segmentation": rle, "area": float(mask_util.area(rle)),
                                "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": 0})
    path = os.path.join(out_dir, "annotations.json")
    data = {"info": {"description": "bgd_det copy-paste composite set", "seed": seed, "size": size,
                     "max_objects": max_objects, "scale": list(scale),
                     "sources": sorted({inst.source for inst in pool})},
            "images": images, "annotations": annotations,
            "categories": [{"id": c, "name": n} for c, n in sorted(categories.items())]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    logger.info("wrote %d images, %d objects of %d categories to %s", len(images), len(annotations),
                len(categories), out_dir)
    return path
