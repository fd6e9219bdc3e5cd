"""Deployment files of a compressed model: ``torch.export`` programs (.pt2) and ONNX.

Both start from the inference model (:mod:`bgd_det.inference`: codes + codebooks, BatchNorm folded). The
.pt2 program keeps the ``bgd::`` ops (load it after ``import bgd_det``, which registers them). In ONNX every
codebook layer is decoded with standard operators — ``Gather`` of the codebook rows by the codes, ``Reshape``, a row
``Mul`` for a folded BatchNorm, then ``Conv`` / ``MatMul`` / ``ConvTranspose`` — so ONNX Runtime runs the file
unmodified and the file keeps the codes (1 byte per sub-vector), not dense weights. The exporter's constant folding is
off for that reason (it would store the decoded weights); ONNX Runtime folds the decode once when it loads the file.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable, Dict, Sequence

import torch
from torch import Tensor, nn

from .ops import ops_available

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "export_model", "load_pt2", "onnx_translations", "run_onnx"]

FORMATS = ("pt2", "onnx")
#: ONNX opset of the exported files (ONNX Runtime >= 1.14 runs it).
OPSET = 18


#: ``dynamic_shapes`` of the one input: the batch dimension is free.
DYNAMIC_BATCH = ({0: torch.export.Dim.DYNAMIC},)


def export_model(model: nn.Module, example: Tensor, path: str, fmt: str) -> None:
    """Write ``model`` (eval mode) traced on ``example`` (Tensor[B, ...]) to ``path`` as ``fmt`` ("pt2" or "onnx");
    the batch dimension stays dynamic. Raises ValueError (one line) when the model cannot be traced."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt == "onnx":
        _check_onnx_exporter()
    model.eval()
    if example.shape[0] == 1:  # torch.export specialises a dimension of size 1: trace a batch of 2 to keep it dynamic
        example = torch.cat([example, example])
    try:
        if fmt == "pt2":
            program = torch.export.export(model, (example,), dynamic_shapes=DYNAMIC_BATCH)
            torch.export.save(program, path)
        else:
            _export_onnx(model, example, path)
    except Exception as e:  # torch.export / the ONNX exporter raise many types; every one means "not traceable"
        text = " ".join(str(e).split())[:300]
        raise ValueError(f"{type(model).__name__} cannot be exported as {fmt}: torch.export could not trace it "
                         f"({type(e).__name__}: {text}); models with data-dependent shapes (torchvision's R-CNNs) "
                         f"are not supported") from None
    logger.info("wrote %s (%.2f MiB)", path, os.path.getsize(path) / 2**20)


def load_pt2(path: str) -> nn.Module:
    """The module of a .pt2 file written by :func:`export_model` (registers the ``bgd::`` ops first)."""
    ops_available()
    return torch.export.load(path).module()


def _check_onnx_exporter() -> None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise ValueError("ONNX export needs onnx and onnxscript: pip install -e '.[export]'") from None


def _export_onnx(model: nn.Module, example: Tensor, path: str) -> None:
    program = torch.onnx.export(model, (example,), dynamo=True, optimize=False, opset_version=OPSET,
                                input_names=["input"], output_names=["output"],
                                dynamic_shapes=DYNAMIC_BATCH,
                                custom_translation_table=onnx_translations(), verbose=False)
    program.save(path)
    _strip_node_metadata(path)


def _strip_node_metadata(path: str) -> None:
    """Drop the exporter's per-node debugging metadata (stack traces, module names): 0.3-0.7 MiB on a ResNet-18,
    a third of the file."""
    import onnx

    model = onnx.load(path)
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, path)


def run_onnx(path: str, x: Tensor) -> Tensor:
    """Output of an exported ONNX file on ``x`` through ONNX Runtime's CPU provider."""
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("running an ONNX file needs onnxruntime: pip install -e '.[export]'") from None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    return torch.from_numpy(out)


def onnx_translations() -> Dict[Callable, Callable]:
    """``torch.onnx.export``'s ``custom_translation_table``: each ``bgd::`` op as standard ONNX operators."""
    if not ops_available():  # the inference layers trace the reference decode: plain aten ops
        return {}
    from onnx import TensorProto
    from onnxscript import opset18 as op

    def decoded(codes, codebook, shape: Sequence[int], scale=None):
        """Tensor[shape]: ``codebook[codes]`` laid out row by row (``bgd_det.quantization.pq.pq_decode``)."""
        w = op.Gather(codebook, op.Cast(codes, to=TensorProto.INT64), axis=0)  # [rows, n_blocks, d]
        w = op.Reshape(w, op.Constant(value_ints=[int(shape[0]), -1]))
        cols = math.prod(shape[1:])
        if int(codes.shape[1]) * int(codebook.shape[1]) != cols:  # a partial last block: drop its padding
            w = op.Slice(w, op.Constant(value_ints=[0]), op.Constant(value_ints=[cols]),
                         op.Constant(value_ints=[1]))
        w = op.Reshape(w, op.Constant(value_ints=[int(s) for s in shape]))
        if scale is not None:  # a folded BatchNorm scales the rows
            w = op.Mul(w, op.Reshape(scale, op.Constant(value_ints=[-1] + [1] * (len(shape) - 1))))
        return w

    def conv2d(input, codes, codebook, weight_shape, scale, bias, stride, padding, dilation, groups):
        w = decoded(codes, codebook, weight_shape, scale)
        inputs = (input, w) if bias is None else (input, w, bias)
        return op.Conv(*inputs, strides=list(stride), pads=list(padding) * 2, dilations=list(dilation),
                       group=int(groups))

    def linear(input, codes, codebook, scale, bias):
        rows, cols = int(codes.shape[0]), int(input.shape[-1])
        w = decoded(codes, codebook, (rows, cols), scale)
        out = op.MatMul(input, op.Transpose(w, perm=[1, 0]))
        return out if bias is None else op.Add(out, bias)

    def conv_transpose2d(input, codes, codebook, weight_shape, bias, stride, padding, output_padding, groups,
                         dilation):
        w = decoded(codes, codebook, weight_shape)
        inputs = (input, w) if bias is None else (input, w, bias)
        return op.ConvTranspose(*inputs, strides=list(stride), pads=list(padding) * 2,
                                output_padding=list(output_padding), dilations=list(dilation), group=int(groups))

    bgd = torch.ops.bgd
    return {bgd.pq_conv2d.default: conv2d, bgd.pq_linear.default: linear,
            bgd.pq_conv_transpose2d.default: conv_transpose2d}

