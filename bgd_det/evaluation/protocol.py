"""Statistics of the frozen protocol (docs/scoreboard.md): several seeds of one recipe against a reference model
scored on the same images.

A recipe run with S seeds gives a hit matrix Tensor[S, N] (top-1 hit of every image); a peer's checkpoint gives
Tensor[N]. The difference of their top-1 (in points) is summarised by the mean over seeds and a paired bootstrap
over the images: images are drawn with replacement, the same draw for both models, and each draw's difference of
the seed-averaged hit rates is kept; the 2.5 / 97.5 percentiles are the 95% interval. It measures how much the
difference depends on which images were sampled (paired: shared easy/hard images cancel); the spread between seeds
is reported separately as the standard deviation of the per-seed top-1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

__all__ = ["SeedSummary", "seed_summary", "paired_bootstrap", "PairedDifference"]


@dataclass(frozen=True)
class SeedSummary:
    """Top-1 (%) over seeds: per-seed values, mean, sample standard deviation (0 for one seed)."""

    values: Tuple[float, ...]
    mean: float
    sd: float

    def __str__(self) -> str:
        return f"{self.mean:.1f} +- {self.sd:.1f} ({len(self.values)} seeds)"


def seed_summary(hits: torch.Tensor) -> SeedSummary:
    """Per-seed top-1 (%) of a hit matrix Tensor[S, N] (bool or 0/1), their mean and sample sd."""
    hits = _matrix(hits)
    values = tuple(float(v) for v in 100.0 * hits.double().mean(1))
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return SeedSummary(values, mean, sd)


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
