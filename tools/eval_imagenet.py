#!/usr/bin/env python
"""Top-1/top-5 of a classification model on an ImageNet-style folder (``DATASETS.TEST``).

    export BGD_DATASETS=../shared/assets
    # an uncompressed torchvision architecture with a local state dict
    python tools/eval_imagenet.py MODEL.ARCH resnet18 \
        MODEL.WEIGHTS ../shared/assets/teachers/resnet18_pqf_small_dense.pth
    # a compressed checkpoint: bgd_det's own, or an original BGD / PQF file (format detected)
    python tools/eval_imagenet.py --checkpoint $BGD_DATASETS/peers/bgd/resnet18_small_blocks.pth \
        DATASETS.TEST imagenet_sample
    # through the compiled CPU ops, BatchNorm folded, as deployed
    python tools/eval_imagenet.py --checkpoint output/demo_resnet18_mixed_blocks/model_final.pth \
        TEST.COMPILED_OP True TEST.FOLD_BN True
    # also the KL divergence to, and top-1 agreement with, a reference model (e.g. the teacher)
    python tools/eval_imagenet.py --checkpoint output/demo_resnet18_large_blocks/model_final.pth \
        --reference $BGD_DATASETS/teachers/resnet18_pqf_small_dense.pth

Datasets are looked up under ``$BGD_DATASETS``; for the real sample images the class index comes
from the WordNet id in each file name (see ``bgd_det/data/imagenet.py``). The default split is
``imagenet_sample_odd`` (500 odd-class images). Prints one JSON line: metrics, format, size (MiB, by
``bgd_det.quantization.size.model_size``) and compression ratio.
"""
import json

from bgd_det.engine import launch
from bgd_det.engine.defaults import default_argument_parser, default_setup
from bgd_det.modeling import build_teacher
from bgd_det.inference import for_evaluation
from bgd_det.checkpoint import load_checkpoint_model
from bgd_det.quantization.size import model_size
from bgd_det.tasks.classification import ClassificationTask
from bgd_det.utils.cli import run_tool


def main(args) -> dict:
    cfg = default_setup(args)
    if args.checkpoint:
        model, fmt = load_checkpoint_model(args.checkpoint, cfg=cfg, device=cfg.MODEL.DEVICE)
    else:
        model, fmt = build_teacher(cfg), "uncompressed"
    reference = None
    if args.reference:
        reference, _ = load_checkpoint_model(args.reference, cfg=cfg, device=cfg.MODEL.DEVICE)
    size = model_size(model)
    model = for_evaluation(model, cfg.TEST)  # TEST.COMPILED_OP / TEST.FOLD_BN: as deployed on CPU
    metrics = ClassificationTask(cfg).evaluate(model, reference=reference)
    result = {
        "model": args.checkpoint or f"{cfg.MODEL.ARCH} {cfg.MODEL.WEIGHTS}",
        "format": fmt,
        "dataset": cfg.DATASETS.TEST,
        "compiled_op": cfg.TEST.COMPILED_OP,
        "fold_bn": cfg.TEST.FOLD_BN,
        **metrics,
        "size_mib": round(size.compressed_mib, 3),
        "ratio": round(size.ratio, 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    parser = default_argument_parser(__doc__)
    parser.add_argument(
        "--checkpoint",
        default="",
        metavar="FILE",
        help="compressed checkpoint (bgd_det, BGD or PQF; a plain state dict uses MODEL.ARCH)",
    )
    parser.add_argument(
        "--reference",
        default="",
        metavar="FILE",
        help="also report kl_to_reference and top1_agreement against this model (same formats as --checkpoint)",
    )
    args = parser.parse_args()
    run_tool(launch, main, args.num_processes, num_machines=args.num_machines, machine_rank=args.machine_rank,
             dist_url=args.dist_url, args=(args,))
