"""Importers of the peers' published compressed checkpoints (BGD and PQF) into bgd_det's format.

Both peers cut a weight as bgd_det does (:func:`bgd_det.quantization.pq.pq_decode`): row ``o`` of
``W.reshape(C_out, -1)`` (torch's ``(C_in, kh, kw)`` order; ``W`` itself for a Linear) is split into
``n_blocks`` contiguous sub-vectors of size ``d``; sub-vector ``(o, b)`` becomes a centroid of a
codebook ``[K, d]``. Only the layout of the codes differs:

- **BGD** ("And the Bit Goes Down", facebookresearch/kill-the-bits): a dict keyed by layer name. A
  quantized layer is ``{"centroids": fp16 [K, d], "assignments": uint8 (int16 when K > 256)
  [n_blocks * C_out], "n_blocks", "is_conv", "k"}``; ``assignments[b * C_out + o]`` is the code of
  sub-vector ``(o, b)`` (upstream quantizes ``W.reshape(C_out, -1).T`` cut into ``n_blocks`` row
  blocks laid side by side), so ``codes = assignments.view(n_blocks, C_out).T``. ``"conv1"`` ->
  ``{"weight"}`` fp16, every BatchNorm -> ``{"weight", "bias"}`` fp16, ``"fc_bias"`` -> ``{"bias"}``
  fp32.
- **PQF** ("Permute, Quantize, and Fine-tune", uber-research/permute-quantize-finetune): a flat
  state dict, ``"<layer>.codes_matrix"`` uint8 (int16 when K > 256) ``[C_out, n_blocks]`` (bgd_det's
  layout already), ``"<layer>.codebook"`` fp16 ``[K, d]``, every other parameter fp32. PQF applies
  its permutations to the weights of parent and child layers together *before* quantizing (upstream
  ``permutation/model_permutation.py``): the stored network is the permuted, function-equivalent
  one, no permutation is stored and none is needed to decode (checked bit-exactly against the dense
  ResNet-18 that upstream decoded, ``teachers/resnet18_pqf_small_dense.pth``).

Both fold BatchNorm running statistics into weight/bias; as in the upstream loaders, the imported
model gets ``running_mean = 0`` and ``running_var = 1`` (BatchNorm's ``eps`` stays, as upstream).

The imported model holds bgd_det codebook layers (``PQConv2d``/``PQLinear``), so
:func:`~bgd_det.quantization.size.model_size` and :func:`~bgd_det.checkpoint.compressed_state` apply
unchanged. The architecture (a torchvision ResNet) is inferred from the layer names, ``K`` and ``d``
from each codebook.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Dict, Iterable, NamedTuple, Tuple

import torch
from torch import Tensor, nn

from ..quantization.swap import pq_layers
from ..utils.file_io import one_line
from ..utils.modes import eval_mode

logger = logging.getLogger(__name__)

__all__ = ["PEER_FORMATS", "PeerCheckpoint", "parse_peer", "infer_resnet_arch", "bgd_codes", "check_peer_layer",
           "verify_model", "dense_state_dict"]

#: formats :func:`import_peer` reads.
PEER_FORMATS = ("bgd", "pqf")

#: (block type, blocks per stage) -> torchvision ResNet.
_RESNETS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}
_BLOCK_CONV = re.compile(r"^layer([1-4])\.(\d+)\.conv(\d)$")

# (codes Tensor[C_out, n_blocks], codebook Tensor[K, d] float32) per quantized layer.
_Quantized = Dict[str, Tuple[Tensor, Tensor]]


class PeerCheckpoint(NamedTuple):
    """A peer's file read into bgd_det's terms: the torchvision architecture, its classes, every quantized layer's
    (codes, codebook) and every other tensor under its torchvision name."""

    arch: str
    num_classes: int
    quantized: _Quantized
    dense: Dict[str, Tensor]


def parse_peer(obj: Dict[str, Any], fmt: str, source: str) -> PeerCheckpoint:
    """Read a loaded BGD (``fmt`` "bgd") or PQF ("pqf") dict; the architecture is inferred from the layer names.
    Building and checking the model is the loader's job (:func:`bgd_det.checkpoint.import_peer`)."""
    try:
        quantized, dense = (_parse_bgd if fmt == "bgd" else _parse_pqf)(obj, source)
    except (KeyError, AttributeError, TypeError) as e:  # an entry lacks a field or is not a tensor
        raise ValueError(f"{source}: malformed {fmt.upper()} entry ({one_line(e)})") from None
    if not quantized:
        raise ValueError(f"{source}: no quantized layer found")
    arch = infer_resnet_arch(list(quantized) + [k.rpartition(".")[0] for k in dense])
    if "fc.bias" in dense:
        num_classes = int(dense["fc.bias"].numel())
    elif "fc" in quantized:
        num_classes = int(quantized["fc"][0].shape[0])
    else:
        raise ValueError(f"{source}: no classifier ('fc') found")
    return PeerCheckpoint(arch, num_classes, quantized, dense)


def infer_resnet_arch(names: Iterable[str]) -> str:
    """The torchvision ResNet whose blocks match the module ``names`` (``layer<s>.<i>.conv<n>``)."""
    blocks = [0, 0, 0, 0]
    bottleneck = False
    for name in names:
        m = _BLOCK_CONV.match(name)
        if m:
            stage, index, conv = int(m.group(1)), int(m.group(2)), int(m.group(3))
            blocks[stage - 1] = max(blocks[stage - 1], index + 1)
            bottleneck |= conv == 3
    key = ("bottleneck" if bottleneck else "basic", tuple(blocks))
    if key not in _RESNETS:
        known = {v: f"{k[0]} {list(k[1])}" for k, v in _RESNETS.items()}
        raise ValueError(
            f"cannot infer the architecture: {key[0]} blocks per stage {list(key[1])} match no "
            f"torchvision ResNet (known: {known})"
        )
    return _RESNETS[key]


def bgd_codes(assignments: Tensor, n_blocks: int, *, source: str = "layer") -> Tensor:
    """BGD's flat assignments to bgd_det's codes.

    Args:
        assignments (Tensor[n_blocks * C_out] uint8/int16): code of sub-vector ``(o, b)`` at index
            ``b * C_out + o``.
        n_blocks: sub-vectors per output row.

    Returns:
        Tensor[C_out, n_blocks]: ``codes[o, b]``.
    """
    flat = assignments.reshape(-1)
    if n_blocks <= 0 or flat.numel() == 0 or flat.numel() % n_blocks:
        raise ValueError(
            f"{source}: {flat.numel()} assignments are not a multiple of n_blocks={n_blocks} "
            f"(truncated file?)"
        )
    return flat.reshape(n_blocks, -1).t().contiguous()


def _parse_bgd(obj: Dict[str, Any], source: str) -> Tuple[_Quantized, Dict[str, Tensor]]:
    quantized: _Quantized = {}
    dense: Dict[str, Tensor] = {}
    for name, entry in obj.items():
        if not isinstance(entry, dict):
            raise ValueError(
                f"{source}: BGD entry {name!r} is a {type(entry).__name__}, expected a dict"
            )
        if "centroids" in entry or "assignments" in entry:
            missing = [k for k in ("centroids", "assignments", "n_blocks") if k not in entry]
            if missing:
                raise ValueError(f"{source}: quantized layer {name!r} lacks {missing}")
            quantized[name] = (
                bgd_codes(
                    entry["assignments"], int(entry["n_blocks"]), source=f"{source}: {name!r}"
                ),
                entry["centroids"].float(),
            )
        elif name == "fc_bias":
            dense["fc.bias"] = entry["bias"].float()
        else:
            for key, value in entry.items():
                dense[f"{name}.{key}"] = value.float()
    return quantized, dense


def _parse_pqf(obj: Dict[str, Any], source: str) -> Tuple[_Quantized, Dict[str, Tensor]]:
    codes: Dict[str, Tensor] = {}
    books: Dict[str, Tensor] = {}
    dense: Dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise ValueError(
                f"{source}: PQF entry {key!r} is a {type(value).__name__}, expected a tensor"
            )
        if key.endswith(".codes_matrix"):
            codes[key[: -len(".codes_matrix")]] = value
        elif key.endswith(".codebook"):
            books[key[: -len(".codebook")]] = value.float()
        else:
            dense[key] = value.float()
    unpaired = sorted(set(codes) ^ set(books))
    if unpaired:
        raise ValueError(
            f"{source}: layers {unpaired[:5]} have codes without a codebook or vice versa"
        )
    return {n: (codes[n], books[n]) for n in codes}, dense


def check_peer_layer(
    name: str, module: nn.Module, codes: Tensor, codebook: Tensor, source: str
) -> None:
    """One-line ValueError when a peer layer's codes / codebook do not fit ``module`` (shape, dtype, range, NaN)."""
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise ValueError(
            f"{source}: quantized layer {name!r} is a {type(module).__name__} in the model"
        )
    if codebook.dim() != 2 or codes.dim() != 2:
        raise ValueError(
            f"{source}: {name!r}: codebook {tuple(codebook.shape)} / codes {tuple(codes.shape)} "
            f"must be 2-D"
        )
    shape = tuple(module.weight.shape)
    k, d = codebook.shape
    cols = math.prod(shape[1:])
    if cols % d or tuple(codes.shape) != (shape[0], cols // d):
        raise ValueError(
            f"{source}: {name!r}: codes {tuple(codes.shape)} with sub-vectors of {d} do not fit a "
            f"weight of shape {shape} (expected codes [{shape[0]}, {cols / d:g}])"
        )
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(
            f"{source}: {name!r}: codes have dtype {codes.dtype}, expected an integer type"
        )
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= k:
        raise ValueError(
            f"{source}: {name!r}: codes span [{lo}, {hi}], outside the codebook's [0, {k})"
        )
    if not torch.isfinite(codebook).all():
        raise ValueError(f"{source}: {name!r}: the codebook holds NaN/Inf")


def verify_model(model: nn.Module, *, num_classes: int, source: str = "model") -> None:
    """Decode every codebook layer and run one small forward pass; ValueError if anything is off.

    Codebooks are checked finite on import, so the decoded weights (their entries) are finite too.
    """
    with eval_mode(model), torch.no_grad():
        for name, m in pq_layers(model).items():
            shape = tuple(m.decoded_weight().shape)
            if shape != tuple(m.weight_shape):
                raise ValueError(f"{source}: layer {name!r} decodes to {shape}, not {m.weight_shape}")
        device = next(model.parameters()).device
        out = model(torch.zeros(1, 3, 32, 32, device=device))
    if tuple(out.shape) != (1, num_classes) or not torch.isfinite(out).all():
        raise ValueError(
            f"{source}: forward pass gives {tuple(out.shape)} logits (expected (1, {num_classes})) "
            f"or non-finite values"
        )


def dense_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """A plain torchvision-style state dict of ``model``, codebook layers decoded to ``weight``.

    BatchNorm entries are kept as they are (imported peers: folded affine, running_mean 0,
    running_var 1).
    """
    pq = pq_layers(model)
    state: Dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in pq and leaf in ("codes", "codebook"):
            if leaf == "codes":
                state[f"{module}.weight"] = pq[module].decoded_weight().detach().float().clone()
            continue
        state[key] = value.detach().clone()
    return state


