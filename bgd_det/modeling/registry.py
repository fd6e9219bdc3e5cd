"""Architecture registry (fvcore ``Registry``).

Contract: a registered object is ``fn(cfg) -> nn.Module`` returning the *uncompressed* model with random
weights (teacher weights are loaded afterwards by :func:`bgd_det.modeling.build_model`), plus an attribute
``fn.example_input(cfg) -> Any`` is optional. Register your own architecture in your module::

    from bgd_det.modeling import ARCH_REGISTRY

    @ARCH_REGISTRY.register()
    def my_net(cfg):
        return MyNet(num_classes=cfg.MODEL.NUM_CLASSES)

and select it with ``MODEL.ARCH my_net``.
"""
from __future__ import annotations

from fvcore.common.registry import Registry

ARCH_REGISTRY = Registry("ARCH")
ARCH_REGISTRY.__doc__ = __doc__


def get_arch(name: str):
    """The builder registered as ``name``; an unknown name lists the registered ones."""
    if name not in ARCH_REGISTRY:
        known = sorted(k for k, _ in ARCH_REGISTRY)
        raise KeyError(f"unknown MODEL.ARCH {name!r}; registered architectures: {known}")
    return ARCH_REGISTRY.get(name)
