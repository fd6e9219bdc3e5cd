"""Model building: registry of architectures + teacher weights."""
from __future__ import annotations

from torch import nn

from . import classification  # noqa: F401  (registers built-ins)
from . import detection  # noqa: F401  (registers built-in detectors)
from .attention import expose_attention_projections
from .registry import ARCH_REGISTRY, get_arch
from .weights import load_weights, read_state_dict

__all__ = ["ARCH_REGISTRY", "build_model", "build_teacher", "get_arch", "load_weights", "read_state_dict"]


def _build(cfg) -> nn.Module:
    model = get_arch(cfg.MODEL.ARCH)(cfg)
    expose_attention_projections(model)  # function-identical; the projections become quantizable Linears
    return model


def build_model(cfg) -> nn.Module:
    """The uncompressed model of ``cfg.MODEL.ARCH`` on ``cfg.MODEL.DEVICE``, as its builder initialises it (no
    weights loaded: that is :func:`build_teacher`'s, or the checkpoint loader's, explicit step)."""
    return _build(cfg).to(cfg.MODEL.DEVICE)


def build_teacher(cfg) -> nn.Module:
    """:func:`build_model` with ``cfg.MODEL.WEIGHTS`` loaded (torchvision's weights API or a local state dict)."""
    model = _build(cfg)
    load_weights(model, cfg.MODEL.ARCH, cfg.MODEL.WEIGHTS)
    return model.to(cfg.MODEL.DEVICE)
