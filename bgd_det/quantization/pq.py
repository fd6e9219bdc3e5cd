"""Product quantization of a weight matrix with an activation-aware (Gram) metric.

A layer's weight is viewed as ``W[C_out, C_in_per_group * kh * kw]`` and cut into contiguous sub-vectors of
size ``d``: sub-vector ``(o, b)`` is ``W[o, b*d:(b+1)*d]``. Every sub-vector is replaced by the index of its
closest centroid (``codes[o, b]``) in a codebook ``C[K, d]``. "Closest" uses the output error on in-domain
inputs: ``||X (w - c)||^2 = (w - c)^T G (w - c)`` with ``G = X^T X``, so only ``G`` (``d x d``) is needed.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, TypeVar

import torch
from torch import Tensor

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

__all__ = ["pq_decode", "check_codes", "code_dtype", "split_subvectors", "divisors", "PQResult", "em_quantize",
           "em_quantize_resampled", "assign"]


def code_dtype(n_centroids: int) -> torch.dtype:
    """Smallest integer dtype that holds codes for ``n_centroids`` centroids (uint8 up to 256, else int16)."""
    if n_centroids <= 256:
        return torch.uint8
    if n_centroids <= 32768:
        return torch.int16
    raise ValueError(f"n_centroids={n_centroids} is too large; allowed: 1..32768")


def check_codes(codes: Tensor, n_centroids: int, where: str = "") -> None:
    """One-line ValueError when a code of ``codes`` (any integer dtype) is outside ``[0, n_centroids)``."""
    if codes.numel() and (int(codes.long().max()) >= n_centroids or int(codes.long().min()) < 0):
        raise ValueError(f"{where + ': ' if where else ''}codes out of range [0, {n_centroids}) for a codebook of "
                         f"{n_centroids} centroids")


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
            f"(C_in/groups*kh*kw); allowed block sizes for this layer: {divisors(cols, 64)}"
        )
    return flat.reshape(-1, block_size)


def divisors(n: int, limit: int) -> List[int]:
    """The divisors of ``n`` up to ``limit``, ascending (the block sizes a row of ``n`` columns allows)."""
    return [k for k in range(1, min(n, limit) + 1) if n % k == 0]


@dataclass
class PQResult:
    """Outcome of :func:`em_quantize`.

    Attributes:
        codes (Tensor[C_out, n_blocks]): uint8 (K <= 256) or int16 codes.
        codebook (Tensor[K, d] float32): learned centroids.
        objective (float): final ``sum_i (w_i - c_i)^T G (w_i - c_i)`` (output-space error, up to scale).
        iterations (int): EM iterations (M-steps) run: fewer than ``n_iter`` when a fixed point
            stopped it early (0 where not reported).
    """

    codes: Tensor
    codebook: Tensor
    objective: float
    iterations: int = 0


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


#: float32 elements of one E-step score block ``[rows, K]`` (8 MiB). Measured at one thread,
#: K = 256: 4 MiB blocks searched 1.6-2.2x faster than the 65536-row chunks used before; 8 MiB ones
#: came within 5% of that with half the tensor ops (each op a fork/join of the threads, which is
#: slow when other jobs share the cores).
_SCORE_BLOCK = 1 << 21

#: layers with at least this many sub-vectors use :class:`_Hamerly`; below, its extra tensor ops
#: cost more than the searches they save.
_BOUNDS_MIN_POINTS = 32768

#: codebooks of at least this many centroids use the local search of :class:`_Hamerly` (ResNet-50,
#: one thread, 30 iterations: it saved 26-37% of ``fc``'s EM time at K = 1024 and cost 28% more on
#: a K = 256 layer, where its gathers cost more than the full search's 256 scores per point).
_LOCAL_MIN_K = 512

#: nearest other centroids listed per centroid for the local search.
_N_NEAR = 16

#: rows per local search (its gathered centroids take ``rows * (_N_NEAR + 1) * (d + 1)`` floats).
_LOCAL_ROWS = 32768


#: the shared pool of :func:`_pool` and its number of threads.
_POOL: Optional[tuple[ThreadPoolExecutor, int]] = None
_POOL_LOCK = threading.Lock()
#: ``n``: Python threads that run score blocks in parallel inside :func:`em_quantize` (0: outside
#: it, and in those threads themselves).
_WORKERS = threading.local()


def _pool(workers: int) -> ThreadPoolExecutor:
    """The shared pool of ``workers`` threads for score blocks (torch ops on one thread each)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[1] != workers:
            if _POOL is not None:
                _POOL[0].shutdown(wait=True)
            pool = ThreadPoolExecutor(workers, thread_name_prefix="bgd-em",
                                      initializer=torch.set_num_threads, initargs=(1,))
            _POOL = (pool, workers)
        return _POOL[0]


def _map(fn: Callable[..., _T], items: Iterable) -> List[_T]:
    """``[fn(x) for x in items]``, spread over the EM's worker threads when there are several."""
    items = list(items)
    workers = getattr(_WORKERS, "n", 0)
    if workers < 2 or len(items) < 2:
        return [fn(x) for x in items]
    return list(_pool(workers).map(fn, items))


@contextlib.contextmanager
def _block_threads() -> Iterator[None]:
    """Run the enclosed EM with single-threaded tensor ops and its score blocks on as many Python
    threads as torch had intra-op threads.

    Every intra-op parallel op is a fork/join of OpenMP threads that spin while they wait; when
    other jobs share the cores, a descheduled thread stalls each join (on the 2-core development
    machine with another job running, ``fc``'s EM took 57-63 s with 2 intra-op threads and 7 s with
    one). Threads that each take whole score blocks do not wait for one another.
    """
    workers = torch.get_num_threads()
    torch.set_num_threads(1)
    _WORKERS.n = workers
    try:
        yield
    finally:
        _WORKERS.n = 0
        torch.set_num_threads(workers)


def _rows(t: Tensor, index: Tensor) -> Tensor:
    """``t[index]`` along dim 0 (index_select: 1.5-3x faster than indexing for these gathers)."""
    return t.index_select(0, index)


def _chunk_rows(n_centroids: int) -> int:
    """Rows per E-step chunk: a ``[rows, K]`` score block of about ``_SCORE_BLOCK`` floats."""
    return max(64, _SCORE_BLOCK // max(n_centroids, 1))


def _with_ones(points: Tensor) -> Tensor:
    """``[p, 1]`` (Tensor[N, d + 1]); times :func:`_score_weights` it gives ``||c||^2 - 2 p.c``."""
    return torch.cat([points, points.new_ones(points.shape[0], 1)], 1)


def _score_weights(centroids: Tensor) -> Tensor:
    """``[-2 c, ||c||^2]^T`` (Tensor[d + 1, K]): one GEMM gives the scores, with no bias pass."""
    c_sq = (centroids * centroids).sum(1, keepdim=True)
    return torch.cat([-2 * centroids, c_sq], 1).T.contiguous()


def _nearest(points: Tensor, weights: Tensor, *, chunk: int, second: bool = False,
             ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Nearest centroid of every point from the scores ``||c||^2 - 2 p.c`` (one GEMM per chunk).

    Args:
        points (Tensor[N, d + 1]): :func:`_with_ones` of the points.
        weights (Tensor[d + 1, K]): :func:`_score_weights` of the centroids.
        chunk: rows per score block.
        second: also return the second smallest score (``+inf`` when K = 1).

    Returns:
        (Tensor[N] int64 argmin, Tensor[N] smallest score, Tensor[N] second smallest score or None).
        Ties go to the lowest index. A score plus ``||p||^2`` is the squared distance.
    """
    n = points.shape[0]
    idx = torch.empty(n, dtype=torch.long, device=points.device)
    best = torch.empty(n, dtype=points.dtype, device=points.device)
    runner_up = torch.empty_like(best) if second else None

    def block(start: int) -> None:  # writes rows start:start + chunk of the outputs
        stop = min(start + chunk, n)
        scores = torch.mm(points[start:stop], weights)
        # min(dim) (values and indices) measured 2x faster than argmin(dim) on this CPU build.
        torch.min(scores, 1, out=(best[start:stop], idx[start:stop]))
        if second:
            scores.scatter_(1, idx[start:stop].unsqueeze(1), math.inf)
            torch.amin(scores, 1, out=runner_up[start:stop])

    _map(block, range(0, n, chunk))
    return idx, best, runner_up


def assign(points: Tensor, centroids: Tensor, *,
           chunk: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Euclidean nearest-centroid assignment in chunks (``||p||^2 - 2 p.c + ||c||^2``).

    Args:
        points (Tensor[N, d]), centroids (Tensor[K, d]).
        chunk: rows per score block (default: a block of about 4 MiB).

    Returns:
        (Tensor[N] int64 indices, Tensor[N] squared distances). Ties go to the lowest index.
    """
    chunk = chunk or _chunk_rows(centroids.shape[0])
    idx, best, _ = _nearest(_with_ones(points), _score_weights(centroids), chunk=chunk)
    return idx, (best + (points * points).sum(1)).clamp_min(0)


def _init_centroids(points: Tensor, k: int, generator: torch.Generator) -> Tensor:
    perm = torch.randperm(points.shape[0], generator=generator, device="cpu")[:k].to(points.device)
    return points[perm].clone()


def _split_empty(centroids: Tensor, counts: Tensor, generator: torch.Generator,
                 scale: float) -> int:
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


def _m_step(z: Tensor, idx: Tensor, centroids: Tensor, generator: torch.Generator,
            split_scale: float) -> Tensor:
    """Means of the clusters; an empty cluster splits the most populated one (:func:`_split_empty`).

    Args:
        z (Tensor[N, d]): points; idx (Tensor[N] int64): their clusters.
        centroids (Tensor[K, d]): current centroids (not modified; kept for empty clusters).

    Returns:
        Tensor[K, d]: the new centroids.
    """
    counts = torch.bincount(idx, minlength=centroids.shape[0])
    sums = torch.zeros_like(centroids).index_add_(0, idx, z)
    means = sums / counts.clamp_min(1).unsqueeze(1).to(z.dtype)
    new = torch.where((counts > 0).unsqueeze(1), means, centroids)
    n_split = _split_empty(new, counts, generator, split_scale)
    if n_split:
        logger.debug("EM: split %d empty clusters", n_split)
    return new


class _Lloyd:
    """Plain E-steps: every point searched every time (the fewest tensor ops; for small layers).

    Attributes:
        idx (Tensor[N] int64): current assignment.
    """

    def __init__(self, z: Tensor, centroids: Tensor) -> None:
        self.z1 = _with_ones(z)
        self.chunk = _chunk_rows(centroids.shape[0])
        self.idx = _nearest(self.z1, _score_weights(centroids), chunk=self.chunk)[0]

    def step(self, centroids: Tensor) -> int:
        """Reassign every point to its nearest centroid; returns how many changed."""
        idx = _nearest(self.z1, _score_weights(centroids), chunk=self.chunk)[0]
        changed = int((idx != self.idx).sum())
        self.idx = idx
        return changed

    def moved(self, old: Tensor, new: Tensor) -> None:
        """Nothing to update (the interface of :class:`_Hamerly`)."""


def _rounding_tau(d: int, dtype: torch.dtype) -> float:
    """Relative error bound, with a margin of 8, of ``[p, 1] . [-2 c, ||c||^2] + ||p||^2`` for
    ``d``-dim points in ``dtype``."""
    return 8.0 * (d + 3) * torch.finfo(dtype).eps


@dataclass
class _Neighbours:
    """Where the other centroids lie, seen from each centroid (float64, rounded down by 1e-9).

    Attributes:
        half_gap (Tensor[K]): half the distance to the nearest other centroid (``inf`` when K = 1):
            a point closer than that to its own centroid has no closer one (triangle inequality).
        near (Tensor[K, m] int64): the ``m = min(n_near, K - 1)`` nearest other centroids.
        reach (Tensor[K]): distance to the nearest centroid not in ``near`` (``inf`` when ``near``
            holds them all): a point at distance ``u`` from its centroid ``a`` with
            ``reach[a] > 2 u`` is closer to ``a`` than to any centroid outside ``near[a]``.
    """

    half_gap: Tensor
    near: Tensor
    reach: Tensor

    @classmethod
    def of(cls, centroids: Tensor, n_near: int) -> "_Neighbours":
        """The neighbours of ``centroids`` (Tensor[K, d]), ``n_near`` listed (0: none)."""
        k = centroids.shape[0]
        c = centroids.double()
        inf = torch.full((k,), math.inf, dtype=c.dtype, device=c.device)
        if k == 1:
            return cls(inf, torch.zeros(1, 0, dtype=torch.long, device=c.device), inf)
        gaps = torch.cdist(c, c, compute_mode="donot_use_mm_for_euclid_dist")
        gaps.fill_diagonal_(math.inf)
        m = min(n_near, k - 1)
        dist, near = gaps.topk(min(m + 1, k - 1), dim=1, largest=False)  # ascending
        reach = dist[:, m] if m < k - 1 else inf
        shrink = 1 - 1e-9
        return cls(dist[:, 0] * (0.5 * shrink), near[:, :m], reach * shrink)


class _Hamerly:
    """E-steps with Hamerly's bounds: a point is searched again only when its centroid may change.

    A squared distance as :func:`_nearest` computes it (float32 ``[p, 1] . [-2 c, ||c||^2]`` plus
    ``||p||^2``) is off by at most ``err_i = tau * (||z_i||^2 + c_max^2)``, ``c_max`` bounding the
    centroid norms. The upper bound is inflated to ``sqrt(u^2 + 2 err)`` for an upper bound ``u`` of
    the distance to the own centroid. So a point whose upper bound is below its lower bound and
    below half the gap from its centroid to the next one has every other centroid farther by more
    than the rounding: the full search would keep it where it is. Bounds are float64 (their updates
    add no rounding that matters). Per-point values sit in ``[N, 2]`` tensors so that each update
    is one tensor op.

    Attributes:
        idx (Tensor[N] int64): current assignment.
        bounds (Tensor[N, 2] float64): inflated upper bound on ``||z_i - c_idx_i||``; lower bound on
            ``min_{j != idx_i} ||z_i - c_j||``.
        norms (Tensor[N, 2] float64): ``||z_i||^2`` and ``err_i``.
        z, z1 (Tensor[N, d], Tensor[N, d + 1]): the points, without and with a column of ones.
        c_max_sq (float): the ``c_max^2`` that ``err`` assumes.
    """

    def __init__(self, z: Tensor, centroids: Tensor) -> None:
        self.z, self.z1 = z, _with_ones(z)
        z_sq = (z.double() ** 2).sum(1)
        # Centroids are points, means of points or split copies: 2 max ||z||^2 leaves room (and
        # every step checks it).
        c_sq_max = float((centroids.double() ** 2).sum(1).max())
        self.c_max_sq = 2 * max(float(z_sq.max()), c_sq_max, 1e-30)
        err = (z_sq + self.c_max_sq) * _rounding_tau(z.shape[1], z.dtype)
        self.norms = torch.stack([z_sq, err], 1)
        self.idx, self.bounds = self._search(self.z1, self.norms, _score_weights(centroids))
        self._pending: Optional[tuple[_Neighbours, Tensor]] = None

    @staticmethod
    def _search(z1: Tensor, norms: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """Full search of some points, with fresh bounds.

        Args:
            z1 (Tensor[n, d + 1]): points with ones; norms (Tensor[n, 2] float64): their ``norms``.
            weights (Tensor[d + 1, K]): :func:`_score_weights` of the centroids.

        Returns:
            (Tensor[n] idx, Tensor[n, 2] bounds): the argmin as :func:`assign` picks it; its bounds.
        """
        idx, best, second = _nearest(z1, weights, chunk=_chunk_rows(weights.shape[1]), second=True)
        scores = torch.stack([best, second], 1).double()
        # upper^2 = best + ||z||^2 + 3 err, lower^2 = second + ||z||^2 - err
        bounds = scores.add_(norms[:, :1]).addcmul_(norms[:, 1:], norms.new_tensor([3.0, -1.0]))
        return idx, bounds.clamp_min_(0).sqrt_()

    @staticmethod
    def _local(z1: Tensor, norms: Tensor, own: Tensor, upper: Tensor, weights: Tensor,
               nbrs: _Neighbours) -> tuple[Tensor, Tensor]:
        """Search of some points among their centroid and its ``near`` list (``reach > 2 upper``).

        Args:
            z1 (Tensor[n, d + 1]), norms (Tensor[n, 2] float64): as :meth:`_search`.
            own (Tensor[n] int64): current centroids; upper (Tensor[n] float64): their bounds.
            weights (Tensor[d + 1, K]); nbrs: the centroids' neighbours.

        Returns:
            (idx, bounds) as :meth:`_search`; ties go to the lowest centroid index too.
        """
        k = weights.shape[1]
        n, m1 = own.shape[0], nbrs.near.shape[1] + 1
        # Tensor[n, m1]: own centroid and its neighbours, distinct in every row.
        cand = torch.cat([own.unsqueeze(1), _rows(nbrs.near, own)], 1)
        cand_w = _rows(weights.T.contiguous(), cand.flatten()).view(n, m1, weights.shape[0])
        scores = torch.bmm(cand_w, z1.unsqueeze(2)).squeeze(2)  # Tensor[n, m1]
        best = scores.amin(1, keepdim=True)
        idx = torch.where(scores == best, cand, k).amin(1)
        second = scores.masked_fill_(cand == idx.unsqueeze(1), math.inf).amin(1)
        pair = torch.stack([best.squeeze(1), second], 1).double()
        bounds = pair.add_(norms[:, :1]).addcmul_(norms[:, 1:], norms.new_tensor([3.0, -1.0]))
        bounds = bounds.clamp_min_(0).sqrt_()
        # Centroids outside the list are at least reach - upper away (triangle inequality).
        torch.minimum(bounds[:, 1], _rows(nbrs.reach, own) - upper, out=bounds[:, 1])
        return idx, bounds

    def _neighbours(self, centroids: Tensor) -> tuple[_Neighbours, Tensor]:
        """The centroids' neighbours and every point's ``half_gap`` (Tensor[N] float64)."""
        if self._pending is not None:  # computed by moved() together with the bound updates
            pending, self._pending = self._pending, None
            return pending
        nbrs = _Neighbours.of(centroids, _N_NEAR if centroids.shape[0] >= _LOCAL_MIN_K else 0)
        return nbrs, _rows(nbrs.half_gap, self.idx)

    def step(self, centroids: Tensor) -> int:
        """Reassign the points whose bounds allow a closer centroid; returns how many changed."""
        weights = _score_weights(centroids)
        c_max_sq = float(weights[-1].max())
        if c_max_sq > self.c_max_sq:  # not seen so far; keeps the rounding bound valid
            self.norms[:, 1] *= (2 * c_max_sq + 1) / self.c_max_sq
            self.c_max_sq = 2 * c_max_sq + 1
            self.bounds[:, 0] = math.inf
        nbrs, half = self._neighbours(centroids)
        bound = torch.maximum(self.bounds[:, 1], half, out=half)
        open_ = (self.bounds[:, 0] >= bound).nonzero().squeeze(1)
        if open_.numel() == 0:
            return 0
        # Tighten the open points' upper bounds with their distance taken as a difference. Search
        # the points still open: among their centroid's neighbours where the bounds allow it, else
        # among all centroids.
        own, norms = _rows(self.idx, open_), _rows(self.norms, open_)
        d2 = (_rows(self.z, open_) - _rows(centroids, own)).square_().sum(1).double()
        upper = d2.add_(norms[:, 1], alpha=3).sqrt_()
        self.bounds[open_, 0] = upper
        still = upper >= _rows(bound, open_)
        local = still & (_rows(nbrs.reach, own) > 2 * upper)
        def search_near(part: Tensor) -> tuple[Tensor, Tensor]:
            return self._local(_rows(self.z1, _rows(open_, part)), _rows(norms, part),
                               _rows(own, part), _rows(upper, part), weights, nbrs)

        parts = [p for p in local.nonzero().squeeze(1).split(_LOCAL_ROWS) if p.numel()]
        changed = 0
        for part, found in zip(parts, _map(search_near, parts)):
            changed += self._store(_rows(open_, part), _rows(own, part), found)
        full = (still & ~local).nonzero().squeeze(1)
        if full.numel():
            rows = _rows(open_, full)
            found = self._search(_rows(self.z1, rows), _rows(norms, full), weights)
            changed += self._store(rows, _rows(own, full), found)
        return changed

    def _store(self, rows: Tensor, own: Tensor, found: tuple[Tensor, Tensor]) -> int:
        """Record a search's (idx, bounds) for ``rows``; returns how many left their ``own``."""
        idx, bounds = found
        self.idx[rows], self.bounds[rows] = idx, bounds
        return int((idx != own).sum())

    def moved(self, old: Tensor, new: Tensor) -> None:
        """Loosen the bounds by how far the centroids moved (Tensor[K, d], before and after)."""
        move = (new.double() - old.double()).norm(dim=1)
        # The lower bound is about the other centroids: it drops by the largest move among them.
        drop = move.max().expand_as(move).clone()
        if move.numel() > 1:
            top, arg = move.topk(2)
            drop[arg[0]] = top[1]
        nbrs = _Neighbours.of(new, _N_NEAR if new.shape[0] >= _LOCAL_MIN_K else 0)
        per_point = _rows(torch.stack([move, -drop, nbrs.half_gap], 1), self.idx)  # Tensor[N, 3]
        self.bounds += per_point[:, :2]
        self._pending = (nbrs, per_point[:, 2])


def _lloyd_em(z: Tensor, n_centroids: int, n_iter: int, seed: int) -> tuple[Tensor, Tensor, int]:
    """The EM loop of :func:`em_quantize` on the transformed points ``z`` (Tensor[N, d]).

    Returns:
        (Tensor[K, d] centroids, Tensor[N] int64 codes of them, iterations run).
    """
    gen = torch.Generator().manual_seed(seed)
    centroids = _init_centroids(z, n_centroids, gen)
    split_scale = 1e-3 * float(z.std().clamp_min(1e-12))
    state = (_Hamerly if z.shape[0] >= _BOUNDS_MIN_POINTS else _Lloyd)(z, centroids)
    for it in range(n_iter):
        if it > 0 and state.step(centroids) == 0:
            # Fixed point: the M-step would give the same means, so further iterations change no
            # code and no used centroid (at most still-empty, unused centroids after a re-split).
            logger.debug("EM converged after %d iterations", it)
            return centroids, state.idx, it
        new = _m_step(z, state.idx, centroids, gen, split_scale)
        state.moved(centroids, new)
        centroids = new
    if n_iter > 0:
        state.step(centroids)  # the codes of the final centroids
    return centroids, state.idx, n_iter


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
    assignment in the Cholesky-transformed space ``U w`` (``G = U^T U``); the M-step sets each
    centroid to the mean of its sub-vectors (the minimiser for a shared ``G``); empty clusters split
    the most populated one. The EM stops early at a fixed point (an E-step that changes no code).

    Layers of at least ``_BOUNDS_MIN_POINTS`` sub-vectors use Hamerly's bounds in the E-step: a
    sub-vector is searched again only when the centroids moved enough that another one may be closer
    than its own by more than the float32 rounding of the distances; the others keep their centroid,
    which the full search would give them too. So the codes are those of the plain E-step
    (:func:`assign` every iteration), up to the rounding of near-exact ties.

    Args:
        weight (Tensor[C_out, ...]): dense weight.
        gram (Tensor[d, d] or None): ``X^T X`` over input sub-vectors; None means identity (plain
            k-means).
        block_size: sub-vector size ``d``.
        n_centroids: codebook size ``K`` (must be <= number of sub-vectors).
        n_iter: EM iterations.
        seed: seeds centroid initialisation and empty-cluster splits.

    Returns:
        PQResult with codes Tensor[C_out, n_blocks], codebook Tensor[K, d] float32, the objective
        (squared distances taken as differences, summed in float64) and the iterations run.
    """
    points = split_subvectors(weight.detach().float(), block_size)
    n = points.shape[0]
    if n_centroids > n:
        raise ValueError(
            f"n_centroids={n_centroids} exceeds the layer's {n} sub-vectors; allowed: <= {n}")
    if gram is None:
        factor = torch.eye(block_size, dtype=points.dtype, device=points.device)
    else:
        if gram.shape != (block_size, block_size):
            raise ValueError(
                f"gram has shape {tuple(gram.shape)}, expected ({block_size}, {block_size})")
        factor = _metric_factor(gram.to(points), eps)
    z = points @ factor.T  # Tensor[N, d], Euclidean geometry == Gram metric
    with _block_threads():
        centroids, idx, iterations = _lloyd_em(z, n_centroids, n_iter, seed)
    objective = float(((z - centroids[idx]) ** 2).sum(1).double().sum())
    # Back to weight space: c = U^{-1} c_z. The M-step mean commutes with the linear map.
    codebook = torch.linalg.solve_triangular(factor, centroids.T, upper=True).T.contiguous()
    codes = idx.reshape(weight.shape[0], -1).to(code_dtype(n_centroids))
    return PQResult(codes=codes, codebook=codebook, objective=objective, iterations=iterations)


def em_quantize_resampled(
    weight: Tensor,
    grams: Tensor,
    counts: Tensor,
    *,
    block_size: int,
    n_centroids: int,
    sample: int,
    n_iter: int = 100,
    seed: int = 0,
    eps: float = 1e-8,
) -> PQResult:
    """The activation-aware EM with the E-step's metric resampled every iteration (the paper's recipe).

    Iteration ``t``'s E-step uses the Gram of ``sample`` input items (images) drawn afresh, without replacement,
    from the pool ``grams``; the M-step is the cluster mean (in weight space: it does not depend on the metric).
    The final codes and the objective use the Gram of the whole pool. No early stop: the metric changes every
    iteration.

    Args:
        weight (Tensor[C_out, ...]): dense weight.
        grams (Tensor[n_items, d, d]): per-item sums ``x x^T`` of the captured input sub-vectors; counts
            (Tensor[n_items]): the sub-vectors each sum holds (a draw's metric is its mean Gram).
        sample: items per E-step (``1 <= sample <= n_items``).

    Returns:
        PQResult as :func:`em_quantize`.
    """
    points = split_subvectors(weight.detach().float(), block_size)
    n, n_items = points.shape[0], grams.shape[0]
    if n_centroids > n:
        raise ValueError(f"n_centroids={n_centroids} exceeds the layer's {n} sub-vectors; allowed: <= {n}")
    if grams.dim() != 3 or grams.shape[1:] != (block_size, block_size):
        raise ValueError(f"grams has shape {tuple(grams.shape)}, expected (n_items, {block_size}, {block_size})")
    if not 1 <= sample <= n_items:
        raise ValueError(f"QUANT.EM_RESAMPLE_IMAGES={sample}; allowed: 1 .. {n_items} (the captured images)")
    gen = torch.Generator().manual_seed(seed)
    centroids = _init_centroids(points, n_centroids, gen)
    split_scale = 1e-3 * float(points.std().clamp_min(1e-12))

    def factor_of(items: Tensor) -> Tensor:
        mean = grams[items].sum(0) / counts[items].sum().clamp_min(1)
        return _metric_factor(mean.to(points), eps)

    with _block_threads():
        for _ in range(n_iter):
            draw = torch.randperm(n_items, generator=gen)[:sample]
            factor = factor_of(draw)
            idx, _ = assign(points @ factor.T, centroids @ factor.T)
            centroids = _m_step(points, idx, centroids, gen, split_scale)
        factor = factor_of(torch.arange(n_items))
        z = points @ factor.T
        idx, dist = assign(z, centroids @ factor.T)
    codes = idx.reshape(weight.shape[0], -1).to(code_dtype(n_centroids))
    return PQResult(codes=codes, codebook=centroids.contiguous(), objective=float(dist.double().sum()),
                    iterations=n_iter)

