"""Detection task (torchvision Mask R-CNN / Faster R-CNN on COCO-style data).

The engine sees a detector through this task:

- ``forward`` / ``example_forward`` run the detector stage by stage (:mod:`bgd_det.modeling.rcnn`), as
  torchvision's eval-mode forward, except that the mask head runs on the ``DETECTION.DISTILL_MASK_PROPOSALS``
  top-scoring proposals of every image instead of on the final detections, so every layer runs on every batch (a
  model with no detections above the score threshold would never reach its mask head).
- ``distill_loss`` (``DETECTION.LOSS``):

  * ``"distill"`` (default, label-free): the student runs on the *teacher's* proposals, and the loss sums
    (1) binary KL of RPN objectness over all anchors, (2) smooth-L1 of RPN deltas weighted by the teacher's
    objectness probability, (3) KL of box-head class logits (``FINETUNE.TEMPERATURE``), (4) smooth-L1 of
    per-class box deltas weighted by the teacher's class probabilities, (5) binary KL of mask logits of the
    teacher's top class on the top mask proposals. Every term is zero when student == teacher.
  * ``"supervised"``: torchvision's five Mask R-CNN training losses on the annotations of ``DATASETS.CALIB``
    (RPN anchor sampling, 512 sampled RoIs per image, masks of the positive RoIs), computed in eval mode so
    BatchNorm statistics never change.
  * ``"both"``: their sum.

- ``evaluate``: COCO box/mask AP (``COCOEvaluator``) on ``DATASETS.TEST`` (first ``DATASETS.TEST_MAX_IMAGES``).
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from torchvision.models.detection.roi_heads import fastrcnn_loss, maskrcnn_loss

from ..config.checks import DETECTION_LOSSES
from ..data import DatasetCatalog
from ..data.loader import build_loader
from ..data.coco import CocoInstances, annotations_to_target, hflip
from ..evaluation.coco_evaluation import COCOEvaluator
from ..evaluation.evaluator import inference_on_dataset
from ..modeling.rcnn import (RPNStage, box_outputs, mask_outputs, model_num_classes, rcnn_stages, rpn_proposals,
                             rpn_stage)
from ..modeling.stages import Stage
from ..utils import comm
from .base import TASK_REGISTRY, Task
from .classification import kl_distill_loss

logger = logging.getLogger(__name__)

__all__ = ["DetectionTask", "distill_terms", "supervised_terms", "LOSSES"]

LOSSES = DETECTION_LOSSES  # DETECTION.LOSS (bgd_det.config.checks)


@dataclass
class _TeacherOutputs:
    objectness: Tensor
    deltas: Tensor
    proposals: List[Tensor]
    class_logits: Tensor
    box_deltas: Tensor
    mask_proposals: List[Tensor]
    mask_logits: Optional[Tensor]


def _binary_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean KL(Bernoulli(sigmoid t) || Bernoulli(sigmoid s)) over elements; zero when equal."""
    p = torch.sigmoid(teacher)
    return (F.binary_cross_entropy_with_logits(student, p, reduction="mean")
            - F.binary_cross_entropy_with_logits(teacher, p, reduction="mean"))


def _mask_rows(proposals: List[Tensor], n_mask: Sequence[int]) -> Tensor:
    """Rows of the first ``n_mask[i]`` proposals of every image in the concatenated box-head outputs."""
    rows, offset = [], 0
    for p, n in zip(proposals, n_mask):
        rows.append(torch.arange(offset, offset + n, device=p.device))
        offset += p.shape[0]
    return torch.cat(rows)


def _teacher_outputs(teacher: nn.Module, images: Sequence[Tensor], *, box_rois: int,
                     mask_rois: int) -> _TeacherOutputs:
    with torch.no_grad():
        stage = rpn_stage(teacher, images)
        proposals = rpn_proposals(teacher, stage, box_rois)
        cls, deltas = box_outputs(teacher, stage, proposals)
        mask_props = [p[:mask_rois] for p in proposals]
        masks = mask_outputs(teacher, stage, mask_props)
    return _TeacherOutputs(stage.objectness, stage.deltas, proposals, cls, deltas, mask_props, masks)


def distill_terms(student: nn.Module, stage: RPNStage, teacher: _TeacherOutputs, *,
                  temperature: float = 1.0) -> Dict[str, Tensor]:
    """The label-free distillation terms of ``student`` (already run to ``stage``) against ``teacher``."""
    terms = {"distill_rpn_obj": _binary_kl(stage.objectness, teacher.objectness)}
    w = torch.sigmoid(teacher.objectness)  # Tensor[B*A, 1]
    rpn_l1 = F.smooth_l1_loss(stage.deltas, teacher.deltas, beta=1 / 9, reduction="none").sum(1, keepdim=True)
    terms["distill_rpn_box"] = (w * rpn_l1).sum() / w.sum().clamp_min(1e-6)

    cls, deltas = box_outputs(student, stage, teacher.proposals)
    n_rois = max(cls.shape[0], 1)
    terms["distill_cls"] = kl_distill_loss(cls, teacher.class_logits, temperature)
    n_cls = cls.shape[1]
    prob = F.softmax(teacher.class_logits, 1)[:, 1:]  # foreground classes
    box_l1 = F.smooth_l1_loss(deltas.view(-1, n_cls, 4), teacher.box_deltas.view(-1, n_cls, 4), beta=1 / 9,
                              reduction="none").sum(2)[:, 1:]
    terms["distill_box"] = (prob * box_l1).sum() / n_rois

    if teacher.mask_logits is not None:
        masks = mask_outputs(student, stage, teacher.mask_proposals)
        rows = _mask_rows(teacher.proposals, [p.shape[0] for p in teacher.mask_proposals])
        top = teacher.class_logits[rows, 1:].argmax(1) + 1
        idx = torch.arange(top.shape[0], device=top.device)
        if top.numel():
            terms["distill_mask"] = _binary_kl(masks[idx, top], teacher.mask_logits[idx, top])
        else:
            terms["distill_mask"] = masks.sum() * 0.0
    return terms


def supervised_terms(model: nn.Module, stage: RPNStage) -> Dict[str, Tensor]:
    """torchvision's Mask R-CNN training losses of ``model`` (run to ``stage`` with targets), in eval mode."""
    targets = stage.targets
    if targets is None:
        raise ValueError("supervised detection losses need annotations (targets)")
    rpn, heads = model.rpn, model.roi_heads
    labels, matched = rpn.assign_targets_to_anchors(stage.anchors, targets)
    regression = rpn.box_coder.encode(matched, stage.anchors)
    loss_obj, loss_rpn_box = rpn.compute_loss(stage.objectness, stage.deltas, labels, regression)
    proposals = rpn_proposals(model, stage)
    proposals, matched_idxs, labels, regression = heads.select_training_samples(proposals, targets)
    cls, deltas = box_outputs(model, stage, proposals)
    loss_cls, loss_box = fastrcnn_loss(cls, deltas, labels, regression)
    terms = {"loss_objectness": loss_obj, "loss_rpn_box_reg": loss_rpn_box, "loss_classifier": loss_cls,
             "loss_box_reg": loss_box}
    if heads.has_mask():
        pos = [torch.where(lab > 0)[0] for lab in labels]
        pos_props = [p[i] for p, i in zip(proposals, pos)]
        pos_matched = [m[i] for m, i in zip(matched_idxs, pos)]
        masks = mask_outputs(model, stage, pos_props)
        terms["loss_mask"] = maskrcnn_loss(masks, pos_props, [t["masks"] for t in targets],
                                           [t["labels"] for t in targets], pos_matched)
    return terms


def _student_call(runner: nn.Module, fn: Callable[..., Any], *args) -> Any:
    """``fn(student, *args)``, through DistributedDataParallel's forward when ``runner`` wraps the student (so its
    gradient synchronisation sees the computation)."""
    if not isinstance(runner, DistributedDataParallel):
        return fn(runner, *args)
    module = runner.module
    module.forward = functools.partial(fn, module)  # instance attribute: DDP calls module(...) -> this
    try:
        return runner(*args)
    finally:
        del module.forward


# -- the task --------------------------------------------------------------------------------------------------
def _collate(items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return items


def _weights_num_classes(weights: str) -> Optional[Tuple[int, str]]:
    """Classes of the teacher ``weights`` (torchvision enum or local state dict), when it can be told cheaply."""
    if not weights:
        return None
    if "_Weights." in weights and not os.path.exists(weights):
        try:
            enum = torchvision.models.get_weight(weights)
        except (ValueError, KeyError, AttributeError):
            return None  # load_weights reports unknown names
        categories = enum.meta.get("categories")
        return (len(categories), str(enum)) if categories else None
    if os.path.isfile(weights):
        try:
            obj = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return None  # load_weights reports unreadable files
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            obj = obj["model"]
        for key in ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.codes"):
            if isinstance(obj, dict) and isinstance(obj.get(key), Tensor):
                return int(obj[key].shape[0]), weights
    return None


@TASK_REGISTRY.register()
class DetectionTask(Task):
    """Task of torchvision two-stage detectors; see the module docstring for the loss design."""

    name = "detection"
    main_metrics = ("box_AP", "mask_AP")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.device = torch.device(cfg.MODEL.DEVICE)
        if cfg.FINETUNE.MIXUP_ALPHA != 0:
            raise ValueError(f"FINETUNE.MIXUP_ALPHA={cfg.FINETUNE.MIXUP_ALPHA}; allowed for detection: 0 "
                             "(mixup is a classification option)")
        found = _weights_num_classes(cfg.MODEL.WEIGHTS)
        if found is not None and found[0] != cfg.MODEL.NUM_CLASSES:
            raise ValueError(f"category mismatch: MODEL.WEIGHTS {found[1]} has {found[0]} classes but "
                             f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES}; set MODEL.NUM_CLASSES {found[0]}")
        self._datasets: Dict[str, CocoInstances] = {}
        #: the loss terms of the last ``distill_loss`` call (floats), for logs and tests.
        self.last_terms: Dict[str, float] = {}

    # -- data ----------------------------------------------------------------------------------------------
    def dataset(self, name: str) -> CocoInstances:
        if name not in self._datasets:
            ds = DatasetCatalog.get(name)
            if not isinstance(ds, CocoInstances):
                raise ValueError(f"dataset {name!r} is a {type(ds).__name__}, not a COCO instances dataset: a "
                                 f"detector needs COCO-style DATASETS.CALIB / TEST (e.g. coco_2017_val)")
            self._datasets[name] = ds
        return self._datasets[name]

    @property
    def needs_targets(self) -> bool:
        return self.cfg.DETECTION.LOSS in ("supervised", "both")

    def calib_size(self) -> int:
        return len(self.dataset(self.cfg.DATASETS.CALIB))

    def example_forward(self, model: nn.Module) -> Any:
        size = self.cfg.INPUT.MIN_SIZE_TEST
        image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)).to(self.device)
        return self.forward(model, {"images": [image]})

    def calib_batches(self, *, n_images: int, batch_size: int, augment: bool, seed: int) -> Iterator[Any]:
        """Batches ``{"images": [Tensor[3, H, W]], "targets": [dict] or None, "image_ids": [int]}``."""
        name = self.cfg.DATASETS.CALIB
        ds = self.dataset(name)
        labels = ds.label_map(self.cfg.MODEL.NUM_CLASSES) if self.needs_targets else None
        rank, world = comm.get_rank(), comm.get_world_size()
        if len(ds) == 0 and n_images > 0:
            raise ValueError(f"DATASETS.CALIB {name!r} holds no images")
        gen = torch.Generator().manual_seed(seed)
        order: List[int] = []
        while len(order) < n_images:
            order += torch.randperm(len(ds), generator=gen).tolist()
        order = order[:n_images]
        flips = (torch.rand(len(order), generator=gen) < self.cfg.DETECTION.FLIP_PROB).tolist()
        flips = [f and augment for f in flips][rank::world]
        loader = build_loader(Subset(ds, order[rank::world]), batch_size=max(1, batch_size // world), cfg=self.cfg,
                              collate_fn=_collate)
        k = 0
        for items in loader:
            images, targets = [], []
            for item in items:
                target = None
                if labels is not None:
                    target = annotations_to_target(item["annotations"], height=item["height"],
                                                   width=item["width"], labels=labels,
                                                   with_masks=True)
                image = item["image"]
                if flips[k]:
                    image, target = hflip(image, target)
                k += 1
                images.append(image.to(self.device))
                if target is not None:
                    targets.append({key: v.to(self.device) for key, v in target.items()})
            yield {"images": images, "targets": targets if labels is not None else None,
                   "image_ids": [item["image_id"] for item in items]}

    # -- forward / loss ------------------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Any, *, proposals_from: Optional[nn.Module] = None
                ) -> Dict[str, Any]:
        """Every layer of the detector on ``batch["images"]`` (see the module docstring); returns the outputs.

        Args:
            proposals_from: a model (the teacher) whose proposals the heads run on instead of ``model``'s own.
        """
        d = self.cfg.DETECTION
        stage = rpn_stage(model, batch["images"])
        source, source_stage = model, stage
        if proposals_from is not None:  # computed only once the student's RPN has run (captures stop earlier)
            with torch.no_grad():
                source, source_stage = proposals_from, rpn_stage(proposals_from, batch["images"])
        proposals = rpn_proposals(source, source_stage, d.DISTILL_BOX_PROPOSALS)
        cls, deltas = box_outputs(model, stage, proposals)
        masks = mask_outputs(model, stage, [p[: d.DISTILL_MASK_PROPOSALS] for p in proposals])
        return {"objectness": stage.objectness, "rpn_deltas": stage.deltas, "proposals": proposals,
                "class_logits": cls, "box_deltas": deltas, "mask_logits": masks}

    def paired_forward(self, teacher: nn.Module) -> Callable[[nn.Module, Any], Any]:
        """:meth:`forward` in which any model but ``teacher`` runs its heads on the teacher's proposals, so the
        student's and the teacher's head inputs pair the same boxes (captures, as in distillation)."""
        def forward(model: nn.Module, batch: Any) -> Dict[str, Any]:
            return self.forward(model, batch, proposals_from=None if model is teacher else teacher)
        return forward

    def model_input(self, batch: Any) -> List[Tensor]:
        return batch["images"]

    def stages(self, model: nn.Module) -> Optional[List[Stage]]:
        """:func:`rcnn_stages` for torchvision R-CNNs with a ResNet-FPN backbone (None for other detectors)."""
        body = getattr(getattr(model, "backbone", None), "body", None)
        if body is None or not all(hasattr(body, k) for k in ("conv1", "layer1", "layer4", "return_layers")):
            return None
        d = self.cfg.DETECTION
        return rcnn_stages(model, box_proposals=d.DISTILL_BOX_PROPOSALS, mask_proposals=d.DISTILL_MASK_PROPOSALS)

    def distill_loss(self, student: nn.Module, teacher: nn.Module, batch: Any) -> Tensor:
        d = self.cfg.DETECTION
        teacher_out = None
        if d.LOSS in ("distill", "both"):
            teacher_out = _teacher_outputs(teacher, batch["images"], box_rois=d.DISTILL_BOX_PROPOSALS,
                                           mask_rois=d.DISTILL_MASK_PROPOSALS)
        targets = batch.get("targets")
        if self.needs_targets and targets is None:
            raise ValueError(f"DETECTION.LOSS={d.LOSS!r} needs annotated calibration batches")
        terms = _student_call(student, self._student_terms, batch["images"], targets, teacher_out)
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return sum(terms.values())

    def _student_terms(self, student: nn.Module, images, targets, teacher_out) -> Dict[str, Tensor]:
        stage = rpn_stage(student, images, targets if self.needs_targets else None)
        terms: Dict[str, Tensor] = {}
        if teacher_out is not None:
            terms.update(distill_terms(student, stage, teacher_out, temperature=self.cfg.FINETUNE.TEMPERATURE))
        if self.needs_targets:
            terms.update(supervised_terms(student, stage))
        return terms

    # -- evaluation ----------------------------------------------------------------------------------------
    def test_indices(self) -> List[int]:
        """Positions in ``DATASETS.TEST`` that evaluation runs on (every rank's together)."""
        indices = list(range(len(self.dataset(self.cfg.DATASETS.TEST))))
        if self.cfg.DATASETS.TEST_MAX_IMAGES > 0:
            indices = indices[: self.cfg.DATASETS.TEST_MAX_IMAGES]
        return indices

    def test_loader(self) -> Iterable:
        indices = self.test_indices()[comm.get_rank()::comm.get_world_size()]
        return build_loader(Subset(self.dataset(self.cfg.DATASETS.TEST), indices), batch_size=self.cfg.TEST.BATCH_SIZE,
                            cfg=self.cfg, collate_fn=_collate)

    def evaluate(self, model: nn.Module, *, reference: Optional[nn.Module] = None, output_dir: str = "",
                 reference_output_dir: Optional[str] = None, desc: str = "") -> Dict[str, Any]:
        """COCO box/mask AP (percent) of ``model`` on ``DATASETS.TEST``; with ``reference`` (run on the same images)
        also ``box_AP_vs_reference`` / ``mask_AP_vs_reference``, the AP against the reference's own detections
        scoring >= ``TEST.AGREEMENT_SCORE`` (``reference_instances`` of them); ``output_dir`` receives the results
        json. With ``reference_output_dir`` (a path, or "" for nowhere) the reference's own AP comes from the same
        pass (``"reference"``).

        Raises:
            ValueError: when the model's classes do not fit the dataset's categories.
        """
        name = self.cfg.DATASETS.TEST
        ds = self.dataset(name)
        labels = ds.label_map(model_num_classes(model))
        device = self.device

        def forward(m: nn.Module, batch: Dict[str, Any]):
            return m([item["image"].to(device) for item in batch["items"]])

        def evaluator_to(directory: str) -> COCOEvaluator:
            return COCOEvaluator(ds.coco, {v: k for k, v in labels.items()}, output_dir=directory,
                                 reference_score=self.cfg.TEST.AGREEMENT_SCORE)

        reference_evaluator = None if reference_output_dir is None else evaluator_to(reference_output_dir)
        # inference_on_dataset hands the raw batch to the evaluator: give it the image ids.
        return inference_on_dataset(model, _BatchWithIds(self.test_loader()), evaluator_to(output_dir),
                                    forward=forward, reference=reference, reference_evaluator=reference_evaluator,
                                    desc=desc or f"COCO eval {name}")


class _BatchWithIds:
    """Loader adapter: batches ``{"items": [...], "image_ids": [...]}`` for :class:`COCOEvaluator`."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for items in self.loader:
            yield {"items": items, "image_ids": [item["image_id"] for item in items]}

