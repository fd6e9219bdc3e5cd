"""Task protocol: what the quantization engine needs to know about a model family.

The engine (capture -> EM -> distillation -> evaluation) is task-agnostic; a task supplies the data, the forward
call, the distillation loss and the evaluation. A task class names itself (``name = "detection"``) and is
registered with ``@TASK_REGISTRY.register()``; an architecture builder's ``task`` attribute
(``build.task = "classification"``) picks it by that name.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from fvcore.common.registry import Registry
from torch import nn

from ..data import DatasetCatalog
from ..modeling.registry import get_arch
from ..modeling.stages import Stage, stages_of

__all__ = ["Task", "TASK_REGISTRY", "build_task"]

TASK_REGISTRY = Registry("TASK")
TASK_REGISTRY.__doc__ = "Task classes ``cls(cfg) -> Task``; :func:`build_task` picks one by its ``name`` attribute."


class Task:
    """Interface; see :class:`bgd_det.tasks.classification.ClassificationTask` for a complete example."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def example_forward(self, model: nn.Module) -> Any:
        """Run ``model`` once on a small example input (used to trace execution order)."""
        raise NotImplementedError

    def calib_batches(self, *, n_images: int, batch_size: int, augment: bool, seed: int) -> Iterator[Any]:
        """Batches of calibration data covering ``n_images`` images (cycling if needed), seeded."""
        raise NotImplementedError

    def calib_size(self) -> int:
        """Number of images in ``cfg.DATASETS.CALIB`` (one epoch of :meth:`calib_batches`)."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """Inference-mode forward of ``model`` on ``batch`` (used for activation capture)."""
        raise NotImplementedError

    def paired_forward(self, teacher: nn.Module) -> Callable[[nn.Module, Any], Any]:
        """The forward that captures run on the student and on ``teacher`` (paired statistics); by default
        :meth:`forward`. A task whose later layers depend on the model's own earlier decisions (a detector's
        proposals) makes the student follow the teacher's."""
        return self.forward

    def model_input(self, batch: Any) -> torch.Tensor:
        """The tensor the model's first stage takes from ``batch`` (streaming engine; see
        :mod:`bgd_det.modeling.stages`). A task that does not override it is served by the recompute path."""
        raise NotImplementedError

    def stages(self, model: nn.Module) -> Optional[List[Stage]]:
        """Sequential stages of :meth:`forward` on ``model`` (:class:`bgd_det.modeling.stages.Stage`), or None:
        by default those the architecture's registry builder declares (its ``stages`` attribute)."""
        return stages_of(self.cfg.MODEL.ARCH, model)

    def reseed(self, seed: int) -> None:
        """Re-seed the task's own random draws in :meth:`distill_loss` (e.g. mixup); the engine calls it before
        every distillation step with a seed of (run seed, stage, step), so an interrupted and resumed run draws
        what an uninterrupted one does. By default the task draws nothing."""

    def distill_loss(self, student: nn.Module, teacher: nn.Module, batch: Any) -> torch.Tensor:
        """Label-free loss that pulls ``student`` towards ``teacher`` on ``batch`` (scalar Tensor)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, *, reference: Optional[nn.Module] = None, output_dir: str = "",
                 reference_output_dir: Optional[str] = None) -> Dict[str, Any]:
        """Metrics of ``model`` on ``cfg.DATASETS.TEST``; with ``reference`` (e.g. the teacher, run on the same
        inputs) also the label-free agreement with it; ``output_dir`` receives the raw predictions ("" = nowhere).
        With ``reference`` and ``reference_output_dir`` (a path or ""), the reference's own metrics too, from the
        same pass, under ``"reference"`` (:class:`bgd_det.evaluation.PairedEvaluator`); ``reference_output_dir``
        without ``reference`` is a ValueError."""
        raise NotImplementedError

    #: what architecture builders name in their ``task`` attribute to use this task.
    name: str = ""
    #: name of the headline metric in :meth:`evaluate`'s dict (for reports).
    main_metrics: tuple = ()


def build_task(cfg) -> Task:
    """The task of ``cfg.MODEL.ARCH`` (``task`` attribute of its builder; default "classification")."""
    name = getattr(get_arch(cfg.MODEL.ARCH), "task", "classification")
    tasks = {cls.name: cls for _, cls in TASK_REGISTRY}
    if name not in tasks:
        raise KeyError(f"unknown task {name!r}; registered tasks: {sorted(tasks)}")
    unknown = [f"DATASETS.{k} {cfg.DATASETS[k]!r}" for k in ("CALIB", "TEST") if cfg.DATASETS[k] not in DatasetCatalog]
    if unknown:  # before any model is built or evaluated
        raise KeyError(f"unknown dataset {', '.join(unknown)}; registered datasets: {DatasetCatalog.list()}")
    return tasks[name](cfg)
