"""Top-1/top-5 classification evaluator, optionally with the agreement with a reference model."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import comm
from .evaluator import DatasetEvaluator

__all__ = ["ClassificationEvaluator"]


class ClassificationEvaluator(DatasetEvaluator):
    """Top-k accuracy (in %) of logits Tensor[B, num_classes] against labels Tensor[B].

    With a ``reference`` model (e.g. the uncompressed teacher), which is run on the same images, it also
    reports ``kl_to_reference``, the mean ``KL(softmax(reference) || softmax(model))`` in nats, and
    ``top1_agreement``, the % of images where both models predict the same class. Unlike accuracy, these
    need no labels and vary smoothly, so they separate close variants on a few hundred images. With
    ``per_image``, ``top1_per_image`` lists every image's top-1 hit (for paired comparisons of two models).
    """

    def __init__(self, topk: Sequence[int] = (1, 5), reference: Optional[nn.Module] = None,
                 per_image: bool = False) -> None:
        self.topk = tuple(topk)
        self.reference = reference
        self.per_image = per_image
        self.reset()

    def reset(self) -> None:
        self._hits: list = []
        self._correct = torch.zeros(len(self.topk), dtype=torch.long)
        self._count = 0
        self._kl_sum = torch.zeros((), dtype=torch.float64)
        self._agree = torch.zeros((), dtype=torch.long)

    def process(self, inputs: Any, outputs: torch.Tensor) -> None:
        labels = inputs[1].to(outputs.device)
        pred = outputs.topk(max(self.topk), dim=1).indices
        hit = pred == labels.unsqueeze(1)
        for i, k in enumerate(self.topk):
            self._correct[i] += int(hit[:, :k].any(1).sum())
        self._count += labels.numel()
        if self.per_image:
            self._hits += hit[:, :1].any(1).tolist()
        if self.reference is not None:
            was_training = self.reference.training
            self.reference.eval()
            ref = self.reference(inputs[0].to(outputs.device)).float()
            self.reference.train(was_training)
            self._kl_sum += float(F.kl_div(F.log_softmax(outputs.float(), 1), F.log_softmax(ref, 1),
                                           reduction="sum", log_target=True))
            self._agree += int((ref.argmax(1) == outputs.argmax(1)).sum())

    def evaluate(self) -> Dict[str, float]:
        correct, count = comm.all_reduce_sum(self._correct.clone()), comm.all_reduce_sum(torch.tensor(self._count))
        count = int(count)
        if count == 0:
            raise ValueError("ClassificationEvaluator received no samples")
        out = {f"top{k}": 100.0 * float(c) / count for k, c in zip(self.topk, correct)}
        if self.reference is not None:
            out["kl_to_reference"] = float(comm.all_reduce_sum(self._kl_sum.clone())) / count
            out["top1_agreement"] = 100.0 * float(comm.all_reduce_sum(self._agree.clone())) / count
        out["n_images"] = count
        if self.per_image:  # in the loader's order (one process: the dataset's order)
            if comm.get_world_size() > 1:
                raise RuntimeError("per-image results are kept in one process only")
            out["top1_per_image"] = [bool(h) for h in self._hits]
        return out
