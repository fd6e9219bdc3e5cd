"""Model size accounting: the one place that says how many bytes a compressed model takes.

Rules (MiB = 2**20 bytes):
- a quantized layer's codes take ``log2(K)`` bits per sub-vector (``log2(K) / d`` bits per weight);
- its codebook takes ``K * d`` fp16 values;
- every other parameter (biases, BatchNorm affine, unquantized layers) takes fp32. BatchNorm counts as its
  two affine vectors; running statistics are buffers and are folded into them at deployment. torchvision's
  ``FrozenBatchNorm2d`` (detection models) holds its affine vectors as buffers: they count the same, two fp32
  vectors, so a model costs the same with either BatchNorm type;
- the uncompressed size is every parameter of the original model in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from .layers import PQ_LAYER_TYPES

__all__ = ["LayerSize", "SizeReport", "model_size", "pq_bytes"]

MIB = 2.0**20


@dataclass
class LayerSize:
    """Size of one module's own parameters.

    Attributes:
        name: module name; kind: "pq" or "fp32"; dense_bytes: fp32 size of its parameters before compression;
        bytes: size after compression; block_size/n_centroids: PQ settings (0 for fp32 modules).
    """

    name: str
    kind: str
    dense_bytes: float
    bytes: float
    block_size: int = 0
    n_centroids: int = 0

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.bytes if self.bytes else float("inf")


@dataclass
class SizeReport:
    """Sizes of every module with parameters, in execution-independent (named_modules) order."""

    layers: List[LayerSize] = field(default_factory=list)

    @property
    def compressed_bytes(self) -> float:
        return sum(layer.bytes for layer in self.layers)

    @property
    def dense_bytes(self) -> float:
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def compressed_mib(self) -> float:
        return self.compressed_bytes / MIB

    @property
    def dense_mib(self) -> float:
        return self.dense_bytes / MIB

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.compressed_bytes

    def by_name(self) -> Dict[str, LayerSize]:
        return {layer.name: layer for layer in self.layers}


def pq_bytes(n_subvectors: int, n_centroids: int, block_size: int) -> float:
    """Bytes of a quantized weight: ``log2(K)`` bits per code plus ``K * d`` fp16 centroids."""
    return n_subvectors * math.log2(n_centroids) / 8.0 + 2.0 * n_centroids * block_size


def model_size(model: nn.Module) -> SizeReport:
    """Size report of ``model`` (dense or holding codebook layers).

    Returns:
        SizeReport with one :class:`LayerSize` per module that owns parameters.
    """
    report = SizeReport()
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if isinstance(module, FrozenBatchNorm2d):  # affine held as buffers: counts as BatchNorm's parameters
            own += [(n, b) for n, b in module.named_buffers(recurse=False) if n in ("weight", "bias")]
        if isinstance(module, PQ_LAYER_TYPES):
            k, d = module.n_centroids, module.block_size
            n_weights = math.prod(module.weight_shape)
            others = [p for pname, p in own if pname != "codebook"]
            fp32 = 4.0 * sum(p.numel() for p in others)
            packed = pq_bytes(module.codes.numel(), k, d) + fp32
            report.layers.append(LayerSize(name, "pq", 4.0 * n_weights + fp32, packed, d, k))
        elif own:
            fp32 = 4.0 * sum(p.numel() for _, p in own)
            report.layers.append(LayerSize(name, "fp32", fp32, fp32))
    return report
