"""The one loader: a checkpoint file (bgd_det's own, a peer's, or a plain state dict) to a ready model, training
layers or inference layers.

Every path ends in :func:`load_compressed_into` (codebook layers swapped into the built architecture, the state
loaded, codes and values checked): bgd_det checkpoints directly, BGD / PQF files after :func:`import_peer` turned
them into the native dict (as detectron2's ``DetectionCheckpointer._load_file`` absorbs foreign formats).
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from itertools import chain
from typing import Any, Dict, Tuple

import torch
from torch import nn

from ..config import get_cfg
from ..config.defaults import CfgNode
from ..modeling import build_model, load_weights
from ..inference import to_inference
from ..quantization.layers import PQ_LAYER_TYPES
from ..quantization.plan import LayerPlan
from ..quantization.pq import check_codes, code_dtype
from ..quantization.size import model_size
from ..quantization.swap import swap_in_skeleton
from ..utils.file_io import atomic_save, one_line, read_checkpoint_file
from .format import (check_compressed, check_finite, compressed_state, detect_format, file_sha256,
                     read_compressed)
from .peers import PEER_FORMATS, check_peer_layer, dense_state_dict, parse_peer, verify_model

logger = logging.getLogger(__name__)

__all__ = ["load_compressed", "compressed_model", "load_compressed_into", "checkpoint_cfg", "check_checkpoint_arch",
           "import_peer", "import_bgd", "import_pqf", "convert_checkpoint", "load_checkpoint_model"]


def load_compressed_into(model: nn.Module, ckpt: Dict[str, Any], *, source: str = "checkpoint",
                         assign: bool = False) -> nn.Module:
    """Swap codebook layers into the dense ``model`` per ``ckpt["layers"]`` and load its state.

    Args:
        assign: take the checkpoint's tensors as the model's (``load_state_dict(assign=True)``: a model built on
            the meta device never allocates its dense weights); else copy them in.
    """
    modules = dict(model.named_modules())
    unknown = [n for n in ckpt["layers"] if n not in modules]
    if unknown:
        raise ValueError(f"{source}: quantized layers {unknown[:5]} do not exist in the model "
                         f"(architecture mismatch?)")
    plan = [LayerPlan(n, int(v["block_size"]), int(v["n_centroids"]), 0) for n, v in ckpt["layers"].items()]
    with torch.device("meta") if assign else nullcontext():
        swap_in_skeleton(model, plan)
    state = {k: (v.float() if k.endswith("codebook") else v) for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"{source} does not match the model: {' '.join(first[:3])[:400]}") from None
    if any(t.is_meta for t in chain(model.parameters(), model.buffers())):
        return model  # the caller builds the ordinary way (non-persistent buffers are not in checkpoints)
    check_finite(model, source)
    for name, m in model.named_modules():
        if isinstance(m, PQ_LAYER_TYPES):
            check_codes(m.codes, m.n_centroids, f"{source}: {name}")
    return model


def check_checkpoint_arch(arch: str, cfg, *, source: str = "checkpoint") -> None:
    """Refuse a config that names another architecture than the checkpoint holds (the default MODEL.ARCH is taken
    as unset: the checkpoint's architecture is then used, with one log line)."""
    if cfg is None or cfg.MODEL.ARCH == arch:
        return
    if cfg.MODEL.ARCH != get_cfg().MODEL.ARCH:
        raise ValueError(f"{source} holds a {arch} but MODEL.ARCH is {cfg.MODEL.ARCH}; drop MODEL.ARCH (the "
                         f"checkpoint names its architecture) or pass the {cfg.MODEL.ARCH} checkpoint")
    logger.info("%s holds a %s: built as that (MODEL.ARCH %s ignored)", source, arch, cfg.MODEL.ARCH)


def checkpoint_cfg(ckpt: Dict[str, Any], cfg=None, *, source: str = "checkpoint"):
    """The config that rebuilds ``ckpt``'s model: ``cfg`` when given (an override), else the config the checkpoint
    records (input size, proposals, FrozenBatchNorm eps ...), else the defaults (one log line); MODEL.ARCH and
    MODEL.NUM_CLASSES always come from the checkpoint. Returned unfrozen."""
    if cfg is not None:
        check_checkpoint_arch(ckpt["arch"], cfg, source=source)
        out = cfg.clone()
    else:
        out, text = get_cfg(), (ckpt.get("extra") or {}).get("config")
        if text:
            try:
                out.merge_from_other_cfg(CfgNode.load_cfg(text))
            except Exception as e:  # keys of another version, unreadable yaml
                logger.warning("%s: its recorded config does not load here (%s); rebuilding with the defaults",
                               source, one_line(e))
                out = get_cfg()
        else:
            logger.info("%s records no config: rebuilding with the defaults", source)
    out.defrost()
    out.MODEL.ARCH = ckpt["arch"]
    out.MODEL.NUM_CLASSES = ckpt["num_classes"]
    return out


def _build_compressed(ckpt: Dict[str, Any], cfg, source: str) -> nn.Module:
    """The training-layer model of a native checkpoint dict, on the CPU."""
    cfg.MODEL.DEVICE = "cpu"
    return load_compressed_into(build_model(cfg), ckpt, source=source)


def _build_inference(ckpt: Dict[str, Any], cfg, source: str, fold_bn: bool) -> nn.Module:
    """The inference model of a native checkpoint dict, built on the ``meta`` device so that no dense weight is
    ever allocated; an architecture that cannot be built there (RegNet computes its widths with tensors) or whose
    non-persistent buffers stay on meta is built on the CPU instead, its dense weights dropped as the codebook
    layers replace them (one log line)."""
    cfg.MODEL.DEVICE = "meta"
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except (NotImplementedError, RuntimeError) as e:
        logger.info("%s: %s cannot be built on the meta device (%s); building it on the CPU, its dense weights "
                    "dropped as the codebook layers replace them", source, cfg.MODEL.ARCH, one_line(e))
        return to_inference(_build_compressed(ckpt, cfg, source), fold_bn=fold_bn)
    load_compressed_into(model, ckpt, source=source, assign=True)
    on_meta = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if on_meta:
        logger.info("%s: %s not in the checkpoint; building the dense model first", source, on_meta[:3])
        model = _build_compressed(ckpt, cfg, source)
    return to_inference(model, fold_bn=fold_bn)


def load_compressed(path: str, *, cfg=None, device: str = "cpu", inference: bool = False,
                    fold_bn: bool = False) -> nn.Module:
    """Build the architecture named in the checkpoint and load the compressed model (eval mode).

    Args:
        path: compressed checkpoint. cfg: optional config overriding the one the checkpoint records (see
            :func:`checkpoint_cfg`); ARCH/NUM_CLASSES are always taken from the checkpoint.
        inference: return the inference model instead of the training-layer one: codebook layers that
            run through the compiled ops and never hold a dense weight (:mod:`bgd_det.inference`).
        fold_bn: with ``inference``, fold BatchNorms that follow codebook convs into them.
    """
    return compressed_model(read_compressed(path), cfg, source=path, device=device, inference=inference,
                            fold_bn=fold_bn)


def compressed_model(ckpt: Dict[str, Any], cfg=None, *, source: str = "checkpoint", device: str = "cpu",
                     inference: bool = False, fold_bn: bool = False) -> nn.Module:
    """:func:`load_compressed` of a checkpoint dict already read (:func:`~bgd_det.checkpoint.read_compressed`)."""
    if fold_bn and not inference:
        raise ValueError("fold_bn=True needs inference=True (the training layers keep their BatchNorms)")
    cfg = checkpoint_cfg(ckpt, cfg, source=source)
    if inference:
        model = _build_inference(ckpt, cfg, source, fold_bn)
    else:
        model = _build_compressed(ckpt, cfg, source)
    return model.to(device).eval()


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
        raise ValueError(f"{path} looks like a {found.upper()} checkpoint, not {fmt.upper()} (use --from {found})")
    peer = parse_peer(obj, found, path)
    cfg = get_cfg()
    cfg.MODEL.ARCH, cfg.MODEL.NUM_CLASSES, cfg.MODEL.DEVICE = peer.arch, peer.num_classes, "cpu"
    model = build_model(cfg)
    modules = dict(model.named_modules())
    layers, state = {}, dict(peer.dense)
    for name, (codes, codebook) in peer.quantized.items():
        if name not in modules:
            raise ValueError(f"{path}: quantized layer {name!r} does not exist in {peer.arch}")
        check_peer_layer(name, modules[name], codes, codebook, path)
        layers[name] = {"block_size": int(codebook.shape[1]), "n_centroids": int(codebook.shape[0])}
        state[f"{name}.codes"] = codes.to(code_dtype(codebook.shape[0]))
        state[f"{name}.codebook"] = codebook
    for name, module in modules.items():  # the peers fold running statistics into the affine parameters
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            state.setdefault(f"{name}.running_mean", torch.zeros_like(module.running_mean))
            state.setdefault(f"{name}.running_var", torch.ones_like(module.running_var))
            state.setdefault(f"{name}.num_batches_tracked", torch.zeros_like(module.num_batches_tracked))
    load_compressed_into(model, {"layers": layers, "model": state}, source=f"{path} ({found} import as {peer.arch})")
    verify_model(model, num_classes=peer.num_classes, source=path)
    model.eval()
    ckpt = compressed_state(model, arch=peer.arch, num_classes=peer.num_classes, imported_from={
        "format": found, "file": os.path.basename(path), "sha256": file_sha256(path)})
    size = model_size(model)
    logger.info("imported %s %s as %s: %d codebook layers, %.2f MiB (%.1fx)", found.upper(), path, peer.arch,
                len(layers), size.compressed_mib, size.ratio)
    return model, check_compressed(ckpt, path)


def import_bgd(path: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Import an "And the Bit Goes Down" checkpoint; see :func:`import_peer`."""
    return import_peer(path, "bgd")


def import_pqf(path: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Import a "Permute, Quantize, and Fine-tune" checkpoint; see :func:`import_peer`."""
    return import_peer(path, "pqf")


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
        model = compressed_model(check_compressed(obj, path), cfg, source=path)
    elif fmt in PEER_FORMATS:
        model, ckpt = import_peer(path, fmt)
        check_checkpoint_arch(ckpt["arch"], cfg, source=path)
    else:
        cfg = (cfg if cfg is not None else get_cfg()).clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"
        model = load_weights(build_model(cfg), cfg.MODEL.ARCH, path)
    return model.to(device).eval(), fmt
