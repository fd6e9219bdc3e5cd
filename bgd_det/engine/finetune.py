"""Distillation of codebooks against the uncompressed teacher (layer-wise and global)."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, Iterable, Iterator, List, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..quantization.layers import PQ_LAYER_TYPES
from ..tasks.base import Task

logger = logging.getLogger(__name__)

__all__ = ["distill", "bn_affine_params", "codebook_params", "feature_modules", "feature_taps", "feature_loss"]

_BN_TYPES = (nn.BatchNorm2d, nn.BatchNorm1d, nn.SyncBatchNorm)


def codebook_params(model: nn.Module) -> List[nn.Parameter]:
    return [m.codebook for m in model.modules() if isinstance(m, PQ_LAYER_TYPES)]


def bn_affine_params(model: nn.Module) -> List[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, _BN_TYPES) for p in (m.weight, m.bias) if p is not None]


def feature_modules(model: nn.Module, names: Sequence[str]) -> List[nn.Module]:
    """The modules FINETUNE.FEATURE_LAYERS names in ``model``; a one-line error for a name that is not there."""
    modules = []
    for name in names:
        try:
            modules.append(model.get_submodule(name))
        except AttributeError:
            raise KeyError(f"FINETUNE.FEATURE_LAYERS: no module {name!r} in {type(model).__name__}") from None
    return modules


@contextlib.contextmanager
def feature_taps(model: nn.Module, names: Sequence[str]) -> Iterator[Dict[str, Any]]:
    """While open, the dict holds the latest output of every module in ``names`` (forward hooks)."""
    seen: Dict[str, Any] = {}
    handles = []
    try:
        for name, module in zip(names, feature_modules(model, names)):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: seen.__setitem__(name, out)))
        yield seen
    finally:
        for h in handles:
            h.remove()


def _tensors(name: str, out: Any) -> List[torch.Tensor]:
    """The tensors of a module output: itself, or those of a dict (in key order), list or tuple (nested)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(name, v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(name, v)]
    raise TypeError(f"FINETUNE.FEATURE_LAYERS: {name!r} returned a {type(out).__name__}; allowed: a tensor, or a "
                    f"dict / list / tuple of tensors")


def feature_loss(student_feats: Dict[str, Any], teacher_feats: Dict[str, Any]) -> torch.Tensor:
    """Sum over tapped tensors of the normalized squared error ``||s - t||^2 / ||t||^2``.

    A module that returns several tensors (a dict of FPN levels, a tuple) contributes one term per tensor.
    """
    total = None
    for name, t_out in teacher_feats.items():
        s_all, t_all = _tensors(name, student_feats[name]), _tensors(name, t_out)
        if len(s_all) != len(t_all):
            raise RuntimeError(f"FINETUNE.FEATURE_LAYERS: {name!r} returned {len(s_all)} tensors in the student "
                               f"and {len(t_all)} in the teacher")
        for s, t in zip(s_all, t_all):
            term = (s - t.detach()).pow(2).sum() / t.detach().pow(2).sum().clamp_min(1e-12)
            total = term if total is None else total + term
    if total is None:
        raise RuntimeError("no feature was tapped during the forward (FINETUNE.FEATURE_LAYERS)")
    return total


def distill(student: nn.Module, teacher: nn.Module, task: Task, params: Iterable[nn.Parameter], *, iters: int,
            lr: float, batch_size: int, augment: bool, seed: int, desc: str,
            wrap=None, feature_layers: Sequence[str] = (), feature_weight: float = 0.0) -> List[float]:
    """Adam on ``params`` for ``iters`` steps of ``task.distill_loss`` (student in eval mode: BatchNorm
    running statistics are kept; only the given parameters move), plus ``feature_weight`` times the
    :func:`feature_loss` of the modules ``feature_layers`` when both are set.

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
    use_features = bool(feature_layers) and feature_weight > 0
    with contextlib.ExitStack() as stack:
        for p, r in zip(all_params, requires):  # restored whatever happens
            stack.callback(p.requires_grad_, r)
        if use_features:  # hooks stay on for the whole loop; each forward overwrites the outputs
            s_feats = stack.enter_context(feature_taps(student, feature_layers))
            t_feats = stack.enter_context(feature_taps(teacher, feature_layers))
        for batch in tqdm(batches, total=iters, desc=desc, leave=False):
            loss = task.distill_loss(runner, teacher, batch)
            if use_features:
                loss = loss + feature_weight * feature_loss(s_feats, t_feats)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    if losses:
        logger.info("%s: loss %.4f -> %.4f over %d steps", desc, losses[0], losses[-1], len(losses))
    return losses
