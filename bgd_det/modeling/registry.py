"""Architecture registry (fvcore ``Registry``).

Contract: a registered object is ``fn(cfg) -> nn.Module`` returning the *uncompressed* model with random
weights (teacher weights are loaded afterwards by :func:`bgd_det.modeling.build_model`), plus an attribute
``fn.example_input(cfg) -> Any`` is optional. Register your own architecture in your module::

    from bgd_det.modeling import ARCH_REGISTRY

    @ARCH_REGISTRY.register()
    def my_net(cfg):
        return MyNet(num_classes=cfg.MODEL.NUM_CLASSES)

and select it with ``MODEL.ARCH my_net``. Any torchvision classification builder that is not registered is
available by its torchvision name (``MODEL.ARCH mobilenet_v2``, ``swin_t``).
"""
from __future__ import annotations

import difflib
from typing import Callable, List

import torchvision
from fvcore.common.registry import Registry

ARCH_REGISTRY = Registry("ARCH")
ARCH_REGISTRY.__doc__ = __doc__


def torchvision_classifiers() -> List[str]:
    """Names of torchvision's classification builders (``torchvision.models.list_models``)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_builder(name: str) -> Callable:
    """``fn(cfg)``: torchvision's ``get_model(name)`` with random weights and MODEL.NUM_CLASSES outputs (its
    weights load by MODEL.WEIGHTS like a registered ResNet's: an enum name, "DEFAULT" or a state-dict path)."""
    def build(cfg):
        return torchvision.models.get_model(name, weights=None, num_classes=cfg.MODEL.NUM_CLASSES)

    build.__name__ = name
    build.task = "classification"
    return build


def get_arch(name: str):
    """The builder registered as ``name``, else torchvision's classification builder of that name (``MODEL.ARCH
    swin_t``); an unknown name lists the registered ones."""
    if name in ARCH_REGISTRY:
        return ARCH_REGISTRY.get(name)
    if name in torchvision_classifiers():
        return _torchvision_builder(name)
    known = sorted(k for k, _ in ARCH_REGISTRY)
    near = difflib.get_close_matches(name, known + torchvision_classifiers(), n=3, cutoff=0.6)
    raise KeyError(f"unknown MODEL.ARCH {name!r}; registered architectures: {known}, or any torchvision "
                   f"classification model (torchvision.models.list_models()); near matches: {near or 'none'}")
