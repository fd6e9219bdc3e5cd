#!/usr/bin/env python
"""Export a compressed checkpoint for deployment: a ``torch.export`` program (.pt2) or an ONNX file.

    # ONNX: each codebook layer decoded with standard operators (Gather, Reshape, Conv / MatMul); ONNX Runtime runs it
    python tools/export.py --checkpoint output/demo_resnet18_mixed_blocks/model_final.pth --format onnx \
        --output resnet18_pq.onnx
    # torch.export: the program keeps the compiled bgd:: ops (load with bgd_det.export.load_pt2)
    python tools/export.py --checkpoint model_final.pth --format pt2 --output resnet18_pq.pt2

The model is the inference model (BatchNorm folded into the codebook convs), traced on a random input of
``--batch`` x 3 x S x S with S = ``--input-size`` (default: the checkpoint's INPUT.CROP); the batch dimension stays
dynamic. The written file is read back (ONNX through ONNX Runtime when it is installed: ``pip install -e
'.[export]'``) and its outputs compared with the PyTorch model's on a second random batch; a relative difference
above ``--tolerance`` is an error. Prints one JSON line: file, format, MiB, checkpoint MiB, max difference.
Classification models only: torchvision's R-CNNs have data-dependent shapes that ``torch.export`` cannot trace.
"""
import argparse
import json
import logging
import os

import torch

from bgd_det.checkpoint import checkpoint_cfg, compressed_model, read_compressed
from bgd_det.export import FORMATS, export_model, load_pt2, run_onnx
from bgd_det.utils.cli import run_tool
from bgd_det.utils.logger import setup_logger

logger = logging.getLogger("bgd_det.export")


def read_back(path: str, fmt: str, x: torch.Tensor):
    """Output of the written file on ``x`` (None: ONNX Runtime is not installed)."""
    if fmt == "pt2":
        with torch.inference_mode():
            return load_pt2(path)(x)
    try:
        return run_onnx(path, x)
    except ValueError as e:  # onnxruntime missing: the file is written, the check is skipped (said once)
        logger.warning("%s; the exported file is not checked", e)
        return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="bgd_det compressed checkpoint")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument("--input-size", type=int, default=0, help="square input side (default: the checkpoint's INPUT.CROP)")
    p.add_argument("--batch", type=int, default=1, help="batch of the tracing input (the exported batch is dynamic)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed max|exported - PyTorch| / max|PyTorch| on a check batch")
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected error")
    args = p.parse_args(argv)
    setup_logger()
    if args.batch < 1 or args.input_size < 0:
        raise ValueError(f"--batch {args.batch} / --input-size {args.input_size}; allowed: batch >= 1, size >= 1")
    ckpt = read_compressed(args.checkpoint)
    cfg = checkpoint_cfg(ckpt, source=args.checkpoint)
    size = args.input_size or cfg.INPUT.CROP
    model = compressed_model(ckpt, cfg, source=args.checkpoint, inference=True, fold_bn=True)
    del ckpt
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(args.batch, 3, size, size, generator=generator)
    export_model(model, example, args.output, args.format)

    check = torch.randn(args.batch + 1, 3, size, size, generator=generator)
    with torch.inference_mode():
        want = model(check)
    got = read_back(args.output, args.format, check)
    diff = None if got is None else float((got - want).abs().max())
    result = {"output": args.output, "format": args.format, "input": list(check.shape[1:]),
              "file_mib": round(os.path.getsize(args.output) / 2**20, 3),
              "checkpoint_mib": round(os.path.getsize(args.checkpoint) / 2**20, 3),
              "max_abs_diff": diff, "max_abs_output": float(want.abs().max())}
    print(json.dumps(result))
    if diff is not None and diff > args.tolerance * max(result["max_abs_output"], 1e-12):
        raise ValueError(f"{args.output}: outputs differ from the PyTorch model's by {diff:.3g} "
                         f"(max |output| {result['max_abs_output']:.3g}, --tolerance {args.tolerance})")
    return result


if __name__ == "__main__":
    run_tool(main)
