"""How much of a compressed layer's output error its inputs bring (drift) and how much its own codes add.

For each named layer, on held-out images, three outputs are compared after removing each channel's mean (the
BatchNorm that follows restores means): the teacher's layer on the teacher's input (the reference), the teacher's
layer on the compressed model's input (drift only) and the compressed layer on the compressed model's input
(what the model computes). Prints their relative errors, ``||y - y_ref|| / ||y_ref||`` over all images, positions
and channels::

    python benchmarks/layer_drift.py --checkpoint out/model_final.pth --teacher resnet50:/tmp/teachers/r50.pth \
        --split imagenet_sample_odd --images 100 --layers layer4.0.conv1 layer4.0.downsample.0
"""
from __future__ import annotations

import argparse
import logging
from typing import List, Sequence

import torch
from tabulate import tabulate
from torch import Tensor, nn

from bgd_det.checkpoint import load_checkpoint_model
from bgd_det.config import get_cfg
from bgd_det.data import DatasetCatalog
from bgd_det.modeling import build_teacher
from bgd_det.quantization.capture import for_each_input
from bgd_det.utils.logger import setup_logger

logger = logging.getLogger("bgd_det.layer_drift")


def layer_inputs(model: nn.Module, name: str, images: Tensor, batch_size: int) -> List[Tensor]:
    """What layer ``name`` receives when ``model`` runs on ``images``: [Tensor[B, C_in, ...] per batch]."""
    seen: List[Tensor] = []
    for_each_input(model, name, images.split(batch_size), lambda m, batch: m(batch), lambda _m, x: seen.append(x))
    return seen


def _centered(y: Tensor) -> Tensor:
    """Tensor[B, C, H, W] -> Tensor[C, B*H*W] in float64, each channel's mean removed."""
    y = y.transpose(0, 1).flatten(1).double()
    return y - y.mean(1, keepdim=True)


def drift_table(student: nn.Module, teacher: nn.Module, names: Sequence[str], images: Tensor,
                batch_size: int = 25) -> List[List]:
    """``[[layer, drift-only error, compressed error]]`` for ``names`` on ``images`` Tensor[N, 3, H, W]."""
    rows = []
    for n in names:
        t_layer, s_layer = teacher.get_submodule(n), student.get_submodule(n)
        s_in, t_in = (layer_inputs(model, n, images, batch_size) for model in (student, teacher))
        ref = drift = own = 0.0
        with torch.no_grad():
            for xs, xt in zip(s_in, t_in):
                yt = _centered(t_layer(xt))
                ref += float(yt.square().sum())
                drift += float((_centered(t_layer(xs)) - yt).square().sum())
                own += float((_centered(s_layer(xs)) - yt).square().sum())
        rows.append([n, (drift / ref) ** 0.5, (own / ref) ** 0.5])
    return rows


def main(argv=None) -> List[List]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a compressed checkpoint (tools/quantize_net.py)")
    p.add_argument("--teacher", required=True, metavar="ARCH:PATH", help="the uncompressed teacher's state dict")
    p.add_argument("--split", default="imagenet_sample_odd", help="a registered classification dataset")
    p.add_argument("--images", type=int, default=100, help="every (len / N)-th image of the split")
    p.add_argument("--layers", nargs="+", required=True, help="module names, e.g. layer4.0.conv1")
    args = p.parse_args(argv)
    setup_logger()
    arch, _, path = args.teacher.partition(":")
    if not path:
        raise SystemExit(f"--teacher expects ARCH:PATH, got {args.teacher!r}")
    cfg = get_cfg()
    cfg.MODEL.ARCH, cfg.MODEL.WEIGHTS = arch, path
    teacher = build_teacher(cfg)
    student = load_checkpoint_model(args.checkpoint)[0]
    dataset = DatasetCatalog.get(args.split)
    step = max(1, len(dataset) // args.images)
    images = torch.stack([dataset[i][0] for i in range(0, len(dataset), step)][:args.images])
    rows = drift_table(student.eval(), teacher.eval(), args.layers, images)
    print(f"{len(images)} images of {args.split}; relative error against the teacher's layer on the teacher's "
          f"input (channel means removed)")
    print(tabulate([[n, f"{d:.3f}", f"{o:.3f}"] for n, d, o in rows], tablefmt="github",
                   headers=["layer", "teacher's layer, student's input (drift)", "compressed layer, student's input"]))
    return rows


if __name__ == "__main__":
    main()
