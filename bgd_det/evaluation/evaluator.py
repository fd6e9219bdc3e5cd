"""Evaluator protocol and the inference loop (as detectron2's ``DatasetEvaluator``/``inference_on_dataset``)."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm

from ..utils.modes import eval_mode

logger = logging.getLogger(__name__)

__all__ = ["DatasetEvaluator", "PairedEvaluator", "inference_on_dataset"]


class DatasetEvaluator:
    """Accumulates predictions: ``reset()``, ``process(inputs, outputs, reference_outputs)`` per batch,
    ``evaluate() -> dict``. Evaluators never run models: :func:`inference_on_dataset` hands them the model's outputs
    and, when it is given a reference model, the reference's outputs on the same batch (else ``None``)."""

    def reset(self) -> None:
        pass

    def process(self, inputs: Any, outputs: Any, reference_outputs: Any = None) -> None:
        raise NotImplementedError

    def evaluate(self) -> Dict[str, float]:
        raise NotImplementedError


def inference_on_dataset(model: nn.Module, loader: Iterable, evaluator: DatasetEvaluator, *,
                         forward: Callable[[nn.Module, Any], Any] | None = None,
                         reference: Optional[nn.Module] = None,
                         reference_evaluator: Optional[DatasetEvaluator] = None, desc: str = "eval") -> Dict[str, float]:
    """Run ``model`` (and ``reference``, on the same batches) in eval mode over ``loader`` and return
    ``evaluator.evaluate()``.

    Args:
        forward: ``forward(model, batch) -> outputs``; default ``model(batch[0])``.
        reference: e.g. the uncompressed teacher: its outputs go to the evaluator beside the model's.
        reference_evaluator: scores ``reference``'s outputs of the same pass too (:class:`PairedEvaluator`); the
            result then holds its metrics under ``"reference"``. Needs ``reference``.
    """
    if reference_evaluator is not None:
        if reference is None:
            raise ValueError("reference_evaluator given without reference=: there are no reference outputs to score")
        evaluator = PairedEvaluator(evaluator, reference_evaluator)
    forward = forward or (lambda m, batch: m(batch[0]))
    evaluator.reset()
    start = time.perf_counter()
    n = 0
    with eval_mode(model, reference), torch.inference_mode():
        for batch in tqdm(loader, desc=desc, leave=False):
            outputs = forward(model, batch)
            evaluator.process(batch, outputs, None if reference is None else forward(reference, batch))
            n += 1
    logger.info("%s: %d batches in %.1fs", desc, n, time.perf_counter() - start)
    return evaluator.evaluate()


class PairedEvaluator(DatasetEvaluator):
    """Scores a model and its reference from the same pass: ``model`` gets ``(inputs, outputs,
    reference_outputs)`` (its metrics and the agreement), ``reference`` gets ``(inputs, reference_outputs)``
    (the reference's own metrics). ``evaluate()`` returns the model's metrics with the reference's under
    ``"reference"``."""

    def __init__(self, model: DatasetEvaluator, reference: DatasetEvaluator) -> None:
        self.model, self.reference = model, reference

    def reset(self) -> None:
        self.model.reset()
        self.reference.reset()

    def process(self, inputs: Any, outputs: Any, reference_outputs: Any = None) -> None:
        if reference_outputs is None:
            raise ValueError("PairedEvaluator needs the reference's outputs; run inference_on_dataset with reference=")
        self.model.process(inputs, outputs, reference_outputs)
        self.reference.process(inputs, reference_outputs)

    def evaluate(self) -> Dict[str, Any]:
        return {**self.model.evaluate(), "reference": self.reference.evaluate()}
