"""Product quantization of a weight matrix with an activation-aware (Gram) metric.

A layer's weight is viewed as ``W[C_out, C_in_per_group * kh * kw]`` and cut into contiguous sub-vectors of
size ``d``: sub-vector ``(o, b)`` is ``W[o, b*d:(b+1)*d]``. Every sub-vector is replaced by the index of its
closest centroid (``codes[o, b]``) in a codebook ``C[K, d]``. "Closest" uses the output error on in-domain
inputs: ``||X (w - c)||^2 = (w - c)^T G (w - c)`` with ``G = X^T X``, so only ``G`` (``d x d``) is needed.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["pq_decode", "code_dtype", "split_subvectors", "PQResult", "em_quantize", "assign"]


def code_dtype(n_centroids: int) -> torch.dtype:
    """Smallest integer dtype that holds codes for ``n_centroids`` centroids (uint8 up to 256, else int16)."""
    if n_centroids <= 256:
        return torch.uint8
    if n_centroids <= 32768:
        return torch.int16
    raise ValueError(f"n_centroids={n_centroids} is too large; allowed: 1..32768")


def pq_decode(codes: Tensor, codebook: Tensor, shape: torch.Size | tuple) -> Tensor:
    """Reference decode: the dense weight that ``codes`` and ``codebook`` stand for.

    This is the one definition of the layout; the compiled op is tested against it.

    Args:
        codes (Tensor[C_out, n_blocks] uint8/int16): centroid index of every sub-vector.
        codebook (Tensor[K, d]): centroids (any float dtype; autograd flows into it).
        shape: shape of the dense weight, e.g. ``(C_out, C_in // groups, kh, kw)``; its trailing numel per
            output row may be smaller than ``n_blocks * d`` (partial last block is truncated).

    Returns:
        Tensor[shape]: the decoded weight, dtype of ``codebook``.
    """
    c_out, n_blocks = codes.shape
    d = codebook.shape[1]
    cols = math.prod(shape[1:])
    flat = codebook[codes.long()].reshape(c_out, n_blocks * d)
    if cols != n_blocks * d:
        flat = flat[:, :cols]
    return flat.reshape(shape)


def split_subvectors(weight: Tensor, block_size: int) -> Tensor:
    """Cut a weight into its sub-vectors.

    Args:
        weight (Tensor[C_out, ...]): dense weight; trailing dims are flattened.
        block_size: sub-vector size ``d``; must divide the flattened row length.

    Returns:
        Tensor[C_out * n_blocks, d]: row ``o * n_blocks + b`` is sub-vector ``(o, b)``.
    """
    flat = weight.reshape(weight.shape[0], -1)
    cols = flat.shape[1]
    if cols % block_size != 0:
        raise ValueError(
            f"block_size={block_size} does not divide the layer's row length {cols} "
            f"(C_in/groups*kh*kw); allowed block sizes for this layer: {_divisors(cols)}"
        )
    return flat.reshape(-1, block_size)


def _divisors(n: int, limit: int = 64) -> list[int]:
    return [k for k in range(1, min(n, limit) + 1) if n % k == 0]


@dataclass
class PQResult:
    """Outcome of :func:`em_quantize`.

    Attributes:
        codes (Tensor[C_out, n_blocks]): uint8 (K <= 256) or int16 codes.
        codebook (Tensor[K, d] float32): learned centroids.
        objective (float): final ``sum_i (w_i - c_i)^T G (w_i - c_i)`` (output-space error, up to scale).
    """

    codes: Tensor
    codebook: Tensor
    objective: float


def _metric_factor(gram: Tensor, eps: float) -> Tensor:
    """Upper Cholesky factor ``U`` with ``G + eps*I = U^T U``, so ``(w-c)^T G (w-c) = ||U (w-c)||^2``."""
    d = gram.shape[0]
    g = gram.double()
    scale = g.diagonal().mean().clamp_min(1e-12)
    jitter = eps * scale * torch.eye(d, dtype=g.dtype, device=g.device)
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(g + jitter)
        if int(info) == 0:
            return factor.T.to(gram.dtype)
        jitter = jitter * 10
    raise ValueError("the Gram matrix is not positive semi-definite (NaN/Inf in the captured activations?)")


def assign(points: Tensor, centroids: Tensor, *, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Euclidean nearest-centroid assignment in chunks (``||p||^2 - 2 p.c + ||c||^2``).

    Args:
        points (Tensor[N, d]), centroids (Tensor[K, d]).

    Returns:
        (Tensor[N] int64 indices, Tensor[N] squared distances).
    """
    c_sq = (centroids * centroids).sum(1)
    idx = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    dist = torch.empty(points.shape[0], dtype=points.dtype, device=points.device)
    for start in range(0, points.shape[0], chunk):
        p = points[start : start + chunk]
        # argmin ||p - c||^2 = argmin (||c||^2 - 2 p.c); addmm does it in one BLAS call.
        scores = torch.addmm(c_sq.unsqueeze(0), p, centroids.T, beta=1.0, alpha=-2.0)
        best, arg = scores.min(1)
        idx[start : start + chunk] = arg
        dist[start : start + chunk] = (best + (p * p).sum(1)).clamp_min(0)
    return idx, dist


def _init_centroids(points: Tensor, k: int, generator: torch.Generator) -> Tensor:
    perm = torch.randperm(points.shape[0], generator=generator, device="cpu")[:k].to(points.device)
    return points[perm].clone()


def _split_empty(centroids: Tensor, counts: Tensor, generator: torch.Generator, scale: float) -> int:
    """Resolve empty clusters in place: each takes a perturbed copy of the most populated centroid."""
    empty = (counts == 0).nonzero().flatten().tolist()
    for e in empty:
        big = int(counts.argmax())
        noise = torch.randn(centroids.shape[1], generator=generator).to(centroids) * scale
        centroids[e] = centroids[big] + noise
        centroids[big] = centroids[big] - noise
        half = counts[big] // 2
        counts[e], counts[big] = half, counts[big] - half
    return len(empty)


def em_quantize(
    weight: Tensor,
    gram: Optional[Tensor],
    *,
    block_size: int,
    n_centroids: int,
    n_iter: int = 100,
    seed: int = 0,
    eps: float = 1e-8,
) -> PQResult:
    """Learn codes and a codebook for ``weight`` with the activation-aware EM.

    The E-step assigns every sub-vector to ``argmin_c (w - c)^T G (w - c)``, computed as a Euclidean
    assignment in the Cholesky-transformed space ``U w`` (``G = U^T U``); the M-step sets each centroid to the
    mean of its sub-vectors (the minimiser for a shared ``G``); empty clusters split the most populated one.

    Args:
        weight (Tensor[C_out, ...]): dense weight.
        gram (Tensor[d, d] or None): ``X^T X`` over input sub-vectors; None means identity (plain k-means).
        block_size: sub-vector size ``d``.
        n_centroids: codebook size ``K`` (must be <= number of sub-vectors).
        n_iter: EM iterations.
        seed: seeds centroid initialisation and empty-cluster splits.

    Returns:
        PQResult with codes Tensor[C_out, n_blocks] and codebook Tensor[K, d] float32.
    """
    points = split_subvectors(weight.detach().float(), block_size)
    n = points.shape[0]
    if n_centroids > n:
        raise ValueError(f"n_centroids={n_centroids} exceeds the layer's {n} sub-vectors; allowed: <= {n}")
    if gram is None:
        factor = torch.eye(block_size, dtype=points.dtype, device=points.device)
    else:
        if gram.shape != (block_size, block_size):
            raise ValueError(f"gram has shape {tuple(gram.shape)}, expected ({block_size}, {block_size})")
        factor = _metric_factor(gram.to(points), eps)
    z = points @ factor.T  # Tensor[N, d], Euclidean geometry == Gram metric
    gen = torch.Generator().manual_seed(seed)
    centroids = _init_centroids(z, n_centroids, gen)
    split_scale = 1e-3 * float(z.std().clamp_min(1e-12))
    idx = torch.zeros(n, dtype=torch.long, device=z.device)
    for it in range(n_iter):
        prev = idx
        idx, _ = assign(z, centroids)
        if it > 0 and torch.equal(idx, prev):
            # Fixed point: the M-step would give the same means, so further iterations change no code and no
            # used centroid (at most the values of still-empty, unused centroids after a re-split).
            logger.debug("EM converged after %d iterations", it)
            break
        counts = torch.bincount(idx, minlength=n_centroids)
        sums = torch.zeros_like(centroids).index_add_(0, idx, z)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1).to(z.dtype)
        n_split = _split_empty(centroids, counts, gen, split_scale)
        if n_split:
            logger.debug("EM iteration %d: split %d empty clusters", it, n_split)
    idx, dist = assign(z, centroids)
    # Back to weight space: c = U^{-1} c_z. The M-step mean commutes with the linear map.
    codebook = torch.linalg.solve_triangular(factor, centroids.T, upper=True).T.contiguous()
    codes = idx.reshape(weight.shape[0], -1).to(code_dtype(n_centroids))
    return PQResult(codes=codes, codebook=codebook, objective=float(dist.sum()))
