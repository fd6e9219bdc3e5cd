"""Distillation of codebooks against the uncompressed teacher (layer-wise and global)."""
from __future__ import annotations

import logging
from typing import Iterable, List

import torch
from torch import nn
from tqdm import tqdm

from ..quantization.layers import PQ_LAYER_TYPES
from ..tasks.base import Task

logger = logging.getLogger(__name__)

__all__ = ["distill", "bn_affine_params", "codebook_params"]

_BN_TYPES = (nn.BatchNorm2d, nn.BatchNorm1d, nn.SyncBatchNorm)


def codebook_params(model: nn.Module) -> List[nn.Parameter]:
    return [m.codebook for m in model.modules() if isinstance(m, PQ_LAYER_TYPES)]


def bn_affine_params(model: nn.Module) -> List[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, _BN_TYPES) for p in (m.weight, m.bias) if p is not None]


def distill(student: nn.Module, teacher: nn.Module, task: Task, params: Iterable[nn.Parameter], *, iters: int,
            lr: float, batch_size: int, augment: bool, seed: int, desc: str,
            wrap=None) -> List[float]:
    """Adam on ``params`` for ``iters`` steps of ``task.distill_loss`` (student in eval mode: BatchNorm
    running statistics are kept; only the given parameters move).

    Args:
        wrap: optional ``fn(student) -> module`` (e.g. DistributedDataParallel) used for the forward.

    Returns:
        The loss of every step.
    """
    params = list(params)
    if iters <= 0 or not params:
        return []
    all_params = list(student.parameters())
    requires = [p.requires_grad for p in all_params]
    wanted = {id(p) for p in params}
    for p in all_params:
        p.requires_grad_(id(p) in wanted)
    teacher.eval()
    student.eval()
    runner = wrap(student) if wrap is not None else student
    opt = torch.optim.Adam(params, lr=lr)
    losses: List[float] = []
    batches = task.calib_batches(n_images=iters * batch_size, batch_size=batch_size, augment=augment, seed=seed)
    try:
        for batch in tqdm(batches, total=iters, desc=desc, leave=False):
            loss = task.distill_loss(runner, teacher, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        for p, r in zip(all_params, requires):
            p.requires_grad_(r)
    if losses:
        logger.info("%s: loss %.4f -> %.4f over %d steps", desc, losses[0], losses[-1], len(losses))
    return losses
