"""Where a Linear is called from: its module forward (hooks see it), or ``F.linear`` given its weight directly
(torchvision's Swin: ``F.linear(x, self.qkv.weight, ...)`` inside ``shifted_window_attention``), which no hook sees.

:func:`linear_weight_calls` reports the second kind through a ``TorchFunctionMode``: every ``F.linear`` call whose
weight *is* (by identity) the ``weight`` parameter of one of the given modules. Plans, captures and corrections use
it beside their hooks, so such layers are ordered, captured and quantized like called ones; after the swap their
codebook layer answers ``.weight`` with the decoded weight (:mod:`bgd_det.quantization.layers`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Mapping

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["linear_weight_calls"]

#: fn(module name, input Tensor[..., in], output Tensor[..., out])
CallFn = Callable[[str, Tensor, Tensor], None]


class _LinearWeightCalls(TorchFunctionMode):
    def __init__(self, weights: Dict[int, str], decoded: Dict[str, nn.Module], fn: CallFn) -> None:
        super().__init__()
        self.weights, self.decoded, self.fn = weights, decoded, fn

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.weights.get(id(weight))
            if name is None:  # a codebook layer's decoded weight, read through .weight just before the call
                name = next((n for n, m in self.decoded.items() if m.last_decoded() is weight), None)
            if name is not None:
                self.fn(name, args[0] if args else kwargs["input"], out)
        return out


@contextlib.contextmanager
def linear_weight_calls(modules: Mapping[str, nn.Module], fn: CallFn) -> Iterator[None]:
    """While active, ``fn(name, input, output)`` for every ``F.linear`` call that takes the weight of
    ``modules[name]``, whoever makes the call (the module's own forward too): the dense ``weight`` parameter of an
    ``nn.Linear``, or the decoded weight a codebook Linear just returned for ``.weight``. Other modules are ignored."""
    weights = {id(m._parameters["weight"]): n for n, m in modules.items()
               if isinstance(m, nn.Linear) and isinstance(m._parameters.get("weight"), nn.Parameter)}
    decoded = {n: m for n, m in modules.items() if isinstance(m, nn.Linear) and hasattr(m, "last_decoded")}
    if not weights and not decoded:
        yield
        return
    with _LinearWeightCalls(weights, decoded, fn):
        yield
