#!/usr/bin/env python
"""Make the copy-paste composite detection sets (bgd_det/data/composite.py) from coco-tiny and imagenet-sample.

    BGD_DATASETS=../shared/assets python tools/make_composite.py --out ../composite

writes OUT/train (even-class backgrounds, instances of the even source images) and OUT/test (odd-class
backgrounds, instances of the odd source images), each ``annotations.json`` + ``images/``. Register them for the
other tools with ``DATASETS.REGISTER [["composite_train", "coco", "OUT/train/annotations.json", "OUT/train/images"],
...]`` (configs/COCO/composite_mask_rcnn_R_50_FPN.yaml does, under ``$BGD_COMPOSITE``). Seeded: the same
arguments give the same files.
"""
import argparse
import logging
import os

from bgd_det.data.catalog import datasets_root
from bgd_det.data.composite import load_sources, make_composite, shared_categories, source_instances
from bgd_det.data.imagenet import scan_image_folder
from bgd_det.utils.cli import run_tool
from bgd_det.utils.logger import setup_logger

logger = logging.getLogger("bgd_det.make_composite")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (train/ and test/ are made in it)")
    p.add_argument("--coco", default="coco-tiny", help="source COCO folder under $BGD_DATASETS")
    p.add_argument("--backgrounds", default="imagenet-sample", help="ImageNet-style folder under $BGD_DATASETS")
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--test-images", type=int, default=250)
    p.add_argument("--size", type=int, default=512, help="longer side of the composites (pixels)")
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--min-area", type=float, default=576.0, help="smallest source instance (pixels)")
    p.add_argument("--min-count", type=int, default=4, help="instances a category needs in each half")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    setup_logger()
    root = os.path.join(datasets_root(), args.coco)
    files = [os.path.join(root, "annotations", f"instances_{s}2017.json") for s in ("train", "val")]
    folders = [os.path.join(root, "images", f"{s}2017") for s in ("train", "val")]
    sources = load_sources(files, folders)
    halves = [source_instances(sources, half=h, min_area=args.min_area) for h in (0, 1)]
    cats = shared_categories(*halves, min_count=args.min_count)
    categories = {c: sources.names[c] for c in cats}
    backgrounds = scan_image_folder(os.path.join(datasets_root(), args.backgrounds))
    for split, half, n in (("train", 0, args.train_images), ("test", 1, args.test_images)):
        pool = [inst for inst in halves[half] if inst.category_id in categories]
        logger.info("%s: %d source instances (%s)", split, len(pool),
                    ", ".join(f"{categories[c]} {sum(i.category_id == c for i in pool)}" for c in cats))
        make_composite(halves[half], [path for path, label in backgrounds if label % 2 == half],
                       os.path.join(args.out, split), categories=categories, n_images=n,
                       seed=args.seed * 2 + half, size=args.size, max_objects=args.max_objects)
    print(f"categories: {categories} (MODEL.NUM_CLASSES {len(categories) + 1})")


if __name__ == "__main__":
    run_tool(main)
