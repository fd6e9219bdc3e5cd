"""Sequential stages of an architecture, for the streaming quantization engine.

A model is cut into stages that run one after the other: the output of stage ``i`` is the whole input of stage
``i + 1`` (no other tensor crosses a stage boundary). The streaming engine keeps each stage's input for every
calibration image and runs only the stage that holds the layer being quantized
(:mod:`bgd_det.engine.streaming`). An architecture declares its stages with a ``stages`` attribute on its registry
builder: ``builder.stages = fn(model) -> List[Stage]``; one without it is quantized by the recompute path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .registry import get_arch

__all__ = ["Stage", "resnet_stages", "stages_of", "stage_of_layer"]


@dataclass(frozen=True)
class Stage:
    """One sequential piece of a model.

    Attributes:
        name: for logs, e.g. ``"layer2.1"``.
        modules: names of the submodules the stage runs (a layer belongs to the stage when its name is one of
            them or lies below one of them).
        run: ``fn(model, x) -> y``: the stage of ``model`` (student or teacher) on its input Tensor[B, ...].
        pair: optional ``fn(student output, teacher output) -> student output`` applied after the stage, when
            the student's later stages must follow the teacher's decisions (a detector's proposals).
    """

    name: str
    modules: Tuple[str, ...]
    run: Callable[[nn.Module, Tensor], Tensor]
    pair: Optional[Callable[[Any, Any], Any]] = None

    def holds(self, layer: str) -> bool:
        """Whether module ``layer`` runs inside this stage."""
        return any(layer == m or layer.startswith(m + ".") for m in self.modules)


def _submodule_stage(name: str) -> Stage:
    return Stage(name, (name,), lambda model, x: model.get_submodule(name)(x))


def _resnet_stem(model: nn.Module, x: Tensor) -> Tensor:
    return model.maxpool(model.relu(model.bn1(model.conv1(x))))


def _resnet_head(model: nn.Module, x: Tensor) -> Tensor:
    return model.fc(torch.flatten(model.avgpool(x), 1))


def resnet_stages(model: nn.Module) -> List[Stage]:
    """torchvision ResNet / ResNeXt / Wide ResNet: the stem, every residual block, then pooling + ``fc``."""
    stages = [Stage("stem", ("conv1", "bn1", "relu", "maxpool"), _resnet_stem)]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        stages += [_submodule_stage(f"{layer}.{i}") for i in range(len(getattr(model, layer)))]
    stages.append(Stage("head", ("avgpool", "fc"), _resnet_head))
    return stages


def stages_of(arch: str, model: nn.Module) -> Optional[List[Stage]]:
    """The stages registered for ``arch`` (the builder's ``stages`` attribute), or None when it declares none."""
    fn = getattr(get_arch(arch), "stages", None)
    return None if fn is None else fn(model)


def stage_of_layer(stages: Sequence[Stage], layer: str) -> int:
    """Index of the stage that runs ``layer``; a one-line error when none or several do."""
    hits = [i for i, s in enumerate(stages) if s.holds(layer)]
    if len(hits) != 1:
        where = ", ".join(stages[i].name for i in hits) or "none"
        raise ValueError(f"layer {layer!r} runs in {len(hits)} stages ({where}); each layer needs exactly one")
    return hits[0]
