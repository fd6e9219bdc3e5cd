#!/usr/bin/env python
"""Compress a trained network with activation-aware product quantization.

    python tools/quantize_net.py --config configs/ImageNet/resnet18_large_blocks.yaml [KEY VALUE ...]
    python tools/quantize_net.py --config X.yaml --plan-only   # the plan and every rule error, nothing run

Writes OUTPUT_DIR/model_final.pth (compressed checkpoint), report.md/json, layer_sizes.png and log.txt.
"""
import sys

from bgd_det.config import load_config
from bgd_det.engine import launch
from bgd_det.engine.defaults import default_argument_parser, default_setup
from bgd_det.engine.pipeline import describe_plan, quantize_and_report
from bgd_det.utils.cli import run_tool


def main(args) -> None:
    cfg = default_setup(args, claim=True)
    quantize_and_report(cfg, resume=args.resume)


if __name__ == "__main__":
    parser = default_argument_parser(__doc__)
    parser.add_argument("--plan-only", action="store_true",
                        help="print the plan (every layer's d, K, bytes or skip reason) and every rule error; exit")
    args = parser.parse_args()
    if args.plan_only:
        print(run_tool(describe_plan, run_tool(load_config, args.config, args.opts)))
        sys.exit(0)
    run_tool(launch, main, args.num_processes, num_machines=args.num_machines, machine_rank=args.machine_rank,
             dist_url=args.dist_url, args=(args,))
