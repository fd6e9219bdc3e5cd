#!/usr/bin/env python
"""Train a detection teacher (Mask R-CNN v1 on an ImageNet ResNet-50) on DATASETS.CALIB with its annotations,
then score it on DATASETS.TEST; seeded (bgd_det/engine/detector_training.py; docs/detection_fidelity.md).

    BGD_DATASETS=.. python tools/train_detector.py --config configs/COCO/composite_mask_rcnn_R_50_FPN.yaml \\
        --backbone ../shared/assets/peers/pqf/resnet50_large.pth --out output/composite_teacher --iters 3000

--backbone: a BGD / PQF / bgd_det compressed ResNet-50 (decoded here), or a torchvision ResNet-50 state dict. Writes
OUT/model_final.pth (the MODEL.WEIGHTS of the compression config), OUT/train_log.json (settings, losses, wall
time, AP) and with --int8 OUT/model_final_int8.pth (a quarter of the size, for moving between machines;
``--unpack-int8 IN OUT`` turns it back into a state dict).
"""
import argparse
import dataclasses
import json
import logging
import os
import time

import torch

from bgd_det.checkpoint import dense_state_dict, file_sha256, load_checkpoint_model
from bgd_det.config import get_cfg, load_config
from bgd_det.engine.detector_training import (TrainSettings, from_int8, int8_state_dict, load_backbone,
                                              train_detector)
from bgd_det.modeling import build_model
from bgd_det.tasks import build_task
from bgd_det.utils.cli import run_tool
from bgd_det.utils.file_io import atomic_save, read_checkpoint_file
from bgd_det.utils.logger import setup_logger

logger = logging.getLogger("bgd_det.train_detector")


def _backbone_state(path: str):
    """Dense ResNet-50 state dict of any classification checkpoint the project reads (decoded when compressed)."""
    cfg = get_cfg()
    cfg.MODEL.ARCH = "resnet50"
    model, _ = load_checkpoint_model(path, cfg=cfg)
    return dense_state_dict(model)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="")
    p.add_argument("--backbone", help="ImageNet ResNet-50: a BGD / PQF checkpoint or a torchvision state dict")
    p.add_argument("--out")
    p.add_argument("--int8", action="store_true", help="also write OUT/model_final_int8.pth")
    p.add_argument("--unpack-int8", nargs=2, metavar=("IN", "OUT"), help="only turn an int8 file into weights")
    for f in dataclasses.fields(TrainSettings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default) if f.type != "bool" else int,
                       default=f.default)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    setup_logger()
    if args.unpack_int8:
        atomic_save(from_int8(read_checkpoint_file(args.unpack_int8[0], what="int8 weights")), args.unpack_int8[1])
        print(f"wrote {args.unpack_int8[1]}")
        return
    if not args.backbone or not args.out:
        p.error("--backbone and --out are required")
    settings = TrainSettings(**{f.name: type(f.default)(getattr(args, f.name))
                                for f in dataclasses.fields(TrainSettings)})
    cfg = load_config(args.config, ["DETECTION.LOSS", "supervised", "MODEL.WEIGHTS", "", *args.opts])
    task = build_task(cfg)
    model = build_model(cfg).cpu()
    load_backbone(model, _backbone_state(args.backbone))
    model.to(cfg.MODEL.DEVICE)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    log = train_detector(model, task, settings)
    train_s = time.perf_counter() - t0
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save(state, os.path.join(args.out, "model_final.pth"))
    if args.int8:
        atomic_save(int8_state_dict(state), os.path.join(args.out, "model_final_int8.pth"))
    t0 = time.perf_counter()
    metrics = task.evaluate(model, output_dir=args.out, desc="teacher")
    record = {"settings": dataclasses.asdict(settings), "config": args.config, "opts": args.opts,
              "backbone": args.backbone, "backbone_sha256": file_sha256(args.backbone),
              "device": str(cfg.MODEL.DEVICE), "torch": torch.__version__, "train_seconds": train_s,
              "eval_seconds": time.perf_counter() - t0, "metrics": metrics, "log": log}
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"trained {settings.iters} iterations in {train_s:.0f} s; {cfg.DATASETS.TEST}: "
          + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if not isinstance(v, (list, dict))))


if __name__ == "__main__":
    run_tool(main)
