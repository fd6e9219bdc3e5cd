#!/usr/bin/env python
"""COCO box/mask AP of a compressed detector next to its uncompressed teacher, with sizes and ratio.

    python tools/eval_coco.py --config configs/COCO/mask_rcnn_R_50_FPN_small_blocks.yaml \\
        MODEL.WEIGHTS output/mask_rcnn_R_50_FPN_small_blocks/model_final.pth [DATASETS.TEST_MAX_IMAGES 500]

MODEL.WEIGHTS is a compressed checkpoint (the teacher is rebuilt from the weights recorded in it; skip it with
TEST.EVAL_TEACHER False) or dense weights (evaluated alone). With both models, also the compressed model's AP
against the teacher's own detections (box_AP_vs_teacher / mask_AP_vs_teacher, no labels needed). Writes
OUTPUT_DIR/eval_coco/eval_coco.json and the detections of each model (coco_instances_results.json).
"""
import logging
import os

from bgd_det.engine import launch
from bgd_det.engine.defaults import default_argument_parser, default_setup
from bgd_det.evaluation.side_by_side import evaluate_side_by_side
from bgd_det.utils import comm
from bgd_det.utils.cli import run_tool


def main(args) -> dict:
    cfg = default_setup(args)
    result = evaluate_side_by_side(cfg, output_dir=os.path.join(cfg.OUTPUT_DIR, "eval_coco"))
    if comm.is_main_process():
        logging.getLogger("bgd_det").info("COCO %s:\n%s", cfg.DATASETS.TEST, result["table"])
    return result


if __name__ == "__main__":
    args = default_argument_parser(__doc__).parse_args()
    run_tool(launch, main, args.num_processes, num_machines=args.num_machines, machine_rank=args.machine_rank,
             dist_url=args.dist_url, args=(args,))
