#!/usr/bin/env python
"""Import an original BGD or PQF compressed checkpoint into bgd_det.

    P=../shared/assets/peers
    # a bgd_det compressed checkpoint (codes + fp16 codebooks), read by bgd_det.load_compressed
    python tools/convert_checkpoint.py --from bgd $P/bgd/resnet18_small_blocks.pth r18_small.pth
    python tools/convert_checkpoint.py --from pqf $P/pqf/resnet50_large.pth r50_large.pth
    # --dense: a plain torchvision state dict, every layer decoded, BatchNorm as stored (folded
    # affine, running_mean 0, running_var 1); usable as MODEL.WEIGHTS. The offline dense
    # ResNet-50 teacher is made this way:
    python tools/convert_checkpoint.py --from pqf --dense $P/pqf/resnet50_large.pth \
        resnet50_pqf_large_dense.pth

Files are loaded with ``torch.load(weights_only=True, map_location="cpu")``; the architecture
(a torchvision ResNet) is inferred from the layer names, K and d from the codebooks; every layer is
checked and decoded and a forward pass run before anything is written (see ``bgd_det/checkpoint/peers.py`` for
both formats). A wrong or corrupt file ends with a one-line ``error: ...`` and exit status 2.
"""
import argparse

from bgd_det.checkpoint import PEER_FORMATS, convert_checkpoint
from bgd_det.quantization.size import model_size
from bgd_det.utils.cli import run_tool
from bgd_det.utils.logger import setup_logger


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--from",
        dest="fmt",
        choices=PEER_FORMATS + ("auto",),
        default="auto",
        help="format of IN (default: detected from its keys)",
    )
    p.add_argument(
        "--dense", action="store_true", help="write a dense torchvision state dict instead"
    )
    p.add_argument("src", metavar="IN")
    p.add_argument("out", metavar="OUT")
    args = p.parse_args(argv)
    setup_logger()
    model = convert_checkpoint(args.src, args.fmt, args.out, dense=args.dense)
    size = model_size(model)
    what = (
        f"dense state dict ({size.dense_mib:.2f} MiB fp32) decoded from"
        if args.dense
        else "bgd_det compressed checkpoint of"
    )
    print(f"{args.out}: {what} a {size.compressed_mib:.3f} MiB model ({size.ratio:.1f}x)")


if __name__ == "__main__":
    run_tool(main)
