"""Compressed checkpoints: the model's ``state_dict()`` (codes + fp16 codebooks + fp32 rest) plus metadata.

File layout (a plain dict, loadable with ``torch.load(weights_only=True)``)::

    {"format": "bgd_det.compressed", "version": 1, "arch": str, "num_classes": int,
     "layers": {name: {"block_size": int, "n_centroids": int}},   # quantized layers
     "model": state_dict,   # codes uint8/int16 buffers, codebooks fp16, everything else as in the model
     "extra": {...}}        # free-form: config yaml, metrics, progress

BatchNorm running statistics are ordinary buffers of ``state_dict()`` and are kept.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .quantization.layers import PQ_LAYER_TYPES
from .quantization.plan import LayerPlan
from .quantization.swap import swap_in_skeleton
from .utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "VERSION", "compressed_state", "save_compressed", "read_checkpoint_file", "read_compressed",
           "load_compressed_into", "load_compressed", "checkpoint_cfg", "check_finite", "atomic_save", "round_codebooks_to_fp16"]

FORMAT = "bgd_det.compressed"
VERSION = 1


def round_codebooks_to_fp16(model: nn.Module) -> None:
    """Round every codebook to fp16-representable values in place, so saving as fp16 is lossless."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PQ_LAYER_TYPES):
                m.codebook.copy_(m.codebook.half().float())


def compressed_state(model: nn.Module, *, arch: str, num_classes: int, codebook_dtype: torch.dtype = torch.float16,
                     **extra: Any) -> Dict[str, Any]:
    """The checkpoint dict of ``model`` (codebooks stored as ``codebook_dtype``: fp16 for deployment, fp32 for
    exact training progress)."""
    layers = {n: {"block_size": m.block_size, "n_centroids": m.n_centroids}
              for n, m in model.named_modules() if isinstance(m, PQ_LAYER_TYPES)}
    state = {}
    for key, value in model.state_dict().items():
        state[key] = value.to(codebook_dtype) if key.endswith("codebook") else value
    return {"format": FORMAT, "version": VERSION, "arch": arch, "num_classes": int(num_classes),
            "layers": layers, "model": state, "extra": extra}


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written ``path``."""
    local = PathManager.get_local_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = local + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, local)


def save_compressed(path: str, model: nn.Module, *, arch: str, num_classes: int, **extra: Any) -> None:
    """Write ``model`` as a compressed checkpoint (atomically)."""
    atomic_save(compressed_state(model, arch=arch, num_classes=num_classes, **extra), path)
    logger.info("saved compressed checkpoint %s", path)


def one_line(e: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` of an exception on one line, cut at ``limit`` characters."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def read_checkpoint_file(path: str, *, what: str = "checkpoint") -> Dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only``, CPU); a missing or corrupt file: a one-line error.

    Args:
        what: how the file is named in the "not found" error (e.g. "compressed checkpoint").
    """
    local = PathManager.get_local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a pickle, disallowed global ...
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {one_line(e)}"
        ) from None
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def read_compressed(path: str) -> Dict[str, Any]:
    """Read and validate a compressed checkpoint dict (no model built)."""
    ckpt = read_checkpoint_file(path, what="compressed checkpoint")
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a bgd_det compressed checkpoint (format={ckpt.get('format')!r}, "
                         f"expected {FORMAT!r}); an original BGD / PQF file: tools/convert_checkpoint.py")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"{path} has format version {ckpt.get('version')}; this bgd_det reads version {VERSION}")
    return ckpt


def check_finite(model: nn.Module, where: str) -> None:
    """Raise a one-line error naming the first parameter or buffer of ``model`` that holds NaN / Inf, or the first
    BatchNorm running variance below 0 (a model that would predict garbage)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"{where}: {name} holds non-finite values (NaN / Inf); lower the learning rate "
                                     f"or check the inputs; the run stops before saving them")
        if name.endswith("running_var") and t.numel() and bool((t < 0).any()):
            raise FloatingPointError(f"{where}: {name} holds negative variances")


def load_compressed_into(model: nn.Module, ckpt: Dict[str, Any], *, source: str = "checkpoint") -> nn.Module:
    """Swap codebook layers into the dense ``model`` per ``ckpt["layers"]`` and load its state."""
    modules = dict(model.named_modules())
    unknown = [n for n in ckpt["layers"] if n not in modules]
    if unknown:
        raise ValueError(f"{source}: quantized layers {unknown[:5]} do not exist in the model "
                         f"(architecture mismatch?)")
    plan = [LayerPlan(n, int(v["block_size"]), int(v["n_centroids"]), 0) for n, v in ckpt["layers"].items()]
    swap_in_skeleton(model, plan)
    state = {k: (v.float() if k.endswith("codebook") else v) for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"{source} does not match the model: {' '.join(first[:3])[:400]}") from None
    check_finite(model, source)
    for m in model.modules():
        if isinstance(m, PQ_LAYER_TYPES) and m.codes.numel():
            top = int(m.codes.long().max())
            if top >= m.n_centroids or int(m.codes.long().min()) < 0:
                raise ValueError(f"{source}: codes out of range [0, {m.n_centroids}) in a layer")
    return model


def check_checkpoint_arch(arch: str, cfg, *, source: str = "checkpoint") -> None:
    """Refuse a config that names another architecture than the checkpoint holds (the default MODEL.ARCH is taken
    as unset: the checkpoint's architecture is then used, with one log line)."""
    from .config.defaults import get_cfg

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
    from .config.defaults import CfgNode, get_cfg

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


def load_compressed(path: str, *, cfg=None, device: str = "cpu", inference: bool = False,
                    fold_bn: bool = False) -> nn.Module:
    """Build the architecture named in the checkpoint and load the compressed model (eval mode).

    Args:
        path: compressed checkpoint. cfg: optional config overriding the one the checkpoint records (see
            :func:`checkpoint_cfg`); ARCH/NUM_CLASSES are always taken from the checkpoint.
        inference: return the inference model instead of the training-layer one: codebook layers that
            run through the compiled ops and never hold a dense weight (:mod:`bgd_det.ops.inference`).
        fold_bn: with ``inference``, fold BatchNorms that follow codebook convs into them.
    """
    from .modeling import build_model

    if inference:
        from .ops.inference import load_inference

        return load_inference(path, cfg=cfg, fold_bn=fold_bn).to(device)
    if fold_bn:
        raise ValueError("fold_bn=True needs inference=True (the training layers keep their BatchNorms)")

    ckpt = read_compressed(path)
    cfg = checkpoint_cfg(ckpt, cfg, source=path)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg, load=False)
    load_compressed_into(model, ckpt, source=path)
    return model.to(device).eval()
