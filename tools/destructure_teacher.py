#!/usr/bin/env python
"""Make a de-structured teacher: a function-preserving re-parametrisation of a decoded ResNet (see
bgd_det/modeling/destructure.py), checked on real images before it is written.

    python tools/destructure_teacher.py --arch resnet18 --spread 0.5 --seed 0 \\
        ../shared/assets/teachers/resnet18_pqf_small_dense.pth teachers/resnet18_destructured.pth

Prints the logits' largest relative difference and the fraction of identical top-1 / top-5 predictions on
DATASETS.TEST images (default: all of imagenet_sample, $BGD_DATASETS), and per layer the distinct sub-vectors
before and after (d = 9 for kxk convs, 4 for 1x1 and fc). Refuses to write when the function moved by more than
--tolerance or any prediction changed.
"""
import argparse
import logging
import sys
from pathlib import Path

import torch

from bgd_det.config import load_config
from bgd_det.modeling import build_teacher
from bgd_det.modeling.destructure import compare_logits, destructure_resnet, structure_report
from bgd_det.tasks import build_task
from bgd_det.utils.cli import run_tool
from bgd_det.utils.logger import setup_logger

logger = logging.getLogger("bgd_det.destructure_teacher")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--spread", type=float, default=0.5, help="std of the log-scales")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="imagenet_sample", help="images of the function check")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest relative logit difference allowed")
    p.add_argument("src", metavar="IN", help="dense torchvision state dict")
    p.add_argument("out", metavar="OUT")
    args = p.parse_args(argv)
    setup_logger()
    cfg = load_config("", ["MODEL.ARCH", args.arch, "MODEL.WEIGHTS", args.src, "DATASETS.TEST", args.dataset])
    try:
        teacher = build_teacher(cfg).eval()
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    model = destructure_resnet(build_teacher(cfg).eval(), spread=args.spread, seed=args.seed)
    check = compare_logits(teacher, model, build_task(cfg).test_loader())
    sizes = {"kxk": 9, "1x1": 4, "linear": 4}
    before, after = structure_report(teacher, sizes), structure_report(model, sizes)
    print("| layer | d | sub-vectors | distinct before | distinct after |\n|---|---|---|---|---|")
    for name, row in after.items():
        print(f"| {name} | {row['d']} | {row['subvectors']} | {before[name]['distinct']} | {row['distinct']} |")
    print(f"spread {args.spread}, seed {args.seed}: logits max relative difference {check['max_rel_diff']:.2e}, "
          f"top-1 identical {100 * check['top1_same']:.1f}%, top-5 identical {100 * check['top5_same']:.1f}% "
          f"on {check['n_images']} images of {args.dataset}")
    if check["max_rel_diff"] > args.tolerance or check["top1_same"] < 1 or check["top5_same"] < 1:
        sys.exit(f"error: the re-parametrised model moved (see above; --tolerance {args.tolerance}); not written")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_tool(main)
