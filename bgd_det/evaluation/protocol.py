"""Statistics of the frozen protocol (docs/scoreboard.md): several seeds of one recipe against a reference model
scored on the same images.

A recipe run with S seeds gives a hit matrix Tensor[S, N] (top-1 hit of every image); a peer's checkpoint gives
Tensor[N]. The difference of their top-1 (in points) is summarised by the mean over seeds and a paired bootstrap
over the images: images are drawn with replacement, the same draw for both models, and each draw's difference of
the seed-averaged hit rates is kept; the 2.5 / 97.5 percentiles are the 95% interval. It measures how much the
difference depends on which images were sampled (paired: shared easy/hard images cancel); the spread between seeds
is reported separately as the standard deviation of the per-seed top-1.

Metrics that are not a mean over images (COCO AP) are summarised over seeds alone: :func:`summarize` gives the
mean, the sample sd and the Student-t interval of the mean (what varies is the run's seed; the images are fixed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

__all__ = ["SeedSummary", "seed_summary", "summarize", "student_t_quantile", "paired_bootstrap", "PairedDifference"]


@dataclass(frozen=True)
class SeedSummary:
    """Top-1 (%) over seeds: per-seed values, mean, sample standard deviation (0 for one seed)."""

    values: Tuple[float, ...]
    mean: float
    sd: float

    def __str__(self) -> str:
        return f"{self.mean:.1f} +- {self.sd:.1f} ({len(self.values)} seeds)"

    def interval(self, level: float = 0.95) -> Tuple[float, float]:
        """Student-t ``level`` interval of the mean over the seeds (NaN for one seed)."""
        if len(self.values) < 2:
            return float("nan"), float("nan")
        half = student_t_quantile(0.5 + level / 2, len(self.values) - 1) * self.sd / math.sqrt(len(self.values))
        return self.mean - half, self.mean + half


def summarize(values) -> SeedSummary:
    """Mean and sample sd (0 for one value) of per-seed values (any metric)."""
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("no values to summarize; allowed: one value per seed, at least one")
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return SeedSummary(values, mean, sd)


def seed_summary(hits: torch.Tensor) -> SeedSummary:
    """Per-seed top-1 (%) of a hit matrix Tensor[S, N] (bool or 0/1), their mean and sample sd."""
    return summarize(100.0 * _matrix(hits).double().mean(1))


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom: bisection on the CDF, which is
    0.5 + the integral of the density from 0 (Simpson's rule, 2000 panels; |error| < 1e-6 for df >= 1, t < 100)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"p={p}, df={df}; allowed: 0.5 < p < 1, df >= 1")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        n = 2000
        h = x / n
        f = [math.exp(log_norm - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    low, high = 0.0, 100.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class PairedDifference:
    """Top-1 difference (points) of ours minus a reference on the same images, with a bootstrap interval."""

    mean: float
    low: float
    high: float
    n_images: int
    n_boot: int

    def __str__(self) -> str:
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


def paired_bootstrap(ours: torch.Tensor, reference: torch.Tensor, *, n_boot: int = 10000, level: float = 0.95,
                     seed: int = 0) -> PairedDifference:
    """Difference of the seed-averaged top-1 of ``ours`` (Tensor[S, N] or Tensor[N]) and of ``reference`` (likewise,
    its own seeds) on the same N images, in points, with a paired bootstrap ``level`` interval over the images."""
    ours = _matrix(ours).double().mean(0)  # Tensor[N]: each image's hit rate over the seeds
    reference = _matrix(reference).double().mean(0)
    if reference.numel() != ours.numel():
        raise ValueError(f"ours has {ours.numel()} images and the reference {reference.numel()}; the paired "
                         f"comparison needs the same images in the same order")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level={level}, n_boot={n_boot}; allowed: 0 < level < 1, n_boot >= 1")
    diff = ours - reference  # Tensor[N]
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, diff.numel(), (n_boot, diff.numel()), generator=gen)
    boot = 100.0 * diff[draws].mean(1)
    tail = (1 - level) / 2
    low, high = torch.quantile(boot, torch.tensor([tail, 1 - tail], dtype=boot.dtype)).tolist()
    return PairedDifference(100.0 * float(diff.mean()), low, high, diff.numel(), n_boot)


def _matrix(hits: torch.Tensor) -> torch.Tensor:
    hits = torch.as_tensor(hits)
    if hits.dim() == 1:
        hits = hits.unsqueeze(0)
    if hits.dim() != 2 or hits.shape[1] == 0:
        raise ValueError(f"hits of shape {tuple(hits.shape)}; allowed: Tensor[seeds, images] or Tensor[images]")
    return hits
