"""The compressed checkpoint file: the model's ``state_dict()`` (codes + fp16 codebooks + fp32 rest) plus metadata.

File layout (a plain dict, loadable with ``torch.load(weights_only=True)``)::

    {"format": "bgd_det.compressed", "version": 1, "arch": str, "num_classes": int,
     "layers": {name: {"block_size": int, "n_centroids": int}},   # quantized layers
     "model": state_dict,   # codes uint8/int16 buffers, codebooks fp16, everything else as in the model
     "extra": {...}}        # free-form: config yaml, metrics, progress

BatchNorm running statistics are ordinary buffers of ``state_dict()`` and are kept. Writing, reading and validating
the file, and telling it from the other formats the loader accepts, happen here; building models does not.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Dict

import torch
from torch import Tensor, nn

from ..quantization.layers import PQ_LAYER_TYPES
from ..utils.file_io import PathManager, atomic_save, read_checkpoint_file

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "VERSION", "FORMATS", "compressed_state", "save_compressed", "read_compressed",
           "detect_format", "check_finite", "round_codebooks_to_fp16", "file_sha256"]

FORMAT = "bgd_det.compressed"
VERSION = 1
#: what :func:`detect_format` may answer.
FORMATS = ("bgd_det", "bgd", "pqf", "state_dict")


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


def save_compressed(path: str, model: nn.Module, *, arch: str, num_classes: int, **extra: Any) -> None:
    """Write ``model`` as a compressed checkpoint (atomically)."""
    atomic_save(compressed_state(model, arch=arch, num_classes=num_classes, **extra), path)
    logger.info("saved compressed checkpoint %s", path)


def check_compressed(ckpt: Dict[str, Any], source: str) -> Dict[str, Any]:
    """``ckpt`` if it is a compressed checkpoint dict of this version, else a one-line ValueError."""
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{source} is not a bgd_det compressed checkpoint (format={ckpt.get('format')!r}, "
                         f"expected {FORMAT!r}); an original BGD / PQF file: tools/convert_checkpoint.py")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"{source} has format version {ckpt.get('version')}; this bgd_det reads version {VERSION}")
    return ckpt


def read_compressed(path: str) -> Dict[str, Any]:
    """Read and validate a compressed checkpoint dict (no model built)."""
    return check_compressed(read_checkpoint_file(path, what="compressed checkpoint"), path)


def detect_format(obj: Dict[str, Any], *, source: str = "checkpoint") -> str:
    """One of :data:`FORMATS` for a loaded dict: bgd_det's own, BGD's, PQF's or a plain state dict (all tensors)."""
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


def check_finite(model: nn.Module, where: str) -> None:
    """Raise a one-line error naming the first parameter or buffer of ``model`` that holds NaN / Inf, or the first
    BatchNorm running variance below 0 (a model that would predict garbage)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"{where}: {name} holds non-finite values (NaN / Inf); lower the learning rate "
                                     f"or check the inputs; the run stops before saving them")
        if name.endswith("running_var") and t.numel() and bool((t < 0).any()):
            raise FloatingPointError(f"{where}: {name} holds negative variances")


def file_sha256(path: str) -> str:
    """Hex sha256 of a file (to name exactly which peer file a result came from)."""
    h = hashlib.sha256()
    with PathManager.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
