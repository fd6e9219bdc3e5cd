"""Top-1/top-5 classification evaluator, optionally with the agreement with a reference model."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ..utils import comm
from .evaluator import DatasetEvaluator

logger = logging.getLogger(__name__)

__all__ = ["ClassificationEvaluator", "PREDICTIONS_FILE"]

PREDICTIONS_FILE = "predictions.json"


class ClassificationEvaluator(DatasetEvaluator):
    """Top-k accuracy (in %) of logits Tensor[B, num_classes] against labels Tensor[B].

    Given a reference model's logits on the same images (``process(inputs, outputs, reference_outputs)``, e.g. the
    uncompressed teacher's, from :func:`inference_on_dataset`), it also reports ``kl_to_reference``, the mean
    ``KL(softmax(reference) || softmax(model))`` in nats, and ``top1_agreement``, the % of images where both models
    predict the same class. Unlike accuracy, these need no labels and vary smoothly, so they separate close variants
    on a few hundred images. With ``per_image``, ``top1_per_image`` lists every image's top-1 hit (for paired
    comparisons of two models). With ``output_dir``, ``predictions.json`` there receives every image's top-1 class
    and label (in the dataset's order).
    """

    def __init__(self, topk: Sequence[int] = (1, 5), per_image: bool = False, output_dir: str = "") -> None:
        self.topk = tuple(topk)
        self.per_image = per_image
        self.output_dir = output_dir
        self.reset()

    def reset(self) -> None:
        self._hits: list = []
        self._predictions: list = []  # (top-1 class, label) per image, this process's share
        self._correct = torch.zeros(len(self.topk), dtype=torch.long)
        self._count = 0
        self._kl_sum = torch.zeros((), dtype=torch.float64)
        self._agree = torch.zeros((), dtype=torch.long)
        self._compared = torch.zeros((), dtype=torch.long)  # images that came with reference logits

    def process(self, inputs: Any, outputs: torch.Tensor, reference_outputs: Optional[torch.Tensor] = None) -> None:
        labels = inputs[1].to(outputs.device)
        pred = outputs.topk(max(self.topk), dim=1).indices
        hit = pred == labels.unsqueeze(1)
        for i, k in enumerate(self.topk):
            self._correct[i] += int(hit[:, :k].any(1).sum())
        self._count += labels.numel()
        if self.per_image:
            self._hits += hit[:, :1].any(1).tolist()
        if self.output_dir:
            self._predictions += list(zip(pred[:, 0].tolist(), labels.tolist()))
        if reference_outputs is not None:
            ref = reference_outputs.float()
            self._compared += labels.numel()
            self._kl_sum += float(F.kl_div(F.log_softmax(outputs.float(), 1), F.log_softmax(ref, 1),
                                           reduction="sum", log_target=True))
            self._agree += int((ref.argmax(1) == outputs.argmax(1)).sum())

    def evaluate(self) -> Dict[str, float]:
        correct, count = comm.all_reduce_sum(self._correct.clone()), comm.all_reduce_sum(torch.tensor(self._count))
        count = int(count)
        if count == 0:
            raise ValueError("ClassificationEvaluator received no samples")
        out = {f"top{k}": 100.0 * float(c) / count for k, c in zip(self.topk, correct)}
        compared = int(comm.all_reduce_sum(self._compared.clone()))  # on every rank: each takes part in the sums
        kl, agree = comm.all_reduce_sum(self._kl_sum.clone()), comm.all_reduce_sum(self._agree.clone())
        if compared:
            if compared != count:
                raise ValueError(f"reference logits came with {compared} of {count} images; allowed: all or none")
            out["kl_to_reference"] = float(kl) / count
            out["top1_agreement"] = 100.0 * float(agree) / count
        out["n_images"] = count
        if self.per_image:  # in the loader's order (one process: the dataset's order)
            if comm.get_world_size() > 1:
                raise RuntimeError("per-image results are kept in one process only")
            out["top1_per_image"] = [bool(h) for h in self._hits]
        if self.output_dir:
            self._write_predictions()
        return out

    def _write_predictions(self) -> None:
        """``predictions.json``: ``{"top1": [...], "label": [...]}`` in the dataset's order (rank r held the images
        r, r + world, ...: they are interleaved back)."""
        shares = comm.gather(self._predictions)
        if not comm.is_main_process():
            return
        ordered = [share[k] for k in range(max(map(len, shares))) for share in shares if k < len(share)]
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, PREDICTIONS_FILE)
        with open(path, "w") as f:
            json.dump({"top1": [p[0] for p in ordered], "label": [p[1] for p in ordered]}, f)
        logger.info("wrote %d predictions to %s", len(ordered), path)
