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

import hashlib
import logging
import math
import os
import re
from typing import Any, Dict, Iterable, Tuple

import torch
from torch import Tensor, nn

from .checkpoint import (FORMAT, atomic_save, check_checkpoint_arch, compressed_state, load_compressed,
                         load_compressed_into, one_line, read_checkpoint_file)
from .quantization.pq import code_dtype
from .quantization.size import model_size
from .quantization.swap import pq_layers
from .utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = [
    "PEER_FORMATS",
    "read_checkpoint_file",
    "detect_format",
    "infer_resnet_arch",
    "bgd_codes",
    "import_peer",
    "import_bgd",
    "import_pqf",
    "dense_state_dict",
    "convert_checkpoint",
    "load_checkpoint_model",
    "verify_model",
    "file_sha256",
]

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


def detect_format(obj: Dict[str, Any], *, source: str = "checkpoint") -> str:
    """``"bgd_det"``, ``"bgd"``, ``"pqf"`` or ``"state_dict"`` (plain tensors) for a loaded dict."""
    if obj.get("format") == FORMAT:
        return "bgd_det"
    if any(isinstance(k, str) and k.endswith(".codes_matrix") for k in obj):
        return "pqf"
    if any(isinstance(v, dict) and "centroids" in v and "assignments" in v for v in obj.values()):
        return "bgd"
    if all(isinstance(v, Tensor) for v in obj.values()):
        return "state_dict"
    raise ValueError(
        f"{source}: unknown checkpoint layout (neither bgd_det, BGD, PQF nor a state dict); "
        f"first keys {list(obj)[:5]}"
    )


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


def _check_layer(
    name: str, module: nn.Module, codes: Tensor, codebook: Tensor, source: str
) -> None:
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


def _build_imported(
    quantized: _Quantized, dense: Dict[str, Tensor], *, fmt: str, source: str
) -> Tuple[nn.Module, Dict[str, Any]]:
    from .config import get_cfg
    from .modeling import build_model

    if not quantized:
        raise ValueError(f"{source}: no quantized layer found")
    arch = infer_resnet_arch(list(quantized) + [k.rpartition(".")[0] for k in dense])
    if "fc.bias" in dense:
        num_classes = int(dense["fc.bias"].numel())
    elif "fc" in quantized:
        num_classes = int(quantized["fc"][0].shape[0])
    else:
        raise ValueError(f"{source}: no classifier ('fc') found")
    cfg = get_cfg()
    cfg.MODEL.ARCH, cfg.MODEL.NUM_CLASSES, cfg.MODEL.DEVICE = arch, num_classes, "cpu"
    model = build_model(cfg, load=False)
    modules = dict(model.named_modules())
    layers, state = {}, dict(dense)
    for name, (codes, codebook) in quantized.items():
        if name not in modules:
            raise ValueError(f"{source}: quantized layer {name!r} does not exist in {arch}")
        _check_layer(name, modules[name], codes, codebook, source)
        layers[name] = {"block_size": int(codebook.shape[1]), "n_centroids": int(codebook.shape[0])}
        state[f"{name}.codes"] = codes.to(code_dtype(codebook.shape[0]))
        state[f"{name}.codebook"] = codebook
    for name, module in modules.items():  # running statistics are folded into the affine parameters
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            state.setdefault(f"{name}.running_mean", torch.zeros_like(module.running_mean))
            state.setdefault(f"{name}.running_var", torch.ones_like(module.running_var))
            state.setdefault(
                f"{name}.num_batches_tracked", torch.zeros_like(module.num_batches_tracked)
            )
    load_compressed_into(
        model, {"layers": layers, "model": state}, source=f"{source} ({fmt} import as {arch})"
    )
    verify_model(model, num_classes=num_classes, source=source)
    model.eval()
    ckpt = compressed_state(
        model,
        arch=arch,
        num_classes=num_classes,
        imported_from={
            "format": fmt,
            "file": os.path.basename(source),
            "sha256": file_sha256(source),
        },
    )
    return model, ckpt


def verify_model(model: nn.Module, *, num_classes: int, source: str = "model") -> None:
    """Decode every codebook layer and run one small forward pass; ValueError if anything is off.

    Codebooks are checked finite on import, so the decoded weights (their entries) are finite too.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, m in pq_layers(model).items():
                shape = tuple(m.decoded_weight().shape)
                if shape != tuple(m.weight_shape):
                    raise ValueError(
                        f"{source}: layer {name!r} decodes to {shape}, not {m.weight_shape}"
                    )
            device = next(model.parameters()).device
            out = model(torch.zeros(1, 3, 32, 32, device=device))
    finally:
        model.train(was_training)
    if tuple(out.shape) != (1, num_classes) or not torch.isfinite(out).all():
        raise ValueError(
            f"{source}: forward pass gives {tuple(out.shape)} logits (expected (1, {num_classes})) "
            f"or non-finite values"
        )


def import_peer(path: str, fmt: str = "auto") -> Tuple[nn.Module, Dict[str, Any]]:
    """Import a BGD or PQF compressed checkpoint.

    Args:
        path: the peer's ``.pth`` file.
        fmt: ``"bgd"``, ``"pqf"`` or ``"auto"`` (detected from the keys).

    Returns:
        ``(model, ckpt)``: the model in eval mode on CPU, holding codebook layers, and its bgd_det
        compressed checkpoint dict (what :func:`bgd_det.checkpoint.save_compressed` writes;
        ``ckpt["extra"]["imported_from"]`` names the source file and its sha256).
    """
    if fmt not in PEER_FORMATS + ("auto",):
        raise ValueError(f"unknown peer format {fmt!r}; allowed: {list(PEER_FORMATS) + ['auto']}")
    obj = read_checkpoint_file(path)
    found = detect_format(obj, source=path)
    if found not in PEER_FORMATS:
        raise ValueError(f"{path} is a {found} checkpoint, not a BGD or PQF one")
    if fmt != "auto" and found != fmt:
        raise ValueError(
            f"{path} looks like a {found.upper()} checkpoint, not {fmt.upper()} "
            f"(use --from {found})"
        )
    try:
        quantized, dense = (_parse_bgd if found == "bgd" else _parse_pqf)(obj, path)
    except (KeyError, AttributeError, TypeError) as e:  # an entry lacks a field or is not a tensor
        raise ValueError(f"{path}: malformed {found.upper()} entry ({one_line(e)})") from None
    model, ckpt = _build_imported(quantized, dense, fmt=found, source=path)
    size = model_size(model)
    logger.info(
        "imported %s %s as %s: %d codebook layers, %.2f MiB (%.1fx)",
        found.upper(),
        path,
        ckpt["arch"],
        len(ckpt["layers"]),
        size.compressed_mib,
        size.ratio,
    )
    return model, ckpt


def import_bgd(path: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Import an "And the Bit Goes Down" checkpoint; see :func:`import_peer`."""
    return import_peer(path, "bgd")


def import_pqf(path: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Import a "Permute, Quantize, and Fine-tune" checkpoint; see :func:`import_peer`."""
    return import_peer(path, "pqf")


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


def convert_checkpoint(src: str, fmt: str, out: str, *, dense: bool = False) -> nn.Module:
    """Import ``src`` (``fmt``: "bgd", "pqf" or "auto") and write it to ``out``.

    Args:
        dense: write a plain dense state dict (decoded weights; usable as ``MODEL.WEIGHTS``)
            instead of a bgd_det compressed checkpoint.

    Returns:
        The imported model (codebook layers).
    """
    if os.path.exists(out) and os.path.samefile(src, out):
        raise ValueError(f"OUT {out} is the input file; pass another path (the input is never overwritten)")
    model, ckpt = import_peer(src, fmt)
    if dense:
        atomic_save(dense_state_dict(model), out)
        logger.info("wrote dense %s state dict %s", ckpt["arch"], out)
    else:
        atomic_save(ckpt, out)
        logger.info("wrote bgd_det compressed checkpoint %s", out)
    return model


def load_checkpoint_model(path: str, *, cfg=None, device: str = "cpu") -> Tuple[nn.Module, str]:
    """Any classification checkpoint as a ready model (eval mode), with its detected format.

    Args:
        path: a bgd_det compressed checkpoint, a BGD or PQF file, or a plain state dict (then
            ``cfg.MODEL.ARCH`` and ``cfg.MODEL.NUM_CLASSES`` give the architecture).

    Returns:
        ``(model, fmt)`` with fmt in ``"bgd_det"``, ``"bgd"``, ``"pqf"``, ``"state_dict"``.
    """
    obj = read_checkpoint_file(path)
    fmt = detect_format(obj, source=path)
    if fmt == "bgd_det":
        model = load_compressed(path, cfg=cfg)
    elif fmt in PEER_FORMATS:
        model, ckpt = import_peer(path, fmt)
        check_checkpoint_arch(ckpt["arch"], cfg, source=path)
    else:
        from .config import get_cfg
        from .modeling import build_model, load_weights

        cfg = (cfg if cfg is not None else get_cfg()).clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"
        model = load_weights(build_model(cfg, load=False), cfg.MODEL.ARCH, path)
    return model.to(device).eval(), fmt


def file_sha256(path: str) -> str:
    """Hex sha256 of a file (to name exactly which peer file a result came from)."""
    h = hashlib.sha256()
    with PathManager.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
