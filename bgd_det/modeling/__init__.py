"""Model building: registry of architectures + teacher weights."""
from __future__ import annotations

from torch import nn

from . import classification  # noqa: F401  (registers built-ins)
from . import detection  # noqa: F401  (registers built-in detectors)
from .registry import ARCH_REGISTRY, get_arch
from .weights import load_weights, read_state_dict

__all__ = ["ARCH_REGISTRY", "build_model", "get_arch", "load_weights", "read_state_dict"]


def build_model(cfg, *, load: bool = True) -> nn.Module:
    """The uncompressed model of ``cfg.MODEL.ARCH``, with ``cfg.MODEL.WEIGHTS`` loaded when ``load``."""
    builder = get_arch(cfg.MODEL.ARCH)
    model = builder(cfg)
    if load:
        load_weights(model, cfg.MODEL.ARCH, cfg.MODEL.WEIGHTS)
    return model.to(cfg.MODEL.DEVICE)
