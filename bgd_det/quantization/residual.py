"""Residual compensation: which layers end a residual branch, and the skip tensor added to their output.

In a torchvision ResNet block the last conv's output goes through its BatchNorm (per channel ``a * z + c`` in
eval mode) and is added to the skip path (the block input, or ``downsample`` of it). The block's pre-ReLU output
matches the teacher's when ``z_s = z_t + (skip_t - skip_s) / a``: that conv can absorb the drift that the
student's skip path carries. One rule table, keyed by block type.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = ["RESIDUAL_RULES", "residual_branch_end", "skip_path_first"]

# block type -> name of the conv whose (BatchNorm-ed) output is added to the skip path
RESIDUAL_RULES: Dict[Type[nn.Module], str] = {BasicBlock: "conv2", Bottleneck: "conv3"}


def _skip(block: nn.Module, x: Tensor) -> Tensor:
    downsample = getattr(block, "downsample", None)
    return downsample(x) if downsample is not None else x


def residual_branch_end(model: nn.Module, name: str) -> Optional[Tuple[str, Callable[[nn.Module, Tensor], Tensor]]]:
    """``(block name, skip_fn)`` when layer ``name`` ends a residual branch, else None.

    ``skip_fn(block, x)`` maps the block's input Tensor[B, C_in, H, W] to its skip tensor Tensor[B, C_out, H', W'].
    """
    parent, _, leaf = name.rpartition(".")
    if not parent:
        return None
    block = model.get_submodule(parent)
    if RESIDUAL_RULES.get(type(block)) != leaf:
        return None
    return parent, _skip


def skip_path_first(model: nn.Module, order: Sequence[str]) -> List[str]:
    """``order`` with each block's skip-path layers (its ``downsample``) moved to just before the layer that ends
    the block's residual branch (QUANT.REFINE.SKIP_PATH_FIRST).

    In execution order ``downsample`` runs after the branch, so the branch end's residual target compensates a
    skip path that is still dense, and the compressed skip path's own error reaches the block output
    uncompensated. Quantized first, that error is part of the drift the branch end absorbs. Other layers keep
    their order; the skip path's input (the block input) is the same either way.
    """
    out = list(order)
    for name in order:
        found = residual_branch_end(model, name)
        if found is None:
            continue
        prefix = found[0] + ".downsample."
        end = out.index(name)
        moved = [n for n in out[end + 1:] if n.startswith(prefix)]
        if moved:
            out = [n for n in out if n not in moved]
            end = out.index(name)
            out[end:end] = moved
    return out
