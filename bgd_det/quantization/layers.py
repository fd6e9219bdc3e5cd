"""Codebook layers: weights stored as codes (buffers) + a codebook (parameter).

``state_dict()`` of a model holding these layers *is* the compressed model: ``codes`` are integer buffers,
``codebook`` is the only learnable weight. The forward decodes with :func:`pq_decode` (autograd reaches the
codebook); inference through the compiled op lives in :mod:`bgd_det.ops`.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pq import check_codes, code_dtype, pq_decode

__all__ = ["PQConv2d", "PQConv1d", "PQLinear", "PQConvTranspose2d", "PQ_LAYER_TYPES", "QUANTIZABLE_TYPES"]


class _PQMixin:
    """Shared storage and bookkeeping of codebook layers: built with ``_dense``'s arguments (the nn class whose
    hyper-parameters they keep), whose dense weight is dropped for codes and a codebook.

    Attributes:
        codes (Tensor[C_out, n_blocks] uint8/int16): buffer.
        codebook (Parameter[K, d] float32).
        weight_shape (tuple): shape of the dense weight the codes stand for.
    """

    _dense: type
    codes: Tensor
    codebook: nn.Parameter
    weight_shape: Tuple[int, ...]

    def __init__(self, *args, block_size: int, n_centroids: int, **kwargs) -> None:
        self._dense.__init__(self, *args, **kwargs)
        shape = self.weight.shape
        del self.weight
        self._init_pq(shape, block_size, n_centroids)

    def _init_pq(self, weight_shape, block_size: int, n_centroids: int) -> None:
        rows = weight_shape[0]
        cols = math.prod(weight_shape[1:])
        if cols % block_size != 0:
            raise ValueError(
                f"block_size={block_size} does not divide the row length {cols} of a weight of shape "
                f"{tuple(weight_shape)}"
            )
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.block_size = int(block_size)
        self.n_centroids = int(n_centroids)
        self.register_buffer(
            "codes", torch.zeros(rows, cols // block_size, dtype=code_dtype(n_centroids))
        )
        self.codebook = nn.Parameter(torch.zeros(n_centroids, block_size))

    @property
    def n_blocks(self) -> int:
        return self.codes.shape[1]

    def decoded_weight(self) -> Tensor:
        """Dense weight Tensor[weight_shape] decoded from codes and codebook (differentiable in codebook)."""
        return pq_decode(self.codes, self.codebook, self.weight_shape)

    @property
    def weight(self) -> Tensor:
        """The decoded weight, for code that reads ``layer.weight`` instead of calling the layer (torchvision's Swin
        attention); remembered weakly so that :mod:`bgd_det.quantization.calls` recognises the ``F.linear`` call."""
        if "codes" not in self._buffers:  # inside nn.Module.__init__: the dense parameter (Module.__getattr__)
            raise AttributeError("weight")
        w = self.decoded_weight()
        self._decoded = weakref.ref(w)
        return w

    def last_decoded(self) -> Optional[Tensor]:
        """The tensor the last ``.weight`` read returned, while it is alive."""
        ref = getattr(self, "_decoded", None)
        return None if ref is None else ref()

    def set_quantization(self, codes: Tensor, codebook: Tensor) -> None:
        """Load codes Tensor[C_out, n_blocks] and codebook Tensor[K, d] (checked against this layer)."""
        if tuple(codes.shape) != tuple(self.codes.shape):
            raise ValueError(f"codes shape {tuple(codes.shape)} != expected {tuple(self.codes.shape)}")
        if tuple(codebook.shape) != tuple(self.codebook.shape):
            raise ValueError(
                f"codebook shape {tuple(codebook.shape)} != expected {tuple(self.codebook.shape)}"
            )
        check_codes(codes, self.n_centroids)
        with torch.no_grad():
            self.codes.copy_(codes.to(self.codes.dtype))
            self.codebook.copy_(codebook.to(self.codebook))

    def extra_repr(self) -> str:
        return f"{self._dense.extra_repr(self)}, block_size={self.block_size}, n_centroids={self.n_centroids}"


class _PQConv(_PQMixin):
    """Shared body of the codebook Conv1d / Conv2d."""

    @classmethod
    def from_dense(cls, conv: nn.Module, *, block_size: int, n_centroids: int) -> "_PQConv":
        """A codebook layer with the hyper-parameters (and bias) of ``conv``; codes/codebook still zero."""
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, block_size=block_size, n_centroids=n_centroids,
        )
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.data)
        return layer.to(conv.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.decoded_weight().to(x.dtype), self.bias)


class PQConv2d(_PQConv, nn.Conv2d):
    """Conv2d whose weight is product-quantized; honours stride/padding/dilation/groups."""

    _dense = nn.Conv2d


class PQConv1d(_PQConv, nn.Conv1d):
    """Conv1d whose weight Tensor[C_out, C_in/groups, k] is product-quantized along ``C_in/groups * k``."""

    _dense = nn.Conv1d


class PQLinear(_PQMixin, nn.Linear):
    """Linear whose weight Tensor[out, in] is product-quantized along ``in``."""

    _dense = nn.Linear

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, block_size: int, n_centroids: int) -> "PQLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    block_size=block_size, n_centroids=n_centroids)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data)
        return layer.to(linear.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.decoded_weight().to(x.dtype), self.bias)


class PQConvTranspose2d(_PQMixin, nn.ConvTranspose2d):
    """ConvTranspose2d whose weight Tensor[C_in, C_out/groups, kh, kw] is product-quantized per input row.

    The weight's first dimension is ``C_in`` (PyTorch's layout), so sub-vectors run along
    ``C_out/groups * kh * kw`` of each input channel.
    """

    _dense = nn.ConvTranspose2d

    @classmethod
    def from_dense(cls, conv: nn.ConvTranspose2d, *, block_size: int,
                   n_centroids: int) -> "PQConvTranspose2d":
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, output_padding=conv.output_padding, groups=conv.groups,
            bias=conv.bias is not None, dilation=conv.dilation, block_size=block_size,
            n_centroids=n_centroids,
        )
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.data)
        return layer.to(conv.weight.device)

    def forward(self, x: Tensor, output_size=None) -> Tensor:
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return F.conv_transpose2d(
            x, self.decoded_weight().to(x.dtype), self.bias, self.stride, self.padding,
            output_padding, self.groups, self.dilation,
        )


#: dense type -> codebook type. The one place that says which layer types can be quantized.
QUANTIZABLE_TYPES = {nn.Conv2d: PQConv2d, nn.Conv1d: PQConv1d, nn.Linear: PQLinear,
                     nn.ConvTranspose2d: PQConvTranspose2d}
PQ_LAYER_TYPES = (PQConv2d, PQConv1d, PQLinear, PQConvTranspose2d)


def pq_type_for(module: nn.Module):
    """Codebook class for a dense module (exact type match after PQ types), or None."""
    if isinstance(module, PQ_LAYER_TYPES):
        return None
    for dense, pq in QUANTIZABLE_TYPES.items():
        if type(module) is dense or (isinstance(module, dense) and not isinstance(module, PQ_LAYER_TYPES)):
            return pq
    return None
