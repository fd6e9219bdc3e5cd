"""Top-1/top-5 classification evaluator."""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch

from ..utils import comm
from .evaluator import DatasetEvaluator

__all__ = ["ClassificationEvaluator"]


class ClassificationEvaluator(DatasetEvaluator):
    """Top-k accuracy (in %) of logits Tensor[B, num_classes] against labels Tensor[B]."""

    def __init__(self, topk: Sequence[int] = (1, 5)) -> None:
        self.topk = tuple(topk)
        self.reset()

    def reset(self) -> None:
        self._correct = torch.zeros(len(self.topk), dtype=torch.long)
        self._count = 0

    def process(self, inputs: Any, outputs: torch.Tensor) -> None:
        labels = inputs[1].to(outputs.device)
        pred = outputs.topk(max(self.topk), dim=1).indices
        hit = pred == labels.unsqueeze(1)
        for i, k in enumerate(self.topk):
            self._correct[i] += int(hit[:, :k].any(1).sum())
        self._count += labels.numel()

    def evaluate(self) -> Dict[str, float]:
        correct, count = comm.all_reduce_sum(self._correct.clone()), comm.all_reduce_sum(torch.tensor(self._count))
        count = int(count)
        if count == 0:
            raise ValueError("ClassificationEvaluator received no samples")
        out = {f"top{k}": 100.0 * float(c) / count for k, c in zip(self.topk, correct)}
        out["n_images"] = count
        return out
