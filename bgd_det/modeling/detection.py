"""Built-in detection architectures: torchvision Mask R-CNN (v1, v2) and Faster R-CNN, ResNet-50-FPN.

The builders return the *uncompressed* model with random weights; teacher weights come afterwards through
``MODEL.WEIGHTS`` (a torchvision weights enum such as ``"MaskRCNN_ResNet50_FPN_Weights.COCO_V1"``, ``"DEFAULT"``,
or a local state dict). ``MODEL.NUM_CLASSES`` counts the background: 91 for torchvision's COCO weights (labels are
COCO category ids), ``len(categories) + 1`` for a custom dataset (contiguous labels).

The v1 models are built with torchvision's ``FrozenBatchNorm2d`` (as its COCO-trained weights are) unless
``DETECTION.FROZEN_BN`` is False; the v2 model uses ``nn.BatchNorm2d`` everywhere, as torchvision's does. Input
resizing (``INPUT.MIN_SIZE_TEST`` / ``INPUT.MAX_SIZE_TEST``) and the inference settings of ``cfg.DETECTION`` are
passed to the model.
"""
from __future__ import annotations

from typing import Callable, Dict

import torchvision
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from .registry import ARCH_REGISTRY

__all__ = ["TORCHVISION_DETECTORS", "detector_kwargs", "frozen_bn_eps"]

#: registered name -> torchvision model (for the weights API).
TORCHVISION_DETECTORS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn")


def detector_kwargs(cfg) -> Dict:
    """Keyword arguments of torchvision's ``MaskRCNN``/``FasterRCNN`` taken from ``cfg``."""
    return dict(
        num_classes=cfg.MODEL.NUM_CLASSES,
        min_size=cfg.INPUT.MIN_SIZE_TEST,
        max_size=cfg.INPUT.MAX_SIZE_TEST,
        rpn_pre_nms_top_n_test=cfg.DETECTION.RPN_PRE_NMS_TOPK_TEST,
        rpn_post_nms_top_n_test=cfg.DETECTION.RPN_POST_NMS_TOPK_TEST,
        box_score_thresh=cfg.DETECTION.SCORE_THRESH_TEST,
        box_detections_per_img=cfg.DETECTION.DETECTIONS_PER_IMAGE,
    )


def frozen_bn_eps(model: nn.Module, eps: float) -> nn.Module:
    """Set ``eps`` of every ``FrozenBatchNorm2d`` (torchvision's ``overwrite_eps``; eps is not in state dicts)."""
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = float(eps)
    return model


def _v1(cfg, head: Callable[..., nn.Module]) -> nn.Module:
    norm = FrozenBatchNorm2d if cfg.DETECTION.FROZEN_BN else nn.BatchNorm2d
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=norm), trainable_layers=5)
    model = head(backbone, **detector_kwargs(cfg))
    return frozen_bn_eps(model, cfg.DETECTION.FROZEN_BN_EPS)


def _register(name: str, build: Callable[..., nn.Module], doc: str) -> None:
    build.__name__ = name
    build.__doc__ = doc
    build.task = "detection"
    ARCH_REGISTRY.register(build)


_register("maskrcnn_resnet50_fpn", lambda cfg: _v1(cfg, MaskRCNN),
          "torchvision Mask R-CNN ResNet-50-FPN (v1; FrozenBatchNorm2d per DETECTION.FROZEN_BN).")
_register("fasterrcnn_resnet50_fpn", lambda cfg: _v1(cfg, FasterRCNN),
          "torchvision Faster R-CNN ResNet-50-FPN (v1; FrozenBatchNorm2d per DETECTION.FROZEN_BN).")
_register("maskrcnn_resnet50_fpn_v2",
          lambda cfg: torchvision.models.detection.maskrcnn_resnet50_fpn_v2(
              weights=None, weights_backbone=None, trainable_backbone_layers=5, **detector_kwargs(cfg)),
          "torchvision Mask R-CNN ResNet-50-FPN v2 (BatchNorm2d in backbone, FPN and heads).")
