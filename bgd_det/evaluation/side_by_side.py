"""The uncompressed teacher and the compressed detector side by side on COCO (``tools/eval_coco.py``): box / mask AP,
sizes, wall times, and the compressed model's AP against the teacher's own detections."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Tuple

import torch
from tabulate import tabulate
from torch import nn

from ..checkpoint import FORMAT, check_checkpoint_arch, check_compressed, compressed_model
from ..config.defaults import CfgNode
from ..modeling import build_teacher
from ..inference import for_evaluation
from ..quantization.size import model_size
from ..tasks.detection import DetectionTask
from ..utils import comm
from .coco_evaluation import RESULTS_FILE, agreement_with_reference

logger = logging.getLogger(__name__)

__all__ = ["evaluate_side_by_side"]


def _teacher_of(ckpt: Dict[str, Any], fallback: str, seed: int) -> Tuple[str, int]:
    """(MODEL.WEIGHTS, SEED) of the config a compressed checkpoint was made with (the fallbacks when not recorded):
    a random teacher ("" weights) is re-created from that SEED."""
    text = ckpt.get("extra", {}).get("config")
    if not isinstance(text, str):
        return fallback, seed
    try:
        recorded = CfgNode.load_cfg(text)
        return str(recorded.MODEL.WEIGHTS), int(recorded.SEED)
    except Exception:  # an unreadable record is not fatal: evaluate with the fallback
        return fallback, seed


def _agreement(task: DetectionTask, output_dir: str, score: float) -> Dict[str, float]:
    """The compressed model's AP against the teacher's own detections (scoring >= ``score``), from the two rows'
    results files: ``box_AP_vs_teacher`` / ``mask_AP_vs_teacher`` and ``teacher_instances``."""
    results = {}
    for name in ("uncompressed", "compressed"):
        with open(os.path.join(output_dir, name, RESULTS_FILE)) as f:
            results[name] = json.load(f)
    ds = task.dataset(task.cfg.DATASETS.TEST)
    ids = [ds.image_ids[i] for i in task.test_indices()]
    found = agreement_with_reference(ds.coco, results["uncompressed"], results["compressed"], image_ids=ids,
                                     score_threshold=score)
    return {k.replace("_reference", "_teacher").replace("reference_", "teacher_"): v for k, v in found.items()}


def evaluate_side_by_side(cfg, *, output_dir: str = "") -> Dict[str, Any]:
    """COCO box/mask AP of the uncompressed teacher and the compressed model, with sizes and wall times.

    ``cfg.MODEL.WEIGHTS`` is a compressed checkpoint (``model_final.pth``): the teacher is rebuilt from the
    ``MODEL.WEIGHTS`` recorded in it (the config it was compressed with; a random teacher is re-created from
    ``SEED``) and evaluated too when ``TEST.EVAL_TEACHER``. A dense ``MODEL.WEIGHTS`` evaluates that model alone.
    ``TEST.COMPILED_OP`` / ``TEST.FOLD_BN`` evaluate the compressed model through the compiled CPU ops.

    Returns:
        ``{"rows": {"uncompressed"|"compressed": {"size_mib", "ratio", "seconds", **metrics}}, "table": str}``;
        ``output_dir/eval_coco.json`` and ``output_dir/<row>/coco_instances_results.json`` are written.
    """
    weights = cfg.MODEL.WEIGHTS
    ckpt = None
    if weights and os.path.isfile(weights):
        try:
            head = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            head = None
        if isinstance(head, dict) and head.get("format") == FORMAT:
            ckpt = check_compressed(head, weights)  # read once (memory-mapped); the compressed row builds from it
    teacher_weights, teacher_seed = _teacher_of(ckpt, "", cfg.SEED) if ckpt is not None else (weights, cfg.SEED)
    if ckpt is not None:
        check_checkpoint_arch(ckpt["arch"], cfg, source=weights)
        if ckpt["num_classes"] != cfg.MODEL.NUM_CLASSES:  # the checkpoint's labels are the ones to evaluate
            logger.info("%s has %d classes: MODEL.NUM_CLASSES %d ignored", weights, ckpt["num_classes"],
                        cfg.MODEL.NUM_CLASSES)
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.ARCH, cfg.MODEL.NUM_CLASSES = ckpt["arch"], ckpt["num_classes"]
    task = DetectionTask(cfg)
    models: List[Tuple[str, Callable[[], nn.Module]]] = []
    if ckpt is None or cfg.TEST.EVAL_TEACHER:
        def teacher() -> nn.Module:
            tcfg = cfg.clone()
            tcfg.defrost()
            tcfg.MODEL.WEIGHTS = teacher_weights
            if not teacher_weights:  # a random teacher: the initialisation the checkpoint was compressed from
                torch.manual_seed(teacher_seed)
            return build_teacher(tcfg)

        models.append(("uncompressed", teacher))
    if ckpt is not None:
        models.append(("compressed", lambda: compressed_model(ckpt, cfg, source=weights, device=cfg.MODEL.DEVICE)))

    rows: Dict[str, Dict[str, float]] = {}
    dense_mib = None
    for name, make in models:
        model = make().eval()
        size = model_size(model)
        dense_mib = size.dense_mib
        if name == "compressed":
            model = for_evaluation(model, cfg.TEST)
        start = time.perf_counter()
        metrics = task.evaluate(model, output_dir=os.path.join(output_dir, name) if output_dir else "",
                                desc=f"{name} on {cfg.DATASETS.TEST}")
        rows[name] = {"size_mib": size.compressed_mib, "ratio": size.ratio,
                      "seconds": time.perf_counter() - start, **metrics}
        del model
    keys = ["box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"]
    notes = []
    if "uncompressed" in rows and "compressed" in rows and output_dir and comm.is_main_process():
        rows["compressed"].update(_agreement(task, output_dir, cfg.TEST.AGREEMENT_SCORE))
        keys += [k for k in ("box_AP_vs_teacher", "mask_AP_vs_teacher") if k in rows["compressed"]]
    if "uncompressed" in rows and rows["uncompressed"].get("box_AP", 100.0) < 1.0:
        notes.append(f"warning: the teacher's box AP is {rows['uncompressed']['box_AP']:.2f} on {cfg.DATASETS.TEST}: "
                     f"it finds (almost) nothing there, so the AP columns say nothing about the compression; see "
                     f"box_AP_vs_teacher")
        logger.warning(notes[-1])
    table = tabulate(
        [[name, f"{r['size_mib']:.2f}", f"{r['ratio']:.1f}x"] + [f"{r[k]:.2f}" if k in r else "-" for k in keys]
         + [r.get("n_images", "-"), f"{r['seconds']:.1f}"] for name, r in rows.items()],
        headers=["model", "size (MiB)", "ratio"] + keys + ["images", "eval s"], tablefmt="github")
    table += "".join(f"\n{n}" for n in notes)
    if output_dir and comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "eval_coco.json"), "w") as f:
            json.dump({"dataset": cfg.DATASETS.TEST, "weights": weights, "teacher_weights": teacher_weights,
                       "dense_mib": dense_mib, "compiled_op": cfg.TEST.COMPILED_OP, "fold_bn": cfg.TEST.FOLD_BN,
                       "rows": rows}, f, indent=1)
    return {"rows": rows, "table": table}
