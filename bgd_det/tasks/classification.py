"""Image classification task (ImageNet-style folders, top-1/top-5, KL distillation on logits)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from ..data import DatasetCatalog
from ..data.loader import build_loader
from ..data.imagenet import eval_transform, train_transform
from ..evaluation import ClassificationEvaluator, inference_on_dataset
from ..utils import comm
from .base import TASK_REGISTRY, Task

__all__ = ["ClassificationTask", "kl_distill_loss", "mix_images"]


def kl_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over the batch; logits Tensor[B, C]."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                    reduction="batchmean", log_target=True) * (t * t)


def mix_images(images: torch.Tensor, alpha: float, rng: np.random.Generator) -> torch.Tensor:
    """Mixup of a batch with a shuffled copy of itself: ``lam * x + (1 - lam) * x[perm]``, one
    ``lam ~ Beta(alpha, alpha)`` per image; images Tensor[B, C, H, W] -> Tensor[B, C, H, W]."""
    b = images.shape[0]
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=b)).to(images).view(b, *([1] * (images.dim() - 1)))
    perm = torch.from_numpy(rng.permutation(b)).to(images.device)
    return lam * images + (1 - lam) * images[perm]


@TASK_REGISTRY.register()
class ClassificationTask(Task):
    name = "classification"
    main_metrics = ("top1", "top5")
    #: the config keys that decide what :meth:`evaluate` scores (the images and their preprocessing)
    eval_keys = ("DATASETS.TEST", "DATASETS.TEST_MAX_IMAGES", "INPUT.RESIZE", "INPUT.CROP")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.device = torch.device(cfg.MODEL.DEVICE)
        self._calib = None
        self._mix_rng = np.random.default_rng([cfg.SEED, comm.get_rank()])

    def reseed(self, seed: int) -> None:
        self._mix_rng = np.random.default_rng([seed, comm.get_rank()])

    def calib_dataset(self):
        if self._calib is None:
            self._calib = DatasetCatalog.get(self.cfg.DATASETS.CALIB)
        return self._calib

    def calib_size(self) -> int:
        return len(self.calib_dataset())

    def example_forward(self, model: nn.Module) -> Any:
        return model(torch.zeros(1, 3, self.cfg.INPUT.CROP, self.cfg.INPUT.CROP, device=self.device))

    def calib_batches(self, *, n_images: int, batch_size: int, augment: bool, seed: int) -> Iterator[Any]:
        base = self.calib_dataset()
        ds = base.with_transform(train_transform(self.cfg.INPUT.CROP) if augment
                                 else eval_transform(self.cfg.INPUT.RESIZE, self.cfg.INPUT.CROP))
        rank, world = comm.get_rank(), comm.get_world_size()
        if len(ds) == 0 and n_images > 0:
            raise ValueError(f"DATASETS.CALIB {self.cfg.DATASETS.CALIB!r} holds no images")
        gen = torch.Generator().manual_seed(seed)
        # An epoch-free stream: concatenated seeded permutations, truncated to n_images, sharded by rank.
        order = []
        while len(order) < n_images:
            order += torch.randperm(len(ds), generator=gen).tolist()
        order = order[:n_images][rank::world]
        loader = build_loader(Subset(ds, order), batch_size=max(1, batch_size // world), cfg=self.cfg)
        for images, labels in loader:
            yield images.to(self.device), labels.to(self.device)

    def forward(self, model: nn.Module, batch: Any) -> Any:
        return model(batch[0])

    def model_input(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def distill_loss(self, student: nn.Module, teacher: nn.Module, batch: Any) -> torch.Tensor:
        """KL to the teacher's logits; with ``FINETUNE.MIXUP_ALPHA`` > 0 both models see the same mixed-up
        images ("function matching": the student copies the teacher between the calibration images too)."""
        images = batch[0]
        if self.cfg.FINETUNE.MIXUP_ALPHA > 0:
            images = mix_images(images, self.cfg.FINETUNE.MIXUP_ALPHA, self._mix_rng)
        with torch.no_grad():
            target = teacher(images)
        return kl_distill_loss(student(images), target, self.cfg.FINETUNE.TEMPERATURE)

    def test_loader(self) -> Iterable:
        ds = DatasetCatalog.get(self.cfg.DATASETS.TEST)
        ds = ds.with_transform(eval_transform(self.cfg.INPUT.RESIZE, self.cfg.INPUT.CROP))
        indices = list(range(len(ds)))
        if self.cfg.DATASETS.TEST_MAX_IMAGES > 0:
            indices = indices[: self.cfg.DATASETS.TEST_MAX_IMAGES]
        indices = indices[comm.get_rank()::comm.get_world_size()]
        return build_loader(Subset(ds, indices), batch_size=self.cfg.TEST.BATCH_SIZE, cfg=self.cfg)

    def evaluate(self, model: nn.Module, *, reference: Optional[nn.Module] = None, output_dir: str = "",
                 reference_output_dir: Optional[str] = None, per_image: bool = False) -> Dict[str, Any]:
        """Top-1/top-5 (%) on ``DATASETS.TEST``; with ``reference`` also its KL and top-1 agreement to it; with
        ``per_image`` also every image's top-1 hit (``top1_per_image``, in the dataset's order); ``output_dir``
        receives ``predictions.json`` (every image's top-1 class and label). With ``reference_output_dir`` (a
        path, or "" for nowhere) the reference is scored too, from the same pass (``"reference"``)."""
        device = self.device
        evaluator = ClassificationEvaluator(per_image=per_image, output_dir=output_dir)
        reference_evaluator = (None if reference_output_dir is None
                               else ClassificationEvaluator(per_image=per_image, output_dir=reference_output_dir))
        return inference_on_dataset(model, self.test_loader(), evaluator, forward=lambda m, b: m(b[0].to(device)),
                                    reference=reference, reference_evaluator=reference_evaluator,
                                    desc=self.cfg.DATASETS.TEST)

