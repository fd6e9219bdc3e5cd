#!/usr/bin/env python
"""Wall time of a quantization job per layer against depth: the streaming engine beside the recompute reference.

For each engine the same job runs once (same config, seed and images); per layer it prints the total and the
capturing seconds, and per engine the least-squares slope of the capturing seconds against the layer's position
in execution order (seconds per layer of depth: about 0 when the cost is flat in depth) and the ratio of the
deepest to the shallowest 3x3 conv's capture time at equal captured rows.

    BGD_DATASETS=../shared/assets python benchmarks/bench_job.py --job r18_demo --images 32
    python benchmarks/bench_job.py --job r50 --images 16 --engines streaming recompute
    python benchmarks/bench_job.py --job mask_rcnn --images 4

Jobs: ``r18_demo`` (configs/ImageNet/demo_resnet18_mixed_blocks_sample.yaml, the real teacher), ``r50``
(configs/ImageNet/resnet50_small_blocks.yaml; ``--weights`` a dense R50 state dict, e.g. from
``tools/convert_checkpoint.py --from pqf --dense``, else random weights: timing does not depend on values),
``mask_rcnn`` (configs/COCO/demo_mask_rcnn_coco_tiny.yaml). Finetuning is off; ``--em-iters`` EM iterations.
"""
import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from bgd_det.config import load_config
from bgd_det.engine.quantizer import Quantizer
from bgd_det.modeling import build_teacher
from bgd_det.tasks import build_task
from bgd_det.utils.logger import setup_logger

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
JOBS = {
    "r18_demo": ("configs/ImageNet/demo_resnet18_mixed_blocks_sample.yaml", []),
    "r50": ("configs/ImageNet/resnet50_small_blocks.yaml", ["DATASETS.CALIB", "imagenet_sample_even"]),
    "mask_rcnn": ("configs/COCO/demo_mask_rcnn_coco_tiny.yaml", []),
}


def slope(xs: List[float], ys: List[float]) -> float:
    """Least-squares slope of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def run(job: str, engine: str, args) -> Dict:
    path, extra = JOBS[job]
    opts = extra + ["QUANT.ENGINE", engine, "QUANT.CAPTURE_IMAGES", args.images, "QUANT.EM_ITERS", args.em_iters,
                    "FINETUNE.LAYER_ITERS", 0, "FINETUNE.GLOBAL_ITERS", 0, "OUTPUT_DIR", "", "SEED", args.seed]
    if args.weights:
        opts += ["MODEL.WEIGHTS", args.weights]
    elif job == "r50":
        opts += ["MODEL.WEIGHTS", ""]
    cfg = load_config(path, [str(o) for o in opts + args.opts])
    task, teacher = build_task(cfg), build_teacher(cfg)
    t0 = time.perf_counter()
    result = Quantizer(cfg, teacher, task).run()
    return {"total": time.perf_counter() - t0, "records": result.records, "timings": result.timings}


def summary(records) -> Dict[str, float]:
    capture = [r.capture_seconds for r in records]
    convs = [r for r in records if r.block_size in (9, 18)]
    out = {"slope": slope(list(range(len(capture))), capture)}
    if len(convs) >= 2:
        out["deep_over_shallow"] = convs[-1].capture_seconds / max(convs[0].capture_seconds, 1e-9)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=sorted(JOBS), default="r18_demo")
    p.add_argument("--images", type=int, default=32, help="QUANT.CAPTURE_IMAGES")
    p.add_argument("--em-iters", type=int, default=10)
    p.add_argument("--engines", nargs="+", default=["streaming", "recompute"])
    p.add_argument("--weights", default="", help="MODEL.WEIGHTS (r50: a dense state dict)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="more KEY VALUE config overrides")
    args = p.parse_args()
    setup_logger()
    logging.getLogger("bgd_det").setLevel(logging.WARNING)
    if not ASSETS.is_dir():
        sys.exit(f"bench_job needs the real images in {ASSETS} (absent)")
    os.environ.setdefault("BGD_DATASETS", str(ASSETS))
    runs = {engine: run(args.job, engine, args) for engine in args.engines}
    names = [r.name for r in runs[args.engines[0]]["records"]]
    print(f"{args.job}: {len(names)} layers, {args.images} capture images, {torch.get_num_threads()} threads")
    header = " | ".join(f"{e} s (capture s)" for e in args.engines)
    print(f"| # | layer | {header} |\n|---|---|" + "---|" * len(args.engines))
    for i, name in enumerate(names):
        cells = " | ".join(f"{runs[e]['records'][i].seconds:.1f} ({runs[e]['records'][i].capture_seconds:.1f})"
                           for e in args.engines)
        print(f"| {i} | {name} | {cells} |")
    for engine in args.engines:
        s = summary(runs[engine]["records"])
        t = runs[engine]["timings"]
        print(f"{engine}: job {runs[engine]['total']:.1f}s, layers {t['layers']:.1f}s "
              f"({t['layers_capturing']:.1f}s capturing), capture slope {s['slope']:+.3f} s per layer of depth"
              + (f", deepest / first 3x3 conv capture {s['deep_over_shallow']:.2f}x" if "deep_over_shallow" in s
                 else "") + f", process peak RSS so far {t['peak_rss_mib']:.0f} MiB")
    if len(args.engines) == 2:
        a, b = (runs[e]["timings"]["layers"] for e in args.engines)
        print(f"layers: {args.engines[1]} / {args.engines[0]} = {b / a:.2f}x")


if __name__ == "__main__":
    main()
