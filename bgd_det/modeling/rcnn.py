"""torchvision two-stage detectors (``GeneralizedRCNN``) run stage by stage: the functions the detection task's
losses and the streaming engine's stages are written with.

The forward follows torchvision's eval-mode forward (transform -> backbone.body -> backbone.fpn -> rpn.head ->
proposals -> box head/predictor -> mask head), except that the RPN head is called once per FPN level (an activation
capture of its shared conv then sees all five levels) and the heads run on given proposals.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from ..quantization.capture import StopForward
from .stages import Stage

__all__ = ["RPNStage", "rpn_stage", "rpn_proposals", "box_outputs", "mask_outputs", "model_num_classes",
           "FORWARD_KEYS", "rcnn_stages"]


@dataclass
class RPNStage:
    """The detector up to the RPN head, for a batch of B images.

    Attributes:
        images: the resized, normalised ImageList; targets: targets resized alike (or None);
        features: FPN outputs (``OrderedDict`` of Tensor[B, 256, h_l, w_l]);
        objectness (Tensor[B * A, 1]), deltas (Tensor[B * A, 4]): RPN outputs over all A anchors of an image;
        anchors: list of B Tensor[A, 4]; anchors_per_level: A split by FPN level.
    """

    images: ImageList
    targets: Optional[List[Dict[str, Tensor]]]
    features: Dict[str, Tensor]
    objectness: Tensor
    deltas: Tensor
    anchors: List[Tensor]
    anchors_per_level: List[int]


def rpn_stage(model: nn.Module, images: Sequence[Tensor],
              targets: Optional[List[Dict[str, Tensor]]] = None) -> RPNStage:
    """Transform, backbone and RPN head of ``model`` (a torchvision ``GeneralizedRCNN``) on ``images``.

    Args:
        images: B tensors Tensor[3, H_i, W_i] in [0, 1]; targets: optional torchvision targets (resized too).
    """
    image_list, targets = model.transform(list(images), targets)
    features = model.backbone(image_list.tensors)
    return _rpn_head(model, image_list, targets, features)


def _rpn_head(model: nn.Module, image_list: ImageList, targets: Optional[List[Dict[str, Tensor]]],
              features: Dict[str, Tensor]) -> RPNStage:
    """The RPN head on every FPN level of ``features`` (one call per level), anchors and the concatenation."""
    feats = list(features.values())
    objectness, deltas = [], []
    stopped = False
    for level in feats:  # one call per level: a capture hook on the shared head sees every level
        try:
            o, d = model.rpn.head([level])
        except StopForward:
            stopped = True
            continue
        objectness += o
        deltas += d
    if stopped:
        raise StopForward
    anchors = model.rpn.anchor_generator(image_list, feats)
    per_level = [int(o[0].numel()) for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    return RPNStage(image_list, targets, features, objectness, deltas, anchors, per_level)


def rpn_proposals(model: nn.Module, stage: RPNStage, top_n: int = 0) -> List[Tensor]:
    """Eval-mode proposals (decode, per-level top-k, NMS), best first; at most ``top_n`` per image (0 = all)."""
    boxes = model.rpn.box_coder.decode(stage.deltas.detach(), stage.anchors).view(len(stage.anchors), -1, 4)
    proposals, _ = model.rpn.filter_proposals(boxes, stage.objectness.detach(), stage.images.image_sizes,
                                              stage.anchors_per_level)
    return [p[:top_n] for p in proposals] if top_n else proposals


def box_outputs(model: nn.Module, stage: RPNStage, proposals: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Box head on ``proposals``: class logits Tensor[R, C] and box deltas Tensor[R, 4 C] (R = all images')."""
    heads = model.roi_heads
    x = heads.box_head(heads.box_roi_pool(stage.features, proposals, stage.images.image_sizes))
    return heads.box_predictor(x)


def mask_outputs(model: nn.Module, stage: RPNStage, proposals: List[Tensor]) -> Optional[Tensor]:
    """Mask logits Tensor[R, C, 28, 28] on ``proposals`` (None for a model without a mask head)."""
    heads = model.roi_heads
    if not heads.has_mask():
        return None
    x = heads.mask_head(heads.mask_roi_pool(stage.features, proposals, stage.images.image_sizes))
    return heads.mask_predictor(x)


def model_num_classes(model: nn.Module) -> int:
    """Classes (with background) of a torchvision detector, dense or compressed."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    cls_score = model.roi_heads.box_predictor.cls_score
    return int(cls_score.out_features)


# -- the detector as sequential stages (streaming engine) --------------------------------------------------------
#: the outputs of :meth:`DetectionTask.forward`, which the last stage returns too.
FORWARD_KEYS = ("objectness", "rpn_deltas", "proposals", "class_logits", "box_deltas", "mask_logits")


def rcnn_stages(model: nn.Module, *, box_proposals: int, mask_proposals: int) -> List[Stage]:
    """:meth:`DetectionTask.forward` of a torchvision R-CNN with a ResNet-FPN backbone as sequential stages.

    States between stages are dicts: after the transform and the body's stem, one stage per residual block of
    ``backbone.body`` (the outputs its ``return_layers`` name are collected), the FPN, the RPN (head on every level,
    proposals), the box head on each model's top ``box_proposals`` proposals, the mask head on the top
    ``mask_proposals``, and a last stage that returns the forward's outputs (:data:`FORWARD_KEYS`).
    """
    body = model.backbone.body
    returns = dict(body.return_layers)

    def stem(m: nn.Module, images: Sequence[Tensor]) -> Dict[str, Any]:
        image_list, _ = m.transform(list(images), None)
        b = m.backbone.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(image_list.tensors))))
        return {"tensors": image_list.tensors, "sizes": image_list.image_sizes, "x": x, "c": {}}

    def block(layer: str, index: int, last: bool):
        def run(m: nn.Module, state: Dict[str, Any]) -> Dict[str, Any]:
            x = m.get_submodule(f"backbone.body.{layer}.{index}")(state["x"])
            c = dict(state["c"], **({returns[layer]: x} if last and layer in returns else {}))
            return {**state, "x": x, "c": c}
        return run

    def fpn(m: nn.Module, state: Dict[str, Any]) -> Dict[str, Any]:
        features = m.backbone.fpn(OrderedDict(state["c"]))
        return {"tensors": state["tensors"], "sizes": state["sizes"], "features": features}

    def rpn(m: nn.Module, state: Dict[str, Any]) -> Dict[str, Any]:
        stage = _rpn_head(m, ImageList(state["tensors"], state["sizes"]), None, state["features"])
        return {"sizes": state["sizes"], "features": state["features"], "objectness": stage.objectness,
                "rpn_deltas": stage.deltas, "proposals": rpn_proposals(m, stage, box_proposals)}

    def boxes(m: nn.Module, state: Dict[str, Any]) -> Dict[str, Any]:
        cls, deltas = box_outputs(m, _HeadInput(state), state["proposals"])
        return {**state, "class_logits": cls, "box_deltas": deltas}

    def masks(m: nn.Module, state: Dict[str, Any]) -> Dict[str, Any]:
        logits = mask_outputs(m, _HeadInput(state), [p[:mask_proposals] for p in state["proposals"]])
        return {**state, "mask_logits": logits}

    stages = [Stage("stem", ("transform", "backbone.body.conv1", "backbone.body.bn1", "backbone.body.relu",
                             "backbone.body.maxpool"), stem)]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        n = len(body.get_submodule(layer))
        stages += [Stage(f"{layer}.{i}", (f"backbone.body.{layer}.{i}",), block(layer, i, i == n - 1))
                   for i in range(n)]
    def teacher_proposals(student: Dict[str, Any], teacher: Dict[str, Any]) -> Dict[str, Any]:
        return {**student, "proposals": teacher["proposals"]}  # the heads pair the same boxes

    stages += [Stage("fpn", ("backbone.fpn",), fpn), Stage("rpn", ("rpn",), rpn, pair=teacher_proposals),
               Stage("box_head", ("roi_heads.box_roi_pool", "roi_heads.box_head", "roi_heads.box_predictor"), boxes)]
    if model.roi_heads.has_mask():
        stages.append(Stage("mask_head", ("roi_heads.mask_roi_pool", "roi_heads.mask_head",
                                          "roi_heads.mask_predictor"), masks))
    stages.append(Stage("outputs", (), lambda m, state: {k: state.get(k) for k in FORWARD_KEYS}))
    return stages


class _HeadInput:
    """What :func:`box_outputs` / :func:`mask_outputs` read of an :class:`RPNStage`, from a stage state."""

    def __init__(self, state: Dict[str, Any]) -> None:
        self.features = state["features"]
        self.images = ImageList(torch.empty(0), state["sizes"])
