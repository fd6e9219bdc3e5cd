"""Compressed-domain inference ops (``torch.ops.bgd``) with a reference fallback.

The compiled CPU ops (``csrc/``) decode product-quantized weights into a reused thread-local scratch
buffer (or, for Linear / 1x1 convs with <= 8 input rows, straight into registers) and run the dense
ATen convolution / GEMM on it; no dense weight is ever kept. They are built on first use
(:mod:`bgd_det.ops._build`, cached). When the build is not possible (no compiler, ``BGD_NO_EXT=1``)
or the input is not on the CPU, the functions here compute the same result with the reference decode
:func:`bgd_det.quantization.pq.pq_decode` (the reference decode; :func:`decode_weight` is this package's) and the dense functional op; this is logged once.

Every function takes ``codes (Tensor[C_out, n_blocks] uint8/int16)``, ``codebook (Tensor[K, d]
float32)`` and an optional ``scale (Tensor[C_out] float32)`` that multiplies row ``o`` of the
decoded weight (a BatchNorm folded into the layer).
"""

from __future__ import annotations

import logging
import threading
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from ..quantization.pq import pq_decode as _reference_decode

logger = logging.getLogger(__name__)

__all__ = [
    "ops_available",
    "build_status",
    "decode_weight",
    "pq_conv2d",
    "pq_linear",
    "pq_conv_transpose2d",
    "reference_weight",
    "simd_mode",
    "chunk_bytes",
    "decode_rows_at_once",
]

_IntOrPair = Union[int, Sequence[int]]

_lock = threading.Lock()
_state = {"tried": False, "ok": False, "reason": None}


def ops_available() -> bool:
    """Whether the compiled ops are loaded (built on the first call; logs once if not possible)."""
    if _state["tried"]:
        return _state["ok"]
    with _lock:
        if not _state["tried"]:
            from ._build import load_library

            reason = load_library()
            if reason is None:
                _register_fakes()
            else:
                logger.warning(
                    "compiled bgd ops not available (%s); using the reference decode", reason
                )
            _state.update(tried=True, ok=reason is None, reason=reason)
    return _state["ok"]


def build_status() -> str:
    """One line saying whether the compiled ops are built (building them if needed), and where."""
    from ._build import build_dir

    if ops_available():
        isa = "AVX2/FMA" if simd_mode() == 1 else "scalar"
        return f"bgd ops: compiled, {isa} kernels, cached in {build_dir()}"
    return f"bgd ops: not available ({_state['reason']}); using the reference decode"


def _use_op(x: Tensor) -> bool:
    return x.device.type == "cpu" and ops_available()


def _register_fakes() -> None:
    """Shape functions (fake tensors) so the ops work under torch.compile / export / opcheck."""

    @torch.library.register_fake("bgd::pq_decode")
    def _decode_fake(codes, codebook, shape, scale=None):
        return codebook.new_empty(shape)

    @torch.library.register_fake("bgd::pq_linear")
    def _linear_fake(input, codes, codebook, scale, bias):
        return input.new_empty((*input.shape[:-1], codes.shape[0]))

    @torch.library.register_fake("bgd::pq_conv2d")
    def _conv_fake(
        input, codes, codebook, weight_shape, scale, bias, stride, padding, dilation, groups
    ):
        out = F.conv2d(
            input, input.new_empty(weight_shape), None, stride, padding, dilation, groups
        )
        return out.contiguous()

    @torch.library.register_fake("bgd::pq_conv_transpose2d")
    def _convt_fake(
        input,
        codes,
        codebook,
        weight_shape,
        bias,
        stride,
        padding,
        output_padding,
        groups,
        dilation,
    ):
        out = F.conv_transpose2d(
            input,
            input.new_empty(weight_shape),
            None,
            stride,
            padding,
            output_padding,
            groups,
            dilation,
        )
        return out.contiguous()


def simd_mode(mode: int = -1) -> int:
    """Kernel instruction set: -1 queries; 0 forces the portable scalar path; 1 AVX2/FMA (if any).

    Returns:
        The mode now active, or -1 when the compiled ops are not available.
    """
    if not ops_available():
        return -1
    return int(torch.ops.bgd._simd_mode(mode))


def chunk_bytes(nbytes: int = -1) -> int:
    """Size above which conv2d weights are decoded and convolved in output-channel chunks.

    The compiled conv2d op decodes a larger weight (groups = 1), when the conv's output is at most
    a quarter of this size, into a scratch of about this many bytes at a time (equal chunks, a
    multiple of 16 output channels each) and runs the dense op chunk by chunk, so the scratch
    stays cache-sized (default 2 MiB; :func:`decode_rows_at_once`). ``nbytes``: -1 queries, 0 never
    chunks, > 0 sets it for the process.

    Returns:
        The value now active, or -1 when the compiled ops are not available.
    """
    if nbytes < -1:
        raise ValueError(f"chunk_bytes: nbytes must be -1 (query), 0 (never) or > 0, got {nbytes}")
    if not ops_available():
        return -1
    return int(torch.ops.bgd._chunk_bytes(nbytes))


def decode_rows_at_once(
    layer: str, rows: int, cols: int, *, groups: int = 1, out_bytes: int = -1
) -> int:
    """Rows of a ``[rows, cols]`` weight that the compiled op of ``layer`` decodes at a time.

    ``layer``: ``"conv2d"``, ``"linear"`` or ``"conv_transpose2d"``; ``out_bytes``: the size of the
    layer's output (-1: any output, i.e. the most any input can need). The rule lives in the op: a
    conv2d with ``groups == 1`` whose output is at most a quarter of :func:`chunk_bytes` decodes in
    chunks of about :func:`chunk_bytes`, everything else its whole weight. Without the compiled
    ops the reference path decodes whole weights: ``rows``.
    """
    if not ops_available():
        return rows
    return int(torch.ops.bgd._decode_rows(layer, rows, cols, groups, out_bytes))


def reference_weight(
    codes: Tensor, codebook: Tensor, shape: Sequence[int], scale: Optional[Tensor] = None
) -> Tensor:
    """Dense weight from the reference decode, rows multiplied by ``scale`` when given."""
    w = _reference_decode(codes, codebook, tuple(shape))
    if scale is not None:
        w = w * scale.reshape(-1, *([1] * (len(shape) - 1))).to(w.dtype)
    return w


def decode_weight(
    codes: Tensor, codebook: Tensor, shape: Sequence[int], *, scale: Optional[Tensor] = None
) -> Tensor:
    """Decoded dense weight Tensor[shape] (a new tensor) through the compiled ``bgd::pq_decode`` on CPU, else
    :func:`reference_weight`."""
    if _use_op(codebook):
        return torch.ops.bgd.pq_decode(codes, codebook, list(shape), scale)
    return reference_weight(codes, codebook, shape, scale)


def pq_conv2d(
    input: Tensor,
    codes: Tensor,
    codebook: Tensor,
    weight_shape: Sequence[int],
    *,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    stride: _IntOrPair = 1,
    padding: _IntOrPair = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv2d(input, scale * decode(codes, codebook), bias, ...)``, no dense weight kept.

    Args:
        input (Tensor[B, C_in, H, W] float32); weight_shape: ``(C_out, C_in // groups, kh, kw)``;
        padding: ints only (pad string / non-zero padding modes beforehand).

    Returns:
        Tensor[B, C_out, H_out, W_out].
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if _use_op(input):
        return torch.ops.bgd.pq_conv2d(
            input,
            codes,
            codebook,
            list(weight_shape),
            scale,
            bias,
            list(stride),
            list(padding),
            list(dilation),
            int(groups),
        )
    w = reference_weight(codes, codebook, weight_shape, scale).to(input.dtype)
    return F.conv2d(input, w, bias, stride, padding, dilation, groups)


def pq_linear(
    input: Tensor,
    codes: Tensor,
    codebook: Tensor,
    *,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """``F.linear(input, scale * decode(codes, codebook), bias)``; fused decode-dot for <= 8 rows.

    Args:
        input (Tensor[..., in_features] float32).

    Returns:
        Tensor[..., C_out].
    """
    if _use_op(input):
        return torch.ops.bgd.pq_linear(input, codes, codebook, scale, bias)
    w = reference_weight(codes, codebook, (codes.shape[0], input.shape[-1]), scale).to(input.dtype)
    return F.linear(input, w, bias)


def pq_conv_transpose2d(
    input: Tensor,
    codes: Tensor,
    codebook: Tensor,
    weight_shape: Sequence[int],
    *,
    bias: Optional[Tensor] = None,
    stride: _IntOrPair = 1,
    padding: _IntOrPair = 0,
    output_padding: _IntOrPair = 0,
    groups: int = 1,
    dilation: _IntOrPair = 1,
) -> Tensor:
    """``F.conv_transpose2d`` with the decoded weight Tensor[C_in, C_out // groups, kh, kw]."""
    stride, padding = _pair(stride), _pair(padding)
    output_padding, dilation = _pair(output_padding), _pair(dilation)
    if _use_op(input):
        return torch.ops.bgd.pq_conv_transpose2d(
            input,
            codes,
            codebook,
            list(weight_shape),
            bias,
            list(stride),
            list(padding),
            list(output_padding),
            int(groups),
            list(dilation),
        )
    w = reference_weight(codes, codebook, weight_shape).to(input.dtype)
    return F.conv_transpose2d(input, w, bias, stride, padding, output_padding, groups, dilation)
