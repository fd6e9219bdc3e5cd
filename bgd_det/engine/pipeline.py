"""End-to-end job behind ``tools/quantize_net.py``: teacher -> compressed model -> checkpoint + report."""
from __future__ import annotations

import logging
import os
import time
from typing import Dict

from ..checkpoint import save_compressed
from ..modeling import build_model
from ..quantization.size import model_size
from ..tasks import build_task
from ..utils import comm
from .distributed import build_collectives
from .quantizer import Quantizer
from .report import write_report

logger = logging.getLogger(__name__)

__all__ = ["quantize_and_report", "FINAL_CHECKPOINT"]

FINAL_CHECKPOINT = "model_final.pth"


def quantize_and_report(cfg, *, resume: bool = False, **quantizer_kwargs) -> Dict:
    """Compress ``cfg.MODEL`` with ``cfg``; write ``model_final.pth`` and the report to ``cfg.OUTPUT_DIR``.

    Returns:
        ``{"size": SizeReport, "metrics": {...}, "timings": {...}, "result": QuantizationResult}``.
    """
    # Several processes: statistics summed over ranks, rank-0 codes, DDP finetuning (explicit kwargs win).
    quantizer_kwargs = {"collectives": build_collectives(cfg), **quantizer_kwargs}
    task = build_task(cfg)
    teacher = build_model(cfg)
    # Built first: it checks the QUANT / FINETUNE values before the teacher's (possibly long) evaluation.
    quantizer = Quantizer(cfg, teacher, task, output_dir=cfg.OUTPUT_DIR, **quantizer_kwargs)
    metrics: Dict[str, Dict] = {}
    timings: Dict[str, float] = {}
    if cfg.TEST.EVAL_TEACHER:
        t0 = time.perf_counter()
        metrics["uncompressed"] = task.evaluate(teacher)
        timings["eval_uncompressed"] = time.perf_counter() - t0
        logger.info("uncompressed: %s", metrics["uncompressed"])
    result = quantizer.run(resume=resume)
    timings.update(result.timings)
    size = model_size(result.student)
    if comm.is_main_process():
        save_compressed(os.path.join(cfg.OUTPUT_DIR, FINAL_CHECKPOINT), result.student, arch=cfg.MODEL.ARCH,
                        num_classes=cfg.MODEL.NUM_CLASSES, config=cfg.dump())
    t0 = time.perf_counter()
    compare = {"reference": teacher} if task.compares_to_reference else {}
    metrics["compressed"] = task.evaluate(result.student, **compare)
    timings["eval_compressed"] = time.perf_counter() - t0
    if comm.is_main_process():
        text = write_report(cfg.OUTPUT_DIR, size, result.records, metrics, timings)
        logger.info("compression report (%s):\n%s", os.path.join(cfg.OUTPUT_DIR, "report.md"), text)
    return {"size": size, "metrics": metrics, "timings": timings, "result": result}
