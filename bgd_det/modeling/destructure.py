"""A de-structured teacher: function-preserving re-parametrisation of a torchvision ResNet.

The offline ImageNet teachers are decoded product-quantized models: every layer is made of a few hundred distinct
sub-vectors, which a student with the same block size can copy exactly. These transforms keep the network's
function (up to float rounding) while giving almost every sub-vector its own value:

1. **row scaling**: output channel ``c`` of every conv that feeds a BatchNorm is multiplied by ``t_c > 0``; the
   BatchNorm's running statistics absorb it (``mean' = t mean``, ``var' = t^2 (var + eps) - eps``);
2. **internal channel scaling**: inside a residual branch, output channel ``c`` of ``bn_k`` is multiplied by
   ``s_c > 0`` (its weight and bias); the ReLU commutes with it and input channel ``c`` of ``conv_{k+1}`` is divided;
3. **residual stream scaling**: the stream between blocks is multiplied channel-wise by ``u > 0`` through every
   BatchNorm that writes it (the stem's ``bn1``, each branch's last BatchNorm, ``downsample.1``); every layer that
   reads it (``conv1`` and ``downsample.0`` of the next block, ``fc``) divides its input channel; an identity skip
   carries the same ``u`` on both sides;
4. **permutations** of every branch's internal channels (``conv_k`` rows, ``bn_k``, ``conv_{k+1}`` columns).

Scales are log-normal, ``exp(spread * N(0, 1))``. The result is an upper bound on a float teacher's difficulty
(its weights keep the decoded model's low-rank-ish statistics), not a float teacher.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

__all__ = ["destructure_resnet", "distinct_subvectors", "structure_report", "compare_logits"]


def _pairs(block: nn.Module) -> List[Tuple[nn.Conv2d, nn.BatchNorm2d]]:
    names = ("1", "2") if isinstance(block, BasicBlock) else ("1", "2", "3")
    return [(getattr(block, "conv" + k), getattr(block, "bn" + k)) for k in names]


def _scale_rows(conv: nn.Conv2d, bn: nn.BatchNorm2d, t: Tensor) -> None:
    """conv output channel c times t_c, absorbed by ``bn``'s running statistics."""
    conv.weight.mul_(t.view(-1, 1, 1, 1))
    if conv.bias is not None:
        conv.bias.mul_(t)
    var = bn.running_var.double()
    bn.running_mean.mul_(t)
    bn.running_var.copy_((t.double() ** 2 * (var + bn.eps) - bn.eps).to(bn.running_var.dtype))


def _scale_bn_output(bn: nn.BatchNorm2d, s: Tensor) -> None:
    bn.weight.mul_(s)
    bn.bias.mul_(s)


def _divide_input_channels(layer: nn.Module, s: Tensor) -> None:
    """Input channel c of a conv (groups honoured) or Linear divided by s_c."""
    if isinstance(layer, nn.Linear):
        layer.weight.div_(s.view(1, -1))
        return
    groups, per_group = layer.groups, layer.weight.shape[1]
    out_per_group = layer.weight.shape[0] // groups
    w = layer.weight.view(groups, out_per_group, per_group, *layer.weight.shape[2:])
    w.div_(s.view(groups, 1, per_group, 1, 1))


def _permute_internal(conv_a: nn.Conv2d, bn_a: nn.BatchNorm2d, conv_b: nn.Conv2d, perm: Tensor) -> None:
    conv_a.weight.copy_(conv_a.weight[perm])
    for t in (bn_a.weight, bn_a.bias, bn_a.running_mean, bn_a.running_var):
        t.copy_(t[perm])
    conv_b.weight.copy_(conv_b.weight[:, perm])


@torch.no_grad()
def destructure_resnet(model: ResNet, *, spread: float = 0.5, seed: int = 0) -> ResNet:
    """Apply the four transforms of the module docstring to ``model`` in place (eval-mode function kept).

    Args:
        model: a torchvision ResNet / ResNeXt / Wide ResNet with BatchNorm2d (running statistics tracked).
        spread: standard deviation of the log-scales (0: scaling off, permutations only).
        seed: seeds every scale and permutation.
    """
    gen = torch.Generator().manual_seed(seed)

    def scales(n: int) -> Tensor:
        return torch.exp(spread * torch.randn(n, generator=gen))

    _scale_rows(model.conv1, model.bn1, scales(model.conv1.out_channels))
    stream = scales(model.bn1.num_features)
    _scale_bn_output(model.bn1, stream)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            pairs = _pairs(block)
            for (conv_a, bn_a), (conv_b, _) in zip(pairs, pairs[1:]):
                if conv_a.groups == 1 and conv_b.groups == 1:
                    _permute_internal(conv_a, bn_a, conv_b, torch.randperm(bn_a.num_features, generator=gen))
            for conv, bn in pairs:
                _scale_rows(conv, bn, scales(conv.out_channels))
            for (_, bn_a), (conv_b, _) in zip(pairs, pairs[1:]):
                s = scales(bn_a.num_features)
                _scale_bn_output(bn_a, s)
                _divide_input_channels(conv_b, s)
            _divide_input_channels(block.conv1, stream)
            if block.downsample is not None:
                conv_d, bn_d = block.downsample[0], block.downsample[1]
                _divide_input_channels(conv_d, stream)
                _scale_rows(conv_d, bn_d, scales(conv_d.out_channels))
                stream = scales(bn_d.num_features)  # a new stream; an identity skip keeps the old one
                _scale_bn_output(bn_d, stream)
            _scale_bn_output(pairs[-1][1], stream)
    _divide_input_channels(model.fc, stream)
    return model


def distinct_subvectors(weight: Tensor, block_size: int) -> int:
    """Number of distinct sub-vectors of size ``block_size`` in a weight's rows (exact float equality)."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    return int(torch.unique(flat.reshape(-1, block_size), dim=0).shape[0])


def structure_report(model: nn.Module, block_sizes: Dict[str, int]) -> Dict[str, Dict[str, int]]:
    """``{layer: {"d": d, "subvectors": n, "distinct": k}}`` for convs / Linears whose kind has a block size
    (``block_sizes`` keys ``"kxk"``, ``"1x1"``, ``"linear"``)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            d = block_sizes["1x1" if m.kernel_size == (1, 1) else "kxk"]
        elif isinstance(m, nn.Linear):
            d = block_sizes["linear"]
        else:
            continue
        if (m.weight.numel() // m.weight.shape[0]) % d:  # e.g. the 7x7 stem: 147 columns, no 9-blocks
            continue
        out[name] = {"d": d, "subvectors": m.weight.numel() // d, "distinct": distinct_subvectors(m.weight, d)}
    return out


@torch.no_grad()
def compare_logits(a: nn.Module, b: nn.Module, batches) -> Dict[str, float]:
    """How far ``b``'s logits are from ``a``'s on ``batches`` of ``(images, labels)``.

    Returns:
        ``max_rel_diff`` (max |a - b| / max |a| per batch, maximum over batches), ``top1_same`` and
        ``top5_same`` (fraction of images whose top-1 class / top-5 set is the same), ``n_images``.
    """
    a.eval()
    b.eval()
    worst, same1, same5, n = 0.0, 0, 0, 0
    for images, _ in batches:
        ya, yb = a(images).double(), b(images).double()
        worst = max(worst, float((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-12)))
        same1 += int((ya.argmax(1) == yb.argmax(1)).sum())
        ta, tb = ya.topk(5, 1).indices.sort(1).values, yb.topk(5, 1).indices.sort(1).values
        same5 += int((ta == tb).all(1).sum())
        n += images.shape[0]
    return {"max_rel_diff": worst, "top1_same": same1 / max(n, 1), "top5_same": same5 / max(n, 1), "n_images": n}
