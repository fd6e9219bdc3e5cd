"""Built-in classification architectures: thin wrappers of torchvision builders."""
from __future__ import annotations

import torchvision
from torch import nn

from .registry import ARCH_REGISTRY
from .stages import resnet_stages

__all__ = ["TORCHVISION_CLASSIFIERS"]

TORCHVISION_CLASSIFIERS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
    "wide_resnet50_2",
)


def _register(name: str) -> None:
    def build(cfg) -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=cfg.MODEL.NUM_CLASSES)

    build.__name__ = name
    build.__doc__ = f"torchvision ``{name}`` (weights via MODEL.WEIGHTS)."
    build.task = "classification"
    build.stages = resnet_stages  # all of TORCHVISION_CLASSIFIERS are ResNet variants
    ARCH_REGISTRY.register(build)


for _name in TORCHVISION_CLASSIFIERS:
    _register(_name)
