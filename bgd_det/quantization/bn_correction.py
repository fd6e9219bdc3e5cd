"""Statistics correction after quantizing a layer.

Quantizing a conv shifts the per-channel mean and variance of its output. When a BatchNorm consumes that
output directly, its running statistics can absorb the shift: with the student's pre-BN statistics
``(m_s, s_s)`` and the teacher's ``(m_t, s_t)`` on the same images, the corrected BatchNorm maps the student's
output distribution onto the teacher's post-BN distribution (per channel, first two moments). A layer that feeds
no BatchNorm but has a bias (FPN, RPN and R-CNN heads, classifiers) gets empirical bias correction (Nagel et al.,
2019): its bias absorbs the per-channel mean shift of its output against the teacher's (:func:`correct_bias`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d

from ..utils.hooks import removed_on_exit
from .capture import for_each_input, for_each_output

logger = logging.getLogger(__name__)

__all__ = ["BN_TYPES", "bn_scale_shift", "following_batchnorms", "channel_stats", "correct_batchnorm",
           "output_channel_mean", "correct_bias"]

BN_TYPES = (_BatchNorm, FrozenBatchNorm2d)


def bn_scale_shift(bn: nn.Module) -> Optional[Tuple[Tensor, Tensor]]:
    """Per-channel ``(scale, shift)`` with ``bn(y) == scale * y + shift`` in eval mode, or None if
    ``bn`` normalises with batch statistics (no running statistics)."""
    mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if mean is None or var is None or (isinstance(bn, _BatchNorm) and not bn.track_running_stats):
        return None
    var64, mean64 = var.detach().double(), mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var64)
    scale = gamma / torch.sqrt(var64 + bn.eps)
    return scale.float(), (beta - mean64 * scale).float()


def following_batchnorms(model: nn.Module, run: Callable[[nn.Module], Any]) -> Dict[str, str]:
    """``{layer name: BatchNorm name}`` for every BatchNorm whose input is exactly a layer's output tensor.

    Found by running the model once with hooks (tensor identity), so it follows the real data flow.
    """
    produced: Dict[int, str] = {}
    pairs: Dict[str, str] = {}

    def out_hook(name):
        def hook(_m, _i, out):
            if isinstance(out, Tensor):
                produced[id(out)] = name
        return hook

    def bn_hook(name):
        def hook(_m, args):
            src = produced.get(id(args[0]))
            if src is not None:
                pairs.setdefault(src, name)
        return hook

    with removed_on_exit() as handles:
        for name, m in model.named_modules():
            if isinstance(m, BN_TYPES):
                handles.append(m.register_forward_pre_hook(bn_hook(name)))
            elif isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear, nn.ConvTranspose2d)):
                handles.append(m.register_forward_hook(out_hook(name)))
        with torch.no_grad():
            run(model)
    return pairs


def channel_stats(model: nn.Module, bn_name: str, batches: Iterable[Any],
                  forward: Callable[[nn.Module, Any], Any]) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and variance (float64) of the input of ``bn_name`` over ``batches``."""
    total: Optional[Tensor] = None
    total_sq: Optional[Tensor] = None
    count = 0

    def add(_m: nn.Module, x: Tensor) -> None:
        nonlocal total, total_sq, count
        x = x.double()
        dims = [0] + list(range(2, x.dim()))
        s, sq = x.sum(dims), (x * x).sum(dims)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += x.numel() // x.shape[1]

    for_each_input(model, bn_name, batches, forward, add)
    if total is None:
        raise RuntimeError(f"BatchNorm {bn_name!r} did not run during the forward")
    mean = total / count
    return mean, (total_sq / count - mean * mean).clamp_min(0)


def correct_batchnorm(bn: nn.Module, student: Tuple[Tensor, Tensor], teacher: Tuple[Tensor, Tensor], *,
                      variance: bool = True, max_ratio: float = 2.0) -> None:
    """Update ``bn``'s running statistics in place so the student's pre-BN statistics map to the teacher's output.

    Args:
        student, teacher: per-channel (mean, variance) of the BN input in the student and the teacher.
        variance: also correct the scale (else only the mean).
        max_ratio: clamp of the per-channel std ratio s_s / s_t (guards near-dead channels).
    """
    m_s, v_s = student
    m_t, v_t = teacher
    rm, rv = bn.running_mean.double(), bn.running_var.double()
    sigma = (rv + bn.eps).sqrt()
    if variance:
        ratio = ((v_s + 1e-12) / (v_t + 1e-12)).sqrt().clamp(1.0 / max_ratio, max_ratio)
    else:
        ratio = torch.ones_like(sigma)
    sigma_new = sigma * ratio
    rm_new = m_s - (m_t - rm) * ratio
    with torch.no_grad():
        bn.running_mean.copy_(rm_new.to(bn.running_mean.dtype))
        bn.running_var.copy_((sigma_new * sigma_new - bn.eps).clamp_min(0).to(bn.running_var.dtype))


def output_channel_mean(model: nn.Module, name: str, batches: Iterable[Any],
                        forward: Callable[[nn.Module, Any], Any]) -> Tensor:
    """Per-channel mean (float64, Tensor[C]) of layer ``name``'s output over ``batches`` (every call of the layer
    in a forward counts; channels on dim 1, or the last dim of a Linear's output). The forward stops after it."""
    module = model.get_submodule(name)
    total: Optional[Tensor] = None
    count = 0

    def add(_m: nn.Module, out: Tensor) -> None:
        nonlocal total, count
        y = out.double()
        y = y.reshape(-1, y.shape[-1]) if isinstance(module, nn.Linear) else y.transpose(0, 1).reshape(y.shape[1], -1).T
        total = y.sum(0) if total is None else total + y.sum(0)
        count += y.shape[0]

    for_each_output(model, name, batches, forward, add)
    if total is None:
        raise RuntimeError(f"layer {name!r} did not run during the forward")
    return total / count


def correct_bias(layer: nn.Module, student_mean: Tensor, teacher_mean: Tensor) -> None:
    """Add the teacher's minus the student's output mean (Tensor[C]) to ``layer``'s bias, in place."""
    with torch.no_grad():
        layer.bias.add_((teacher_mean - student_mean).to(layer.bias.dtype))
