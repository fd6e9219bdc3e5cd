"""Inference codebook layers: ``codes`` (uint8/int16) and an fp32 ``codebook`` (converted once, whatever the
checkpoint stored), run through the one dispatch function of each kind in :mod:`bgd_det.ops` (the compiled op, or
its reference off CPU / without the build); no dense weight is ever kept. A folded BatchNorm's scale multiplies the
decoded rows inside the conv op (:mod:`bgd_det.inference.fold_bn` finds the pairs)."""
from __future__ import annotations

import math
from itertools import chain
from typing import Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import decode_rows_at_once, decode_weight, pq_conv2d, pq_conv_transpose2d, pq_linear
from ..quantization.bn_correction import bn_scale_shift
from ..quantization.layers import PQConv1d, PQConv2d, PQConvTranspose2d, PQLinear
from ..quantization.pq import check_codes

__all__ = ["PQConv2dInfer", "PQConv1dInfer", "PQLinearInfer", "PQConvTranspose2dInfer", "INFER_LAYER_TYPES",
           "padding_plan", "inference_bytes", "max_scratch_bytes"]


def padding_plan(layer: nn.Module) -> Tuple[Optional[Tuple[int, ...]], str, Tuple[int, ...]]:
    """``(pre_pad, pad_mode, padding)`` of a Conv1d / Conv2d for an op that pads with zeros, symmetrically: a non-zero
    padding mode or an asymmetric ``"same"`` is applied first (``F.pad(x, pre_pad, mode=pad_mode)``), the rest is
    the op's ``padding`` (one int per spatial dim)."""
    reversed_pad = tuple(int(p) for p in layer._reversed_padding_repeated_twice)  # (left, right[, top, bottom])
    dims = len(reversed_pad) // 2
    if layer.padding_mode != "zeros":
        return reversed_pad, layer.padding_mode, (0,) * dims
    if not isinstance(layer.padding, str):
        return None, "constant", tuple(int(p) for p in layer.padding)
    starts, ends = reversed_pad[0::2], reversed_pad[1::2]  # last spatial dim first
    if starts == ends:
        return None, "constant", tuple(reversed(starts))
    return reversed_pad, "constant", (0,) * dims


class _PQInfer(nn.Module):
    """Storage of an inference codebook layer.

    Attributes:
        codes (Tensor[rows, n_blocks] uint8/int16): buffer, shared with the layer it was built from.
        codebook (Tensor[K, d] float32): buffer.
        weight_shape (tuple): shape of the dense weight the codes stand for (never materialised).
        bias (Tensor[C_out] float32 or None): buffer.
        op_layer (str): the layer kind its compiled op decodes for (``ops.decode_rows_at_once``).
    """

    op_layer: str
    groups: int = 1

    def _init_pq(
        self, codes: Tensor, codebook: Tensor, weight_shape: Sequence[int], bias: Optional[Tensor]
    ) -> None:
        check_codes(codes, codebook.shape[0])
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.register_buffer("codes", codes.detach().contiguous())
        self.register_buffer("codebook", codebook.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @property
    def block_size(self) -> int:
        return self.codebook.shape[1]

    @property
    def weight(self) -> Tensor:
        """The decoded weight Tensor[weight_shape] (rows times a folded BatchNorm's scale), for code that reads
        ``layer.weight`` instead of calling the layer (torchvision's Swin attention)."""
        return decode_weight(self.codes, self.codebook, self.weight_shape, scale=getattr(self, "scale", None))

    @property
    def n_centroids(self) -> int:
        return self.codebook.shape[0]

    def scratch_bytes(self, out_bytes: int = -1) -> int:
        """Decode scratch (fp32 bytes) the layer's op needs for an output of ``out_bytes`` bytes.

        -1: the most any input can need. The rule is the op's (``ops.decode_rows_at_once``).
        """
        rows, cols = self.weight_shape[0], math.prod(self.weight_shape[1:])
        rows_at_once = decode_rows_at_once(
            self.op_layer, rows, cols, groups=self.groups, out_bytes=out_bytes
        )
        return 4 * cols * rows_at_once

    def _pq_repr(self) -> str:
        return (
            f"weight_shape={self.weight_shape}, block_size={self.block_size}, "
            f"n_centroids={self.n_centroids}, bias={self.bias is not None}"
        )


class PQConv2dInfer(_PQInfer):
    """Conv2d from codes + codebook through ``bgd::pq_conv2d``; optional folded BatchNorm.

    Computes ``conv2d(x, scale[:, None, None, None] * W, bias)`` with ``W`` the decoded weight
    Tensor[C_out, C_in // groups, kh, kw].
    """

    op_layer = "conv2d"

    def __init__(
        self,
        codes: Tensor,
        codebook: Tensor,
        weight_shape: Sequence[int],
        *,
        bias: Optional[Tensor] = None,
        scale: Optional[Tensor] = None,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        pre_pad: Optional[Sequence[int]] = None,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        self._init_pq(codes, codebook, weight_shape, bias)
        self.register_buffer(
            "scale", None if scale is None else scale.detach().float().contiguous()
        )
        self.stride = tuple(nn.modules.utils._pair(stride))
        self.padding = tuple(nn.modules.utils._pair(padding))
        self.dilation = tuple(nn.modules.utils._pair(dilation))
        self.groups = int(groups)
        self.pre_pad = None if pre_pad is None else tuple(int(p) for p in pre_pad)
        self.pad_mode = pad_mode
        self.out_channels, self.kernel_size = self.weight_shape[0], tuple(self.weight_shape[2:])
        self.in_channels = self.weight_shape[1] * self.groups

    @classmethod
    def from_pq(cls, layer: PQConv2d, *, bn: Optional[nn.Module] = None) -> "PQConv2dInfer":
        """Inference layer of ``layer``; the eval-mode ``bn`` after it is folded in if given."""
        pre_pad, pad_mode, padding = padding_plan(layer)
        bias, scale = layer.bias, None
        if bn is not None:
            affine = bn_scale_shift(bn)
            if affine is None:
                raise ValueError(f"cannot fold {type(bn).__name__} without running statistics")
            scale, shift = affine
            bias = shift if bias is None else bias.detach().float() * scale + shift
        return cls(
            layer.codes,
            layer.codebook,
            layer.weight_shape,
            bias=bias,
            scale=scale,
            stride=layer.stride,
            padding=padding,
            dilation=layer.dilation,
            groups=layer.groups,
            pre_pad=pre_pad,
            pad_mode=pad_mode,
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        return pq_conv2d(x, self.codes, self.codebook, self.weight_shape, scale=self.scale, bias=self.bias,
                         stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self._pq_repr()}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, folded_bn={self.scale is not None}"
        )


class PQConv1dInfer(nn.Module):
    """Conv1d from codes + codebook: the 2-D inference conv on a 1 x L image with a 1 x k kernel (the same codes: a
    row of C_in/groups * k columns decodes alike).

    Attributes:
        conv (PQConv2dInfer): weight_shape ``(C_out, C_in // groups, 1, k)``.
        pre_pad (tuple or None): (left, right) padding applied first with ``pad_mode`` ("same" or a non-zero mode).
    """

    def __init__(self, conv: PQConv2dInfer, pre_pad: Optional[Sequence[int]] = None, pad_mode: str = "constant"):
        super().__init__()
        self.conv = conv
        self.pre_pad = None if pre_pad is None else tuple(int(p) for p in pre_pad)
        self.pad_mode = pad_mode

    @classmethod
    def from_pq(cls, layer: PQConv1d) -> "PQConv1dInfer":
        pre_pad, pad_mode, padding = padding_plan(layer)
        c_out, c_in_g, k = layer.weight_shape
        conv = PQConv2dInfer(layer.codes, layer.codebook, (c_out, c_in_g, 1, k), bias=layer.bias,
                             stride=(1, *layer.stride), padding=(0, *padding), dilation=(1, *layer.dilation),
                             groups=layer.groups)
        return cls(conv, pre_pad, pad_mode)

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[B, C_in, L] -> Tensor[B, C_out, L_out]."""
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        return self.conv(x.unsqueeze(2)).squeeze(2)


class PQLinearInfer(_PQInfer):
    """Linear from codes + codebook through ``bgd::pq_linear`` (fused decode-dot for <= 8 rows)."""

    op_layer = "linear"

    def __init__(
        self,
        codes: Tensor,
        codebook: Tensor,
        weight_shape: Sequence[int],
        *,
        bias: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        self._init_pq(codes, codebook, weight_shape, bias)
        self.out_features, self.in_features = self.weight_shape

    @classmethod
    def from_pq(cls, layer: PQLinear) -> "PQLinearInfer":
        return cls(layer.codes, layer.codebook, layer.weight_shape, bias=layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return pq_linear(x, self.codes, self.codebook, bias=self.bias)

    def extra_repr(self) -> str:
        return self._pq_repr()


class PQConvTranspose2dInfer(_PQInfer):
    """ConvTranspose2d from codes + codebook (weight Tensor[C_in, C_out // groups, kh, kw])."""

    op_layer = "conv_transpose2d"

    def __init__(
        self,
        codes: Tensor,
        codebook: Tensor,
        weight_shape: Sequence[int],
        *,
        bias: Optional[Tensor] = None,
        stride=1,
        padding=0,
        output_padding=0,
        groups: int = 1,
        dilation=1,
    ) -> None:
        super().__init__()
        self._init_pq(codes, codebook, weight_shape, bias)
        self.stride = tuple(nn.modules.utils._pair(stride))
        self.padding = tuple(nn.modules.utils._pair(padding))
        self.output_padding = tuple(nn.modules.utils._pair(output_padding))
        self.dilation = tuple(nn.modules.utils._pair(dilation))
        self.groups = int(groups)

    @classmethod
    def from_pq(cls, layer: PQConvTranspose2d) -> "PQConvTranspose2dInfer":
        if layer.padding_mode != "zeros":
            raise ValueError("ConvTranspose2d supports only padding_mode='zeros'")
        return cls(
            layer.codes,
            layer.codebook,
            layer.weight_shape,
            bias=layer.bias,
            stride=layer.stride,
            padding=layer.padding,
            output_padding=layer.output_padding,
            groups=layer.groups,
            dilation=layer.dilation,
        )

    def forward(self, x: Tensor, output_size: Optional[Sequence[int]] = None) -> Tensor:
        output_padding = self.output_padding
        if output_size is not None:
            output_padding = nn.ConvTranspose2d._output_padding(
                self,
                x,
                output_size,
                list(self.stride),
                list(self.padding),
                list(self.weight_shape[2:]),
                2,
                list(self.dilation),
            )
        return pq_conv_transpose2d(
            x,
            self.codes,
            self.codebook,
            self.weight_shape,
            bias=self.bias,
            stride=self.stride,
            padding=self.padding,
            output_padding=output_padding,
            groups=self.groups,
            dilation=self.dilation,
        )

    def extra_repr(self) -> str:
        return f"{self._pq_repr()}, stride={self.stride}, padding={self.padding}"


INFER_LAYER_TYPES = (PQConv2dInfer, PQConv1dInfer, PQLinearInfer, PQConvTranspose2dInfer)


def inference_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers (what stays resident for inference)."""
    return sum(t.numel() * t.element_size() for t in chain(model.parameters(), model.buffers()))


def max_scratch_bytes(model: nn.Module) -> int:
    """Largest decode scratch (fp32 bytes) an inference layer of ``model`` can need, any input.

    A conv decodes in chunks only for small outputs (``ops.decode_rows_at_once``), so this is the
    largest whole weight; the scratch a given forward used is ``torch.ops.bgd._scratch_bytes()``
    on the thread that ran it.
    """
    layers = (m for m in model.modules() if isinstance(m, INFER_LAYER_TYPES))
    return max((m.scratch_bytes() for m in layers), default=0)
