"""Walk-through of torchvision architectures from the command line, offline: every config of
``configs/ImageNet/torchvision/`` through ``tools/quantize_net.py`` on the real ``imagenet-sample`` images.

No float torchvision weights exist offline, so each teacher is the architecture's random initialisation with its
BatchNorm running statistics calibrated on the calibration images (train-mode forwards, cumulative average): a
stand-in that checks the plumbing (plan, capture, EM, corrections, checkpoint, reload, report) and gives a label-free
fidelity figure (KL to the teacher, top-1 agreement), not an accuracy: a random network has no structure for a
codebook to find, so these figures are far below a trained teacher's. The only code here is that teacher; the
compression itself is the command line a user runs, with overrides that make it fit 2 CPU cores (small input, few
images, short EM). ``--bn-correction`` repeats a run per QUANT.BN_CORRECTION mode (the issue's SiLU / SE check).

Usage::

    BGD_DATASETS=../shared/assets python benchmarks/walkthrough.py --archs mobilenet_v2 efficientnet_b0 \
        --bn-correction mean_var none
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
import torchvision

from bgd_det.config import load_config
from bgd_det.modeling import build_model
from bgd_det.tasks.classification import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "ImageNet" / "torchvision"
ARCHS = ("mobilenet_v2", "efficientnet_b0", "regnet_y_400mf", "resnext50_32x4d", "swin_t", "vit_b_16")
#: input side per architecture (ViT's position embedding fixes 224; Swin needs a multiple of 32)
SIZES = {"vit_b_16": 224}


def small_opts(arch: str, args) -> List[str]:
    size = SIZES.get(arch, args.size)
    return ["INPUT.RESIZE", str(size * 8 // 7), "INPUT.CROP", str(size), "DATASETS.CALIB", "imagenet_sample_even",
            "DATASETS.TEST", "imagenet_sample_odd", "QUANT.CAPTURE_IMAGES", str(args.images),
            "QUANT.CAPTURE_BATCH_SIZE", "8", "QUANT.EM_ITERS", str(args.em_iters), "FINETUNE.LAYER_ITERS", "0",
            "FINETUNE.GLOBAL_ITERS", str(args.global_iters), "FINETUNE.BATCH_SIZE", "8", "TEST.BATCH_SIZE", "25",
            "DATASETS.TEST_MAX_IMAGES", str(args.test_images), "SEED", "0"]


def calibrated_teacher(arch: str, opts: List[str], path: str, images: int, logit_std: float = 4.0) -> None:
    """Random-init ``arch`` with BatchNorm statistics averaged over ``images`` calibration images and a new random
    classifier on the centred features, scaled so that each logit varies across those images with standard
    deviation ``logit_std`` (a random head gives nearly the same prediction for every image; ViT's is zero), saved
    at ``path``."""
    cfg = load_config(str(CONFIGS / f"{arch}.yaml"), ["MODEL.WEIGHTS", "", *opts])
    torch.manual_seed(0)
    model = build_model(cfg)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    task = ClassificationTask(cfg)
    inputs = [task.model_input(b) for b in task.calib_batches(n_images=images, batch_size=8, augment=False, seed=0)]
    model.train()
    with torch.no_grad():
        for x in inputs:
            model(x)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    features: List[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: features.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        for x in inputs:
            model(x)
        handle.remove()
        f = torch.cat(features)
        mean = f.mean(0)
        weight = torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0))
        weight *= logit_std / ((f - mean) @ weight.T).std(0).mean()
        head.weight.copy_(weight)
        head.bias.copy_(-weight @ mean)
    torch.save(model.state_dict(), path)


def run(arch: str, bn_mode: str, teacher: str, opts: List[str], out: str) -> Dict:
    cmd = [sys.executable, str(ROOT / "tools" / "quantize_net.py"), "--config", str(CONFIGS / f"{arch}.yaml"),
           "MODEL.WEIGHTS", teacher, "QUANT.BN_CORRECTION", bn_mode, "OUTPUT_DIR", out, *opts]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = {"arch": arch, "bn_correction": bn_mode, "seconds": round(time.time() - t0), "rc": proc.returncode}
    if proc.returncode:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    report = json.load(open(os.path.join(out, "report.json")))
    comp, unc = report["metrics"]["compressed"], report["metrics"]["uncompressed"]
    row.update(mib=round(report["compressed_mib"], 2), ratio=round(report["ratio"], 1),
               fp32_left=len(report.get("unquantized", [])), kl=round(comp.get("kl_to_reference", float("nan")), 3),
               agreement=round(comp.get("top1_agreement", float("nan")), 1), teacher_top1=unc.get("top1"))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--bn-correction", nargs="+", default=["mean_var"], choices=["mean_var", "mean", "none"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=64, help="calibration images (teacher BN statistics and capture)")
    p.add_argument("--test-images", type=int, default=100)
    p.add_argument("--em-iters", type=int, default=10)
    p.add_argument("--global-iters", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            opts = small_opts(arch, args)
            teacher = os.path.join(tmp, f"{arch}_teacher.pth")
            calibrated_teacher(arch, opts, teacher, args.images)
            for mode in args.bn_correction:
                rows.append(run(arch, mode, teacher, opts, os.path.join(tmp, f"{arch}_{mode}")))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "torchvision": torchvision.__version__, "args": vars(args),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
