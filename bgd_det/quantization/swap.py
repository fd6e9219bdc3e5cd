"""Swapping dense layers for codebook layers in a model."""
from __future__ import annotations

from typing import Dict, Iterable

from torch import nn

from .layers import PQ_LAYER_TYPES, pq_type_for
from .plan import LayerPlan

__all__ = ["set_module", "make_pq_layer", "swap_in_skeleton", "pq_layers"]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def make_pq_layer(module: nn.Module, layer: LayerPlan) -> nn.Module:
    """An empty codebook layer with ``module``'s hyper-parameters and bias, per ``layer``'s d and K."""
    cls = pq_type_for(module)
    if cls is None:
        raise TypeError(f"{layer.name!r} is a {type(module).__name__}, which cannot be quantized")
    return cls.from_dense(module, block_size=layer.block_size, n_centroids=layer.n_centroids)


def swap_in_skeleton(model: nn.Module, plan: Iterable[LayerPlan]) -> nn.Module:
    """Replace every planned layer by an empty codebook layer (to be filled by ``load_state_dict``)."""
    for layer in plan:
        module = model.get_submodule(layer.name)
        if not isinstance(module, PQ_LAYER_TYPES):
            set_module(model, layer.name, make_pq_layer(module, layer))
    return model


def pq_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """All codebook layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PQ_LAYER_TYPES)}
