"""Loading teacher weights: torchvision's weights API or a local state dict."""
from __future__ import annotations

import logging
import os
from typing import Dict

import torch
import torchvision
from torch import nn

from ..utils.file_io import read_checkpoint_file

logger = logging.getLogger(__name__)

__all__ = ["load_weights", "read_state_dict"]


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A plain state dict from ``path`` (a bare dict, or one under "model"/"state_dict"), loaded safely."""
    obj = read_checkpoint_file(path, what="MODEL.WEIGHTS file")
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return obj


def load_weights(model: nn.Module, arch: str, weights: str) -> nn.Module:
    """Load ``weights`` into ``model`` in place.

    Args:
        weights: "" (keep random init), a torchvision weights enum name ("ResNet50_Weights.IMAGENET1K_V2"),
            "DEFAULT" (the architecture's default torchvision weights), or a state-dict path.
    """
    if not weights:
        logger.warning("MODEL.WEIGHTS is empty: the teacher keeps its random initialisation")
        return model
    if weights == "DEFAULT" or ("_Weights." in weights and not os.path.exists(weights)):
        enum = (torchvision.models.get_model_weights(arch).DEFAULT if weights == "DEFAULT"
                else torchvision.models.get_weight(weights))
        try:
            state = enum.get_state_dict(progress=False)
        except OSError as e:  # URLError and the like: torchvision downloads into its hub cache
            raise OSError(f"MODEL.WEIGHTS={weights}: could not fetch {enum.url} ({e}); without a network, copy the "
                          f"file into torch's hub cache ({torch.hub.get_dir()}/checkpoints) or point MODEL.WEIGHTS "
                          f"at a local state dict") from None
        source = str(enum)
    else:
        state = read_state_dict(weights)
        source = weights
    missing, unexpected = model.load_state_dict(state, strict=False)
    # num_batches_tracked is optional in older checkpoints.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"weights {source} do not match MODEL.ARCH {arch!r}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    logger.info("loaded teacher weights from %s", source)
    return model
