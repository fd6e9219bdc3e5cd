"""Output-space refinement of a layer's codes and codebook under the full input second moments.

The EM's shared ``d x d`` metric ignores how a row's sub-vectors interact through the input. With the full
second moments of the layer's input rows (``D = C_in/groups * kh * kw``) in the student (``H = E[x_s x_s^T]``)
and against the teacher (``E[x_s x_t^T]``), the error of the student's output against the teacher's output is,
per group,

    f(W_hat) = E||W_hat x_s - W x_t||^2 = tr(W_hat H W_hat^T) - 2 tr(W_hat B^T) + tr(W T W^T),
    B = W E[x_t x_s^T],  T = E[x_t x_t^T].

Matching the teacher's output rather than the layer's own weights lets each layer absorb the drift that the
already-compressed layers before it put into its input. ``f`` is minimised by alternating two steps that never
increase it:

* code sweep: block by block, every row takes the centroid that minimises ``f`` with its other blocks fixed
  (exact coordinate descent; the error of earlier blocks is fed forward into later ones, as in GPTQ);
* codebook solve: ``f`` is quadratic in the centroids; preconditioned conjugate gradients from the current one.

A damping ``lambda * ||W_hat - W||_M^2`` pulls towards the layer's own weights where the captured inputs do not
determine the output (few captured rows for ``D``). Its metric ``M`` (all three have the trace of ``H``):
``"identity"``: ``mean(diag H) * I``; ``"diagonal"``: ``diag H`` (each input column at its own energy);
``"channel"``: the ``kh*kw`` diagonal blocks of ``H``, one per input channel (keeps the spatial correlations
within a channel, drops the cross-channel ones, which are what few rows estimate worst).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..config.checks import (DAMPING_METRICS, REFINE_TARGETS, check_damping_metric, check_gain_floor,
                             check_refine_target)
from .capture import SecondMoments
from .pq import PQResult

logger = logging.getLogger(__name__)

__all__ = ["DAMPING_METRICS", "REFINE_TARGETS", "OutputObjective", "check_damping_metric", "check_refine_target",
           "check_gain_floor", "residual_ridge", "damping_metric", "output_objective", "refine_pq"]


@dataclass
class OutputObjective:
    """The quadratic ``f(W_hat) = sum_o r_o (w_o H w_o^T - 2 w_o b_o^T) + const`` per group (``w_o``: row o of
    ``W_hat``, ``r_o``: its weight).

    Attributes:
        h (Tensor[g, D, D] float64): damped student second moment.
        b (Tensor[g, m, D] float64): damped target correlation, ``m = C_out / g`` rows per group.
        row_weight (Tensor[g, m, 1] float64): ``r_o``, e.g. the squared scale a following BatchNorm applies to
            output channel ``o`` (the error is then measured after it).
        const (float): ``sum tr(W T W^T)`` plus the damping's constant, so ``f >= 0``.
        scale (float): ``sum tr(W T W^T)``, the teacher's output energy (for relative errors).
        weight (Tensor[g, m, D] float64), ridge (Tensor[g, D, D] float64): the layer's own weight and
            ``lambda * M``, for the damping's share of ``f`` (:meth:`output_error`).
    """

    h: Tensor
    b: Tensor
    row_weight: Tensor
    const: float
    scale: float
    weight: Tensor
    ridge: Tensor

    def value(self, w_hat: Tensor) -> float:
        """``f`` at ``w_hat`` (Tensor[g, m, D])."""
        w_hat = w_hat.double()
        quad = (w_hat @ self.h * w_hat * self.row_weight).sum()
        return float(quad - 2 * (w_hat * self.b * self.row_weight).sum()) + self.const

    def penalty(self, w_hat: Tensor) -> float:
        """The damping's share of ``f`` at ``w_hat`` (Tensor[g, m, D]): ``lambda * ||W_hat - W||_M^2``."""
        delta = w_hat.double() - self.weight
        return float((delta @ self.ridge * delta * self.row_weight).sum())

    def output_error(self, w_hat: Tensor) -> float:
        """``f`` at ``w_hat`` (Tensor[g, m, D]) without the damping: the (row-weighted) squared output error
        on the captured rows, ``E||W_hat x_s - target||^2``."""
        return self.value(w_hat) - self.penalty(w_hat)


def residual_ridge(gain: Optional[Tensor], floor: float) -> float:
    """``mu`` of :func:`output_objective`: ``(floor * median |gain|)^2`` (0 without a gain; ``floor`` checked by
    :func:`check_gain_floor`)."""
    check_gain_floor(floor)
    if gain is None or floor == 0:
        return 0.0
    return float(floor * gain.detach().abs().median()) ** 2


def damping_metric(ss: Tensor, kind: str, kernel: int) -> Tensor:
    """The damping's metric ``M`` (Tensor[g, D, D]) from the student's second moment ``ss`` (Tensor[g, D, D]);
    ``kernel``: columns per input channel (``kh * kw``; 1 for Linear)."""
    check_damping_metric(kind)
    diag = ss.diagonal(dim1=1, dim2=2)
    if kind == "identity":
        return torch.diag_embed(diag.mean(1, keepdim=True).clamp_min(1e-12).expand_as(diag))
    if kind == "diagonal":
        return torch.diag_embed(diag.clamp_min(1e-12))
    dim = ss.shape[1]
    if dim % kernel:
        raise ValueError(f"{dim} input columns are not a whole number of {kernel}-column channels")
    mask = torch.block_diag(*[torch.ones(kernel, kernel, dtype=ss.dtype, device=ss.device)] * (dim // kernel))
    floor = 1e-12 * torch.eye(dim, dtype=ss.dtype, device=ss.device)
    return ss * mask + floor


def output_objective(weight: Tensor, moments: SecondMoments, *, damping: float = 0.01, target: str = "teacher",
                     row_weight: Optional[Tensor] = None, residual_gain: Optional[Tensor] = None,
                     metric: str = "identity", residual_ridge: float = 0.0) -> OutputObjective:
    """Build ``f`` for ``weight`` (Tensor[C_out, ...]) from captured moments.

    Args:
        damping: ``lambda``; adds ``lambda * ||W_hat - W||_M^2`` (``M`` from ``metric``, see the module doc).
        target: "teacher": match ``W x_t`` (teacher's output); "weights": match ``W x_s`` (the layer's own
            output on the student's inputs).
        row_weight (Tensor[C_out] or None): per output channel weight of the error (None: all 1).
        residual_gain (Tensor[C_out] or None): when ``moments`` hold a skip-path difference ``r``, the target
            becomes ``W x_t + r / a`` with ``a`` this per-channel gain (of the BatchNorm between the layer and
            the addition; see :mod:`.residual`).
        metric: the damping's metric, one of ``DAMPING_METRICS``.
        residual_ridge: ``mu`` >= 0; the skip-path compensation uses ``a / (a^2 + mu)`` instead of ``1 / a``, so a
            channel whose gain is ~0 (the BatchNorm shuts it) is not asked for an unbounded ``r / a``.
    """
    check_refine_target(target)
    g, dim = moments.ss.shape[0], moments.ss.shape[1]
    w = weight.detach().double().reshape(g, -1, dim)
    projected = target == "teacher" and moments.projected  # the teacher's side kept as W x_t (capture.py)
    kernel = weight[0, 0].numel() if weight.dim() > 2 else 1
    ss = moments.ss.to(w)
    ridge = damping * damping_metric(ss, metric, kernel)  # Tensor[g, D, D]
    w_ridge = w @ ridge  # Tensor[g, m, D], used by b and by the constant
    h = ss + ridge
    r = torch.ones(g, w.shape[1], 1, dtype=w.dtype, device=w.device) if row_weight is None else \
        row_weight.detach().to(w).reshape(g, -1, 1)
    if bool((r <= 0).any()) or not bool(torch.isfinite(r).all()):
        raise ValueError("row_weight must be positive and finite for every output channel")
    if projected:  # b = W st^T, scale = sum_o r_o E[(w_o x_t)^2]
        b = moments.cross_w.to(w) + w_ridge
        scale = float((moments.energy_w.to(w) * r.squeeze(2)).sum())
    else:
        cross = moments.st if target == "teacher" else moments.ss
        tt = moments.tt if target == "teacher" else moments.ss
        b = w @ cross.transpose(1, 2).to(w) + w_ridge
        scale = float((w @ tt.to(w) * w * r).sum())
    if moments.sd is not None:
        if residual_gain is None:
            raise ValueError("the moments hold a skip-path difference: residual_gain is required")
        a = residual_gain.detach().to(w).reshape(g, 1, -1)
        inv = a / (a * a + residual_ridge)  # Tensor[g, 1, m]; 1 / a when residual_ridge is 0
        b = b + (moments.sd.to(w) * inv).transpose(1, 2)
        td_w = moments.td_w.to(w) if projected else (w @ moments.td.to(w)).diagonal(dim1=1, dim2=2)  # Tensor[g, m]
        scale += float(2 * (td_w * inv.squeeze(1) * r.squeeze(2)).sum()
                       + (moments.dd.to(w) * inv.squeeze(1) ** 2 * r.squeeze(2)).sum())
    const = scale + float((w_ridge * w * r).sum())
    return OutputObjective(h, b, r, const, scale, w, ridge)


def _decode(codes: Tensor, codebook: Tensor, g: int) -> Tensor:
    """Tensor[g, m, D] weight of ``codes`` (Tensor[C_out, n_blocks]) and ``codebook`` (Tensor[K, d])."""
    c_out = codes.shape[0]
    return codebook[codes.long()].reshape(g, c_out // g, -1)


def _sweep_codes(obj: OutputObjective, codes: Tensor, codebook: Tensor,
                 dtype: torch.dtype = torch.float64) -> Tensor:
    """One coordinate-descent pass over the blocks; returns new codes Tensor[C_out, n_blocks] int64.

    Rows are independent here, so the (positive) row weights do not change any row's best code."""
    g, m, dim = obj.b.shape
    d = codebook.shape[1]
    h, b = obj.h.to(dtype), obj.b.to(dtype)
    codes = codes.long().clone()
    c = codebook.to(dtype)
    w_hat = _decode(codes, c, g)
    for blk in range(dim // d):
        cols = slice(blk * d, (blk + 1) * d)
        h_bb = h[:, cols, cols]  # Tensor[g, d, d]
        cur = w_hat[:, :, cols]
        # Linear coefficient of the block once its own quadratic term is taken out: (W_hat H - B)_b - w_b H_bb.
        lin = w_hat @ h[:, :, cols] - b[:, :, cols] - cur @ h_bb  # Tensor[g, m, d]
        quad = torch.einsum("kd,gde,ke->gk", c, h_bb, c)  # Tensor[g, K]
        score = torch.baddbmm(quad.unsqueeze(1), lin, c.T.expand(g, -1, -1), alpha=2.0)
        best = score.argmin(2)  # Tensor[g, m]
        codes[:, blk] = best.reshape(-1)
        w_hat[:, :, cols] = c[best]
    return codes


def _solve_codebook(obj: OutputObjective, codes: Tensor, codebook: Tensor, iters: int,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """Preconditioned CG on the normal equations of ``f`` in the centroids; returns Tensor[K, d] float64."""
    g, m, dim = obj.b.shape
    k, d = codebook.shape
    h = obj.h.to(dtype)
    flat = codes.long().reshape(-1)
    row_weight = obj.row_weight.to(dtype)

    def gather(mat: Tensor) -> Tensor:  # Tensor[g, m, D] -> Tensor[K, d], row-weighted sums by code
        mat = mat * row_weight.to(mat.dtype)
        return torch.zeros(k, d, dtype=mat.dtype, device=mat.device).index_add_(0, flat, mat.reshape(-1, d))

    def apply(p: Tensor) -> Tensor:  # the heavy product in ``dtype``, the CG recurrences in float64
        return gather(_decode(codes, p.to(dtype), g) @ h).double()

    diag_blocks = obj.h.diagonal(dim1=1, dim2=2).reshape(g, 1, dim).expand(g, m, dim)
    precond = gather(diag_blocks.contiguous())
    used = precond > 0
    precond = torch.where(used, 1.0 / precond.clamp_min(1e-30), torch.zeros_like(precond))
    x = codebook.double().clone()
    r = gather(obj.b) - apply(x)
    z = precond * r
    p = z.clone()
    rz = (r * z).sum()
    rz0 = float(rz)
    for _ in range(iters):
        if float(rz) <= 1e-20 * max(rz0, 1e-300):
            break
        ap = apply(p)
        alpha = rz / (p * ap).sum()
        x += alpha * p
        r -= alpha * ap
        z = precond * r
        rz_new = (r * z).sum()
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def refine_pq(obj: OutputObjective, codes: Tensor, codebook: Tensor, *, rounds: int = 4,
              cg_iters: int = 10, dtype: torch.dtype = torch.float32, label: str = "layer") -> PQResult:
    """Alternate code sweeps and codebook solves on ``f`` from an initial quantization.

    Args:
        obj: from :func:`output_objective`.
        codes (Tensor[C_out, n_blocks]), codebook (Tensor[K, d]): initial quantization (e.g. from the EM).
        rounds: sweep + solve alternations; a round that does not lower ``f`` (evaluated in float64) ends it.
        cg_iters: conjugate-gradient iterations per codebook solve.
        dtype: of the ``C_out x D x D`` products of the sweeps and solves (float32 halves their time).
        label: names the layer in the log line (relative squared output error and ``f / scale`` before ->
            after, rounds kept).

    Returns:
        PQResult with the refined codes (initial dtype), codebook (float32) and ``objective``: the squared
        output error on the captured rows relative to the target's energy (``f`` without the damping, over
        ``scale``).
    """
    g, m, dim = obj.b.shape
    if codes.shape[0] != g * m or codes.shape[1] * codebook.shape[1] != dim:
        raise ValueError(f"codes {tuple(codes.shape)} and codebook {tuple(codebook.shape)} do not match a "
                         f"[{g * m}, {dim}] weight")
    code_dtype = codes.dtype
    cb = codebook.double()
    start_w = best_w = _decode(codes, cb, g)
    best = start = obj.value(start_w)
    kept = 0
    for _ in range(rounds):
        new_codes = _sweep_codes(obj, codes, cb, dtype)
        new_cb = _solve_codebook(obj, new_codes, cb, cg_iters, dtype)
        new_w = _decode(new_codes, new_cb, g)
        value = obj.value(new_w)
        if value >= best:  # rounding noise only: keep the better one
            break
        codes, cb, best, best_w, kept = new_codes.to(code_dtype), new_cb, value, new_w, kept + 1
    scale = max(obj.scale, 1e-30)
    errors = [(f - obj.penalty(w)) / scale for f, w in ((start, start_w), (best, best_w))]
    logger.info("%s: relative squared output error %.4f -> %.4f (with the damping %.4f -> %.4f; %d of %d rounds "
                "kept)", label, *errors, start / scale, best / scale, kept, rounds)
    return PQResult(codes=codes, codebook=cb.float().contiguous(), objective=errors[1])
