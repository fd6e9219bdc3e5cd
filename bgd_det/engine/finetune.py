"""Distillation of codebooks against the uncompressed teacher (layer-wise and global)."""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from ..config.checks import CENTROID_GRADS, LR_SCHEDULES, OPTIMIZERS, check_optim
from ..quantization.layers import PQ_LAYER_TYPES
from ..tasks.base import Task
from ..utils.file_io import atomic_save
from ..utils.hooks import removed_on_exit

logger = logging.getLogger(__name__)

__all__ = ["distill", "OptimSpec", "FinetuneCheckpoint", "centroid_mean_grads", "bn_train_mode", "OPTIMIZERS",
           "CENTROID_GRADS", "LR_SCHEDULES", "bn_affine_params", "codebook_params", "feature_modules", "feature_taps", "feature_loss"]

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
    with removed_on_exit() as handles:
        for name, module in zip(names, feature_modules(model, names)):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: seen.__setitem__(name, out)))
        yield seen


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


@dataclass(frozen=True)
class OptimSpec:
    """How :func:`distill` steps (FINETUNE.OPTIMIZER ... LR_GAMMA; one spec per stage: layer-wise or global).

    Attributes:
        lr: base learning rate; optimizer: "adam" or "sgd" (momentum, weight_decay apply to SGD; weight_decay to
        Adam too); centroid_grad: "sum" (autograd's gradient of a centroid: the sum over the sub-vectors decoded
        from it) or "mean" (the paper: that sum divided by the number of sub-vectors assigned to the centroid);
        schedule: "constant", "step" (the LR is multiplied by ``gamma`` at every fraction of the run in
        ``milestones``) or "cosine" (to zero at the last step).
    """

    lr: float
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    centroid_grad: str = "sum"
    schedule: str = "constant"
    milestones: Tuple[float, ...] = ()
    gamma: float = 0.1

    @classmethod
    def from_cfg(cls, fcfg, lr: float) -> "OptimSpec":
        return cls(lr=lr, optimizer=fcfg.OPTIMIZER, momentum=fcfg.MOMENTUM, weight_decay=fcfg.WEIGHT_DECAY,
                   centroid_grad=fcfg.CENTROID_GRAD, schedule=fcfg.LR_SCHEDULE,
                   milestones=tuple(float(m) for m in fcfg.LR_MILESTONES), gamma=fcfg.LR_GAMMA)

    def check(self) -> None:
        """One-line errors for values outside the allowed sets (:func:`bgd_det.config.checks.check_optim`)."""
        check_optim(optimizer=self.optimizer, centroid_grad=self.centroid_grad, schedule=self.schedule,
                    milestones=self.milestones, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                    gamma=self.gamma)

    def lr_factor(self, step: int, iters: int) -> float:
        """The schedule's multiplier of ``lr`` at ``step`` (0-based) of ``iters``."""
        frac = step / max(iters, 1)
        if self.schedule == "step":
            return self.gamma ** sum(frac >= m for m in self.milestones)
        if self.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0

    def build(self, params: List[nn.Parameter], iters: int):
        """(optimizer, LambdaLR scheduler) for ``iters`` steps."""
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.lr_factor(step, iters))


@contextlib.contextmanager
def centroid_mean_grads(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """While open, the gradient reaching the codebook of every codebook layer of ``model`` whose codebook is in
    ``params`` is divided, row k, by the number of sub-vectors assigned to centroid k (at least 1): each centroid
    moves by the mean of its sub-vectors' gradients instead of their sum."""
    wanted = {id(p) for p in params}
    with removed_on_exit() as handles:
        for m in model.modules():
            if isinstance(m, PQ_LAYER_TYPES) and id(m.codebook) in wanted:
                counts = torch.bincount(m.codes.reshape(-1).long(), minlength=m.codebook.shape[0])
                scale = 1.0 / counts.clamp_min(1).to(m.codebook.dtype).unsqueeze(1)  # Tensor[K, 1]
                handles.append(m.codebook.register_hook(lambda g, s=scale: g * s.to(g.device)))
        yield


@contextlib.contextmanager
def bn_train_mode(model: nn.Module, enabled: bool) -> Iterator[None]:
    """While open (``enabled``), every BatchNorm of ``model`` is in train mode: it normalises with the batch's
    statistics and updates its running statistics (FINETUNE.BN "stats" / "train"); the rest stays in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, _BN_TYPES)] if enabled else []
    try:
        for m in bns:
            m.train()
        yield
    finally:
        for m in bns:
            m.eval()


@dataclass
class FinetuneCheckpoint:
    """Periodic state of a :func:`distill` run, so that it resumes after a crash (global finetuning).

    Attributes:
        path: file written atomically every ``period`` steps and removed when the run ends ("" = never); every
        process reads it, only the one with ``write`` writes and removes it. fingerprint: the run's settings
        (``Quantizer.fingerprint``), recorded in the file; a file of other settings is refused with the keys named.
    """

    path: str = ""
    period: int = 0
    write: bool = True
    fingerprint: Dict[str, str] = field(default_factory=dict)

    def due(self, step: int, iters: int) -> bool:
        return bool(self.path) and self.write and self.period > 0 and step % self.period == 0 and step < iters

    def save(self, step: int, model: nn.Module, opt, sched, losses: List[float], rng_start) -> None:
        atomic_save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "losses": losses, "rng_start": rng_start,
                     "rng": torch.get_rng_state(), "fingerprint": self.fingerprint}, self.path)
        logger.info("finetuning state after step %d saved to %s", step, self.path)

    def load(self) -> Optional[dict]:
        if not self.path or not os.path.isfile(self.path):
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        saved = state.get("fingerprint", {})
        changed = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if changed:
            first = ", ".join(f"{k} {saved.get(k, '-')} -> {self.fingerprint.get(k, '-')}" for k in changed[:4])
            raise ValueError(f"{self.path} was written by a run with other settings ({first}"
                             f"{', ...' if len(changed) > 4 else ''}); --resume continues only the same run: "
                             f"restore them, or remove the file to finetune from the finished layers")
        return state

    def remove(self) -> None:
        if self.path and self.write and os.path.isfile(self.path):
            os.remove(self.path)


def distill(student: nn.Module, teacher: nn.Module, task: Task, params: Iterable[nn.Parameter], *, iters: int,
            optim: OptimSpec, batch_size: int, augment: bool, seed: int, desc: str, wrap=None,
            feature_layers: Sequence[str] = (), feature_weight: float = 0.0, bn_stats: bool = False,
            checkpoint: Optional[FinetuneCheckpoint] = None,
            validate: Optional[Tuple[int, Callable[[nn.Module], Dict[str, float]]]] = None) -> List[float]:
    """``iters`` steps of ``optim`` on ``params`` against ``task.distill_loss`` (only the given parameters move),
    plus ``feature_weight`` times the :func:`feature_loss` of the modules ``feature_layers`` when both are set.

    Args:
        wrap: optional ``fn(student) -> module`` (e.g. DistributedDataParallel) used for the forward.
        bn_stats: BatchNorm in train mode (batch statistics, running statistics updated); else the student runs
            in eval mode and BatchNorm running statistics are kept.
        checkpoint: save the state every ``checkpoint.period`` steps; a run that finds the file continues from it
            (the same batches and the same result as an uninterrupted run).
        validate: ``(period, fn)``: ``fn(student)`` every ``period`` steps and at the end, logged.

    Returns:
        The loss of every step.
    """
    params = list(params)
    if iters <= 0 or not params:
        return []
    optim.check()
    all_params = list(student.parameters())
    requires = [p.requires_grad for p in all_params]
    wanted = {id(p) for p in params}
    for p in all_params:
        p.requires_grad_(id(p) in wanted)
    teacher.eval()
    student.eval()
    runner = wrap(student) if wrap is not None else student
    opt, sched = optim.build(params, iters)
    losses: List[float] = []
    start, rng_start = 0, torch.get_rng_state()
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, losses, rng_start = state["step"], list(state["losses"]), state["rng_start"]
        logger.info("%s: resuming after step %d of %d from %s", desc, start, iters, checkpoint.path)
    torch.set_rng_state(rng_start)  # the stream's augmentations are drawn as in an uninterrupted run
    batches = task.calib_batches(n_images=iters * batch_size, batch_size=batch_size, augment=augment, seed=seed)
    batches = iter(batches)
    for _ in range(start):  # consumed, not run: the data a resumed run skips
        next(batches)
    if state is not None:
        torch.set_rng_state(state["rng"])
    use_features = bool(feature_layers) and feature_weight > 0
    with contextlib.ExitStack() as stack:
        for p, r in zip(all_params, requires):  # restored whatever happens
            stack.callback(p.requires_grad_, r)
        if optim.centroid_grad == "mean":
            stack.enter_context(centroid_mean_grads(student, params))
        if use_features:  # hooks stay on for the whole loop; each forward overwrites the outputs
            s_feats = stack.enter_context(feature_taps(student, feature_layers))
            t_feats = stack.enter_context(feature_taps(teacher, feature_layers))
        for step in tqdm(range(start, iters), total=iters, initial=start, desc=desc, leave=False):
            batch = next(batches)
            task.reseed(seed * 1000003 + step)  # the task's own draws (mixup) depend on the step only
            with bn_train_mode(student, bn_stats):
                loss = task.distill_loss(runner, teacher, batch)
                if use_features:
                    loss = loss + feature_weight * feature_loss(s_feats, t_feats)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            done = step + 1
            if validate is not None and validate[0] > 0 and (done % validate[0] == 0 or done == iters):
                metrics = validate[1](student)
                logger.info("%s: step %d/%d, validation %s", desc, done, iters,
                            ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
            if checkpoint is not None and checkpoint.due(done, iters):
                checkpoint.save(done, student, opt, sched, losses, rng_start)
    if checkpoint is not None:
        checkpoint.remove()
    if losses:
        logger.info("%s: loss %.4f -> %.4f over %d steps", desc, losses[0], losses[-1], len(losses))
    return losses
