"""Evaluator protocol and the inference loop (as detectron2's ``DatasetEvaluator``/``inference_on_dataset``)."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Iterable

import torch
from torch import nn
from tqdm import tqdm

logger = logging.getLogger(__name__)

__all__ = ["DatasetEvaluator", "inference_on_dataset"]


class DatasetEvaluator:
    """Accumulates predictions: ``reset()``, ``process(inputs, outputs)`` per batch, ``evaluate() -> dict``."""

    def reset(self) -> None:
        pass

    def process(self, inputs: Any, outputs: Any) -> None:
        raise NotImplementedError

    def evaluate(self) -> Dict[str, float]:
        raise NotImplementedError


def inference_on_dataset(model: nn.Module, loader: Iterable, evaluator: DatasetEvaluator, *,
                         forward: Callable[[nn.Module, Any], Any] | None = None,
                         desc: str = "eval") -> Dict[str, float]:
    """Run ``model`` in eval mode over ``loader`` and return ``evaluator.evaluate()``.

    Args:
        forward: ``forward(model, batch) -> outputs``; default ``model(batch[0])``.
    """
    forward = forward or (lambda m, batch: m(batch[0]))
    evaluator.reset()
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    n = 0
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, leave=False):
                evaluator.process(batch, forward(model, batch))
                n += 1
    finally:
        model.train(was_training)
    logger.info("%s: %d batches in %.1fs", desc, n, time.perf_counter() - start)
    return evaluator.evaluate()
