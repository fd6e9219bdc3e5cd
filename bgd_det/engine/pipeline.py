"""End-to-end job behind ``tools/quantize_net.py``: teacher -> compressed model -> checkpoint + report."""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import glob
import json
import logging
import os
import time
from typing import Dict, Optional, Sequence

from tabulate import tabulate
from torch import nn

from ..checkpoint import checkpoint_cfg, read_compressed, save_compressed
from ..evaluation.classification import PREDICTIONS_FILE
from ..modeling import build_model, build_teacher
from ..quantization.plan import LayerPlan, QuantRules, build_plan
from ..quantization.size import model_size
from ..quantization.swap import swap_in_skeleton
from ..tasks import build_task
from ..tasks.classification import ClassificationTask
from ..utils import comm
from .distributed import build_collectives
from .quantizer import Quantizer
from .report import REPORT_JSON, format_unquantized, write_report

logger = logging.getLogger(__name__)

__all__ = ["quantize_and_report", "describe_plan", "saved_metrics", "FINAL_CHECKPOINT"]

FINAL_CHECKPOINT = "model_final.pth"


def _halved_bytes(cfg, model: nn.Module, order: Sequence[str], plan: Sequence[LayerPlan]) -> Dict[str, float]:
    """Bytes each planned layer of the dense ``model`` would take at half its block size (K clamped by the same
    rules), for the layers whose d is even: where this is not more than the bytes at d, a finer d costs nothing."""
    halved = {layer.name: layer.block_size // 2 for layer in plan if layer.block_size % 2 == 0}
    if not halved:
        return {}
    rules = QuantRules.from_cfg(cfg.QUANT)
    extra = [[glob.escape(name), "BLOCK_SIZE", d] for name, d in halved.items()]  # later overrides win
    half_plan = build_plan(model, order, dataclasses.replace(rules, overrides=list(rules.overrides) + extra))
    sizes = model_size(swap_in_skeleton(copy.deepcopy(model), half_plan)).by_name()
    return {name: sizes[name].bytes for name in halved}


def describe_plan(cfg) -> str:
    """The plan of ``cfg`` as a markdown table (``tools/quantize_net.py --plan-only``): every quantizable layer in
    execution order with its weight shape, d, K, sub-vectors and compressed bytes (and the bytes at d/2 where d is
    even), or why it is skipped; then the model's size. Builds the model without loading weights; raises
    :class:`PlanError` with every rule error."""
    task = build_task(cfg)
    model = build_model(cfg).eval()
    quantizer = Quantizer(cfg, model, task)  # checks every QUANT / FINETUNE value and builds the plan
    order = quantizer.order
    plan = {layer.name: layer for layer in quantizer.plan}
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in order}
    types = {name: type(model.get_submodule(name)).__name__ for name in order}  # before the skeleton swap
    halved = _halved_bytes(cfg, model, order, quantizer.plan)
    sizes = model_size(swap_in_skeleton(model, plan.values())).by_name()
    rows = []
    for name in order:
        layer = plan.get(name)
        if layer is None:
            rules = [f"QUANT.SKIP {p!r}" for p in cfg.QUANT.SKIP if fnmatch.fnmatchcase(name, p)]
            if cfg.QUANT.SKIP_FIRST and name == order[0]:
                rules.insert(0, "QUANT.SKIP_FIRST (the first layer)")
            what = ", ".join(rules) or "a QUANT.OVERRIDES SKIP entry"
            rows.append([name, types[name], str(shapes[name]), "-", "-", "-",
                         f"{sizes[name].bytes:.0f}", "-", f"skipped: {what}"])
        else:
            half = f"{halved[name]:.0f} ({halved[name] - sizes[name].bytes:+.0f})" if name in halved else "-"
            rows.append([name, types[name], str(shapes[name]), str(layer.block_size), str(layer.n_centroids),
                         str(layer.n_subvectors), f"{sizes[name].bytes:.0f}", half,
                         f"quantized, d halved ({cfg.QUANT.HALVE_BLOCKS})" if layer.halved else "quantized"])
    table = tabulate(rows, ["layer", "type", "weight", "d", "K", "sub-vectors", "bytes", "bytes at d/2", "status"],
                     tablefmt="github", disable_numparse=True)
    total = model_size(model)
    fp32 = format_unquantized(quantizer.unquantized)
    return (f"{table}\n\n{len(plan)} of {len(order)} layers quantized; model {total.compressed_mib:.2f} MiB "
            f"({total.ratio:.1f}x of {total.dense_mib:.2f} MiB)" + (f"\n\n{fp32}" if fp32 else ""))


def _predictions_dir(output_dir: str, model: str) -> str:
    """Where the evaluation of ``model`` ("uncompressed" / "compressed") writes its raw predictions."""
    return os.path.join(output_dir, "predictions", model) if output_dir else ""


def _value(cfg, key: str):
    """``cfg``'s value at a dotted ``key`` ("INPUT.CROP")."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def saved_metrics(checkpoint: str, cfg, labels: Optional[Sequence[int]] = None) -> Optional[Dict]:
    """What the run that wrote ``checkpoint`` (its ``model_final.pth``) measured for it, if that is what a
    classification evaluation under ``cfg`` would score: ``{"top1", "top5", "n_images", "top1_per_image"}`` from
    the run's report and raw predictions beside it, so a scoreboard need not evaluate it again. None where those
    files are missing, older than the checkpoint, or the checkpoint's config differs from ``cfg`` in a key of
    ``ClassificationTask.eval_keys`` (images, preprocessing). ``labels`` (the test set's, in the dataset's order)
    must equal the saved ones; files that disagree raise a ValueError."""
    out_dir = os.path.dirname(os.path.abspath(checkpoint))
    report = os.path.join(out_dir, REPORT_JSON)
    preds = os.path.join(_predictions_dir(out_dir, "compressed"), PREDICTIONS_FILE)
    if not (os.path.isfile(report) and os.path.isfile(preds)):
        return None
    if os.path.getmtime(preds) < os.path.getmtime(checkpoint):
        logger.warning("%s is older than %s: not the checkpoint's evaluation", preds, checkpoint)
        return None
    recorded = checkpoint_cfg(read_compressed(checkpoint), source=checkpoint)
    if any(_value(recorded, key) != _value(cfg, key) for key in ClassificationTask.eval_keys):
        return None
    with open(report) as f:
        metrics = json.load(f)["metrics"]["compressed"]
    with open(preds) as f:
        saved = json.load(f)
    hits = [p == y for p, y in zip(saved["top1"], saved["label"])]
    if labels is not None and list(labels) != saved["label"]:
        raise ValueError(f"{preds}: its {len(saved['label'])} labels are not {cfg.DATASETS.TEST}'s {len(labels)} "
                         f"in order")
    if len(hits) != metrics["n_images"] or abs(100.0 * sum(hits) / len(hits) - metrics["top1"]) > 1e-6:
        raise ValueError(f"{preds} ({sum(hits)} of {len(hits)} right) disagrees with {report} "
                         f"(top-1 {metrics['top1']} on {metrics['n_images']} images)")
    return {"top1": metrics["top1"], "top5": metrics["top5"], "n_images": len(hits), "top1_per_image": hits}


def quantize_and_report(cfg, *, resume: bool = False, **quantizer_kwargs) -> Dict:
    """Compress ``cfg.MODEL`` with ``cfg``; write ``model_final.pth``, the report and both models' raw predictions
    (``predictions/{uncompressed,compressed}``) to ``cfg.OUTPUT_DIR``.

    Returns:
        ``{"size": SizeReport, "metrics": {...}, "timings": {...}, "result": QuantizationResult}``.
    """
    # Several processes: statistics summed over ranks, rank-0 codes, DDP finetuning (explicit kwargs win).
    quantizer_kwargs = {"collectives": build_collectives(cfg), **quantizer_kwargs}
    task = build_task(cfg)
    teacher = build_teacher(cfg)
    # Built first: it checks the QUANT / FINETUNE values and the plan before any capture.
    quantizer = Quantizer(cfg, teacher, task, output_dir=cfg.OUTPUT_DIR, **quantizer_kwargs)
    result = quantizer.run(resume=resume)
    timings = dict(result.timings)
    size = model_size(result.student)
    if comm.is_main_process():
        save_compressed(os.path.join(cfg.OUTPUT_DIR, FINAL_CHECKPOINT), result.student, arch=cfg.MODEL.ARCH,
                        num_classes=cfg.MODEL.NUM_CLASSES, config=cfg.dump())
    t0 = time.perf_counter()
    # One pass over the test set: the teacher's outputs give both the agreement and (TEST.EVAL_TEACHER) its own score.
    compressed = task.evaluate(result.student, reference=teacher,
                               output_dir=_predictions_dir(cfg.OUTPUT_DIR, "compressed"),
                               reference_output_dir=(_predictions_dir(cfg.OUTPUT_DIR, "uncompressed")
                                                     if cfg.TEST.EVAL_TEACHER else None))
    timings["eval"] = time.perf_counter() - t0
    metrics: Dict[str, Dict] = {}
    if cfg.TEST.EVAL_TEACHER:
        metrics["uncompressed"] = compressed.pop("reference")
    metrics["compressed"] = compressed
    if comm.is_main_process():
        text = write_report(cfg.OUTPUT_DIR, size, result.records, metrics, timings, quantizer.unquantized)
        logger.info("compression report (%s):\n%s", os.path.join(cfg.OUTPUT_DIR, "report.md"), text)
    return {"size": size, "metrics": metrics, "timings": timings, "result": result}
