"""COCO box / mask AP over pycocotools (as detectron2's ``COCOEvaluator``).

Predictions are torchvision detection outputs at image resolution; masks are thresholded at 0.5 and encoded as
RLE at image resolution. Mask AP is computed from the segmentations alone: the ``bbox`` field is removed from
the ``segm`` results, so pycocotools derives areas and boxes from the masks. Results of all ranks are gathered to
rank 0 (``comm.gather``) when torch.distributed is initialised.
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..utils import comm
from .evaluator import DatasetEvaluator

logger = logging.getLogger(__name__)

__all__ = ["COCOEvaluator", "instances_to_coco_json", "evaluate_coco_results", "agreement_with_reference",
           "RESULTS_FILE", "METRIC_NAMES"]

RESULTS_FILE = "coco_instances_results.json"
#: COCOeval ``stats[0:6]``; reported in percent, prefixed with ``box_`` / ``mask_``.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_PREFIX = {"bbox": "box", "segm": "mask"}


def instances_to_coco_json(output: Mapping[str, torch.Tensor], image_id: int,
                           label_to_category: Mapping[int, int]) -> List[Dict[str, Any]]:
    """COCO result dicts of one image's detections.

    Args:
        output: ``{"boxes": Tensor[N, 4] xyxy, "scores": Tensor[N], "labels": Tensor[N] int64,
            "masks": Tensor[N, 1, H, W] probabilities}`` (masks optional), at the image's resolution.
        label_to_category: model label -> COCO category id; detections of other labels are dropped.

    Returns:
        ``[{"image_id", "category_id", "bbox" (xywh), "score", "segmentation" (RLE, when masks)}]``.
    """
    boxes = output["boxes"].detach().float().cpu()
    if boxes.numel() == 0:
        return []
    boxes = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    scores = output["scores"].detach().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    rles = None
    if "masks" in output:
        masks = (output["masks"].detach()[:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("utf-8")  # json-serialisable
    results = []
    for k, (box, score, label) in enumerate(zip(boxes, scores, labels)):
        if label not in label_to_category:
            continue
        res = {"image_id": int(image_id), "category_id": int(label_to_category[label]), "bbox": box,
               "score": float(score)}
        if rles is not None:
            res["segmentation"] = rles[k]
        results.append(res)
    return results


def _load_results(coco_gt: COCO, results: List[Dict]) -> COCO:
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(results)
    empty = COCO()  # pycocotools' loadRes cannot take an empty list
    empty.dataset = {"images": list(coco_gt.dataset["images"]),
                     "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def evaluate_coco_results(coco_gt: COCO, results: Sequence[Dict], *, iou_type: str,
                          image_ids: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """Run COCOeval of ``iou_type`` ("bbox" or "segm") on ``results`` restricted to ``image_ids``.

    Returns:
        ``{"AP": ..., "AP50": ..., ...}`` in percent (``METRIC_NAMES``).
    """
    results = copy.deepcopy(list(results))
    if iou_type == "segm":
        results = [r for r in results if "segmentation" in r]
        for r in results:
            r.pop("bbox", None)  # mask AP from the masks alone
    coco_dt = _load_results(coco_gt, results)
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    if image_ids is not None:
        ev.params.imgIds = sorted(int(i) for i in image_ids)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    logger.info("COCOeval %s:\n%s", iou_type, out.getvalue().rstrip())
    # stats are -1 when no ground truth falls in a bucket; report those as NaN.
    return {name: (float(s) * 100.0 if s >= 0 else float("nan")) for name, s in zip(METRIC_NAMES, ev.stats)}


def agreement_with_reference(coco_gt: COCO, reference: Sequence[Dict], results: Sequence[Dict], *,
                             image_ids: Sequence[int], score_threshold: float = 0.5,
                             iou_types: Sequence[str] = ("bbox", "segm")) -> Dict[str, float]:
    """Label-free fidelity: COCO AP of ``results`` against the ``reference`` model's own detections (those scoring at
    least ``score_threshold``) taken as the ground truth, on ``image_ids``.

    Returns:
        ``{"box_AP_vs_reference": ..., "mask_AP_vs_reference": ..., "reference_instances": n}`` (percent; NaN when
        the reference keeps no detection; mask AP only when both carry masks).
    """
    ids = sorted(int(i) for i in image_ids)
    inside = set(ids)  # detections on other images are not scored (the pseudo ground truth holds only these)
    kept = [r for r in reference if r["score"] >= score_threshold and r["image_id"] in inside]
    results = [r for r in results if r["image_id"] in inside]
    out: Dict[str, float] = {"reference_instances": len(kept)}
    pseudo = {"images": [coco_gt.imgs[i] for i in ids], "categories": copy.deepcopy(coco_gt.dataset["categories"]),
              "annotations": []}
    for k, r in enumerate(kept):
        ann = {"id": k + 1, "image_id": r["image_id"], "category_id": r["category_id"], "bbox": list(r["bbox"]),
               "area": float(r["bbox"][2] * r["bbox"][3]), "iscrowd": 0}
        if "segmentation" in r:
            ann["segmentation"] = r["segmentation"]
            ann["area"] = float(mask_util.area(r["segmentation"]))
        pseudo["annotations"].append(ann)
    gt = COCO()
    gt.dataset = pseudo
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    masks = bool(kept) and all("segmentation" in r for r in kept) and any("segmentation" in r for r in results)
    for iou_type in iou_types:
        if iou_type == "segm" and not masks:
            continue
        key = f"{_PREFIX[iou_type]}_AP_vs_reference"
        out[key] = (evaluate_coco_results(gt, results, iou_type=iou_type, image_ids=ids)["AP"] if kept
                    else float("nan"))
    return out


class COCOEvaluator(DatasetEvaluator):
    """Box (and mask) AP of torchvision detection outputs against a COCO ground truth.

    Args:
        coco_gt: the ground truth (``CocoInstances.coco``). label_to_category: model label -> category id.
        iou_types: subset of ("bbox", "segm"); "segm" is skipped for outputs without masks.
        output_dir: where to write ``coco_instances_results.json`` and ``coco_metrics.json`` ("" = nowhere).
        reference_score: the score from which a reference model's detections count as its instances.

    ``process(inputs, outputs, reference_outputs)`` takes a batch with ``inputs["image_ids"]`` (list of ints), the
    list of per-image output dicts and, when :func:`inference_on_dataset` runs a reference model (e.g. the teacher),
    the reference's: the metrics then add the agreement with it (:func:`agreement_with_reference`).
    """

    def __init__(self, coco_gt: COCO, label_to_category: Mapping[int, int], *,
                 iou_types: Sequence[str] = ("bbox", "segm"), output_dir: str = "",
                 reference_score: float = 0.5) -> None:
        self.coco_gt, self.label_to_category = coco_gt, dict(label_to_category)
        unknown = [t for t in iou_types if t not in _PREFIX]
        if unknown:
            raise ValueError(f"unknown iou types {unknown}; allowed: {list(_PREFIX)}")
        self.iou_types, self.output_dir = tuple(iou_types), output_dir
        self.reference_score = reference_score
        self.reset()

    def reset(self) -> None:
        self._results: List[Dict] = []
        self._reference_results: List[Dict] = []
        self._image_ids: List[int] = []
        self._has_masks = False
        self._compared = False  # reference outputs came with the batches

    def process(self, inputs: Mapping[str, Any], outputs: Sequence[Mapping[str, torch.Tensor]],
                reference_outputs: Optional[Sequence[Mapping[str, torch.Tensor]]] = None) -> None:
        for image_id, output in zip(inputs["image_ids"], outputs):
            self._image_ids.append(int(image_id))
            self._has_masks |= "masks" in output
            self._results.extend(instances_to_coco_json(output, image_id, self.label_to_category))
        if reference_outputs is not None:
            self._compared = True
            for image_id, output in zip(inputs["image_ids"], reference_outputs):
                self._reference_results.extend(instances_to_coco_json(output, image_id, self.label_to_category))

    def evaluate(self) -> Dict[str, float]:
        """Metrics on rank 0 (``{}`` on the others): ``box_AP``, ``box_AP50``, ..., ``mask_AP``, ..., n_images."""
        gathered = comm.gather((self._results, self._image_ids, self._has_masks, self._reference_results,
                                self._compared))
        if not comm.is_main_process():
            return {}
        results = list(itertools.chain.from_iterable(g[0] for g in gathered))
        image_ids = sorted(set(itertools.chain.from_iterable(g[1] for g in gathered)))
        has_masks = any(g[2] for g in gathered)
        reference = list(itertools.chain.from_iterable(g[3] for g in gathered))
        compared = any(g[4] for g in gathered)
        if not image_ids:
            raise ValueError("COCOEvaluator received no images")
        if not results:
            logger.warning("no detections from the model on %d images: AP is 0", len(image_ids))
        if self.output_dir:  # before COCOeval, which can still fail: the detections are never lost
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, RESULTS_FILE), "w") as f:
                json.dump(results, f)
            logger.info("wrote %d detections to %s", len(results), os.path.join(self.output_dir, RESULTS_FILE))
        metrics: Dict[str, float] = {}
        for iou_type in self.iou_types:
            if iou_type == "segm" and not has_masks:
                continue
            stats = evaluate_coco_results(self.coco_gt, results, iou_type=iou_type, image_ids=image_ids)
            metrics.update({f"{_PREFIX[iou_type]}_{k}": v for k, v in stats.items()})
        if compared:
            metrics.update(agreement_with_reference(self.coco_gt, reference, results, image_ids=image_ids,
                                                    score_threshold=self.reference_score,
                                                    iou_types=self.iou_types))
        metrics["n_images"] = len(image_ids)
        if self.output_dir:
            with open(os.path.join(self.output_dir, "coco_metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
        return metrics
