"""Supervised training of a detection *teacher* (torchvision's Mask R-CNN losses), for the fidelity measurement.

No COCO-trained detector exists offline; ``tools/train_detector.py`` trains one on the composite set
(``bgd_det/data/composite.py``) from an ImageNet backbone, seeded, so the measurement can be regenerated. The
recipe is torchvision's detection reference at small scale: SGD with momentum 0.9 and weight decay 1e-4, linear
warm-up, LR x0.1 at 70% and 90% of the iterations, horizontal flips, the stem and ``layer1`` frozen
(``trainable_backbone_layers=3``).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn

from ..tasks.detection import DetectionTask

logger = logging.getLogger(__name__)

__all__ = ["TrainSettings", "load_backbone", "train_detector", "int8_state_dict", "from_int8"]


@dataclass
class TrainSettings:
    """Training budget and optimiser (``tools/train_detector.py`` exposes each field as ``--<field>``)."""

    iters: int = 3000
    batch_size: int = 8
    lr: float = 0.02
    warmup: int = 200
    weight_decay: float = 1e-4
    seed: int = 0
    amp: bool = False  # bf16 autocast (CUDA)
    log_period: int = 50


def load_backbone(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load a torchvision ResNet state dict (``fc`` ignored) into ``model.backbone.body``; every body tensor must
    be given. ``num_batches_tracked`` entries are dropped (FrozenBatchNorm2d has none)."""
    body = model.backbone.body
    wanted = body.state_dict()
    given = {k: v for k, v in state.items() if k in wanted}
    missing = sorted(set(wanted) - set(given))
    if missing:
        raise ValueError(f"backbone state dict lacks {len(missing)} tensors of the detector's ResNet, e.g. "
                         f"{missing[:3]}; give a torchvision ResNet-50 state dict")
    body.load_state_dict(given, strict=True)


def _freeze_stem(model: nn.Module) -> None:
    """torchvision's ``trainable_backbone_layers=3``: conv1, bn1 and layer1 do not train."""
    for name, p in model.backbone.body.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            p.requires_grad_(False)


def _lr_factor(it: int, s: TrainSettings) -> float:
    warm = min(1.0, (it + 1) / s.warmup) if s.warmup > 0 else 1.0
    return warm * (0.1 ** sum(it >= round(f * s.iters) for f in (0.7, 0.9)))


def train_detector(model: nn.Module, task: DetectionTask, settings: TrainSettings) -> List[Dict[str, float]]:
    """Train ``model`` in place on ``task``'s DATASETS.CALIB with its annotations; returns the logged losses.

    ``task.cfg.DETECTION.LOSS`` must be "supervised" (the batches then carry targets).
    """
    if not task.needs_targets:
        raise ValueError("train_detector needs DETECTION.LOSS supervised (batches with annotations)")
    torch.manual_seed(settings.seed)
    _freeze_stem(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: _lr_factor(it, settings))
    device = next(model.parameters()).device
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if settings.amp
                else contextlib.nullcontext())
    batches = task.calib_batches(n_images=settings.iters * settings.batch_size, batch_size=settings.batch_size,
                                 augment=True, seed=settings.seed)
    model.train()
    log: List[Dict[str, float]] = []
    start, running = time.perf_counter(), {}
    for it, batch in enumerate(batches):
        with autocast:
            losses = model(batch["images"], batch["targets"])
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"training loss is {total.item()} at iteration {it}; lower the LR")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + v.item()
        if (it + 1) % settings.log_period == 0 or it + 1 == settings.iters:
            n = (it % settings.log_period) + 1
            row = {"iter": it + 1, "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - start,
                   **{k: v / n for k, v in running.items()}}
            row["loss"] = sum(v for k, v in row.items() if k.startswith("loss_"))
            logger.info("iter %d/%d loss %.3f (%s) lr %.4f %.0f s", it + 1, settings.iters, row["loss"],
                        ", ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("loss_")),
                        row["lr"], row["seconds"])
            log.append(row)
            running = {}
    model.eval()
    return log


def _per_row(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Tensor[C_out] shaped to broadcast over the rows of ``like`` (Tensor[C_out, ...])."""
    return scale.view(-1, *[1] * (like.dim() - 1))


def int8_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Round every float tensor of >= 2 dims to int8 per output channel (symmetric, round to nearest):
    ``name`` -> int8 values and ``name@scale`` -> Tensor[C_out] fp32; other tensors unchanged.
    A quarter of the fp32 size, for moving a trained teacher between machines; :func:`from_int8` inverts it."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if v.is_floating_point() and v.dim() >= 2:
            v = v.detach().float().cpu()
            scale = v.flatten(1).abs().amax(1).clamp_min(1e-12) / 127.0
            out[k] = torch.round(v / _per_row(scale, v)).to(torch.int8)
            out[k + "@scale"] = scale
        else:
            out[k] = v.detach().cpu()
    return out


def from_int8(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The fp32 state dict of an :func:`int8_state_dict` (values times their channel's scale)."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith("@scale"):
            continue
        scale = state.get(k + "@scale")
        out[k] = v if scale is None else v.float() * _per_row(scale, v)
    return out

