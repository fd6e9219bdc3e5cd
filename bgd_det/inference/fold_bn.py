"""Conv -> BatchNorm pairs a codebook conv can absorb: found by tracing the model with ``torch.fx`` (codebook layers
and BatchNorms as leaves); a part that cannot be traced is traced child by child, and whatever is not found is left
unfolded."""
from __future__ import annotations

from collections import Counter
from typing import List, Tuple

import torch.fx
from torch import nn

from ..quantization.bn_correction import BN_TYPES, bn_scale_shift
from ..quantization.layers import PQ_LAYER_TYPES, PQConv2d

__all__ = ["conv_bn_pairs", "foldable_pairs"]


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps codebook layers and BatchNorms as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PQ_LAYER_TYPES + BN_TYPES) or super().is_leaf_module(m, qualname)


def conv_bn_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """``(conv, bn)`` module names where a BatchNorm is applied to, and only to, a
    :class:`PQConv2d`'s output.

    The model is traced with ``torch.fx``; a part that cannot be traced is tried child by child. A
    pair is kept only if the conv output has no other user and each module is called once in the
    traced forward.
    """
    pairs: List[Tuple[str, str]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, PQ_LAYER_TYPES + BN_TYPES):
            return
        if not any(isinstance(m, PQConv2d) for m in module.modules()):
            return
        try:
            graph = _LeafTracer().trace(module)
        except Exception:  # data-dependent control flow etc.: look inside
            for name, child in module.named_children():
                visit(child, f"{prefix}{name}.")
            return
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(
                module.get_submodule(node.target), PQConv2d
            ):
                continue
            users = list(node.users)
            if len(users) != 1 or users[0].op != "call_module":
                continue
            bn_node = users[0]
            if not isinstance(module.get_submodule(bn_node.target), BN_TYPES):
                continue
            if calls[node.target] != 1 or calls[bn_node.target] != 1:
                continue
            if tuple(bn_node.args) != (node,) or bn_node.kwargs:
                continue
            pairs.append((prefix + node.target, prefix + bn_node.target))

    visit(model, "")
    return pairs


def foldable_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """:func:`conv_bn_pairs` whose BatchNorm has eval statistics to fold (``bn_scale_shift`` is not None)."""
    return [(conv, bn) for conv, bn in conv_bn_pairs(model) if bn_scale_shift(model.get_submodule(bn)) is not None]
