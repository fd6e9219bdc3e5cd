#!/usr/bin/env python
"""EM benchmarks.

1. One EM iteration on a real ResNet-18 layer with real captured activations (imagenet-sample images):
   brute-force E-step ``argmin_c ||X (w - c)||^2`` vs the Gram/Cholesky E-step, side by side; prints the
   speed ratio and the assignment agreement.
2. ``--whole-net``: the EM alone (``--iters`` iterations; no capture or finetuning in the timing)
   over every planned layer of ResNet-50 small blocks (3x3 d=9, 1x1 d=4, K=256; fc d=4, K=1024) on
   a real dense teacher. Each layer's Gram is captured once on the dense teacher from ``--images``
   calibration images (not timed). Then the EM as it was before issue 21 (a copy kept
   here) and the current ``em_quantize`` run on the same layer one after the other (the order
   alternates per layer). Prints per-layer seconds, the iterations run (early stop at a fixed
   point) and the objective, recomputed in float64 from the returned codes and codebook.

    BGD_DATASETS=../shared/assets python benchmarks/bench_em.py
    python tools/convert_checkpoint.py --from pqf --dense \
        ../shared/assets/peers/pqf/resnet50_large.pth /tmp/r50_dense.pth
    python benchmarks/bench_em.py --whole-net --weights /tmp/r50_dense.pth [--threads 2]
"""
from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor

from bgd_det.config import load_config
from bgd_det.modeling import build_teacher
from bgd_det.quantization.capture import (
    capture_gram, has_input_metric, metric_uses_inputs)
from bgd_det.quantization.plan import QuantRules, build_plan, execution_order
from bgd_det.quantization.pq import (
    PQResult, _metric_factor, _split_empty, assign, code_dtype, em_quantize, split_subvectors)
from bgd_det.tasks import build_task
from bgd_det.utils.logger import setup_logger

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
logger = logging.getLogger("bgd_det.bench_em")


def brute_force_estep(points, codebook, x, chunk=8):
    """argmin_k ||X (w_i - c_k)||^2 from the activations themselves. points [P, d], x [N, d]."""
    best = torch.full((points.shape[0],), float("inf"), dtype=points.dtype)
    idx = torch.zeros(points.shape[0], dtype=torch.long)
    px = points @ x.T  # [P, N]
    for k0 in range(0, codebook.shape[0], chunk):
        cx = codebook[k0:k0 + chunk] @ x.T  # [c, N]
        dist = (px[:, None, :] - cx[None]).pow(2).sum(-1)  # [P, c]
        val, arg = dist.min(1)
        better = val < best
        best[better], idx[better] = val[better], arg[better] + k0
    return idx, best


def one_iteration(layer: str, rows: int, sub: int) -> None:
    cfg = load_config("configs/ImageNet/demo_resnet18_large_blocks_sample.yaml",
                      ["MODEL.WEIGHTS", str(ASSETS / "teachers/resnet18_pqf_small_dense.pth")])
    task, model = build_task(cfg), build_teacher(cfg).eval()
    module = model.get_submodule(layer)
    d = 9
    batches = task.calib_batches(n_images=16, batch_size=16, augment=False, seed=0)
    acc = capture_gram(model, layer, batches, task.forward, block_size=d, keep_rows=rows)
    x = torch.cat(acc.samples)[:rows].reshape(-1, d)[:rows]  # real activation sub-vectors [N, d]
    gram = x.T @ x
    points = split_subvectors(module.weight.detach(), d)[:sub]
    codebook = em_quantize(module.weight.detach(), gram, block_size=d, n_centroids=256, n_iter=0).codebook

    t0 = time.perf_counter()
    ref, ref_dist = brute_force_estep(points, codebook, x)
    t_brute = time.perf_counter() - t0
    times = []
    for _ in range(7):  # ours is short: median of several runs
        t0 = time.perf_counter()
        u = _metric_factor(gram, 1e-8)
        ours, _ = assign(points @ u.T, codebook @ u.T)
        counts = torch.bincount(ours, minlength=256)
        _ = torch.zeros_like(codebook).index_add_(0, ours, points) / counts.clamp_min(1)[:, None]
        times.append(time.perf_counter() - t0)
    t_ours = sorted(times)[len(times) // 2]
    agree = float((ours == ref).float().mean())
    # Sub-vectors of this teacher repeat exactly (it was decoded from a 256-centroid codebook), so
    # centroids tie: count a choice as agreeing when its brute-force distance equals the brute-force
    # minimum.
    ours_dist = ((points - codebook[ours]) @ x.T).pow(2).sum(1)
    tie_agree = float((ours_dist <= ref_dist * (1 + 1e-5) + 1e-8).float().mean())
    print(f"layer {layer}: {points.shape[0]} sub-vectors (d={d}), K=256, {x.shape[0]} real activation rows")
    print(f"| E-step | seconds |\n|---|---|\n| brute force ||X(w-c)||^2 | {t_brute:.3f} |\n"
          f"| Gram/Cholesky (E+M step) | {t_ours:.4f} |")
    print(f"speed ratio {t_brute / t_ours:.0f}x; same index as brute force {100 * agree:.2f}%, "
          f"same distance (ties counted) {100 * tie_agree:.2f}%; objective ratio "
          f"{float(ours_dist.sum() / ref_dist.sum()):.6f}")


# -- the EM before issue 21 (copied; counts its iterations), timed beside the current one ---------
def _old_assign(points: Tensor, centroids: Tensor, *, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    c_sq = (centroids * centroids).sum(1)
    idx = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    dist = torch.empty(points.shape[0], dtype=points.dtype, device=points.device)
    for start in range(0, points.shape[0], chunk):
        p = points[start : start + chunk]
        scores = torch.addmm(c_sq.unsqueeze(0), p, centroids.T, beta=1.0, alpha=-2.0)
        best, arg = scores.min(1)
        idx[start : start + chunk] = arg
        dist[start : start + chunk] = (best + (p * p).sum(1)).clamp_min(0)
    return idx, dist


def old_em_quantize(weight: Tensor, gram: Optional[Tensor], *, block_size: int, n_centroids: int,
                    n_iter: int = 100, seed: int = 0, eps: float = 1e-8) -> PQResult:
    """``em_quantize`` before issue 21, plus ``iterations`` (M-steps run) as the new one reports."""
    points = split_subvectors(weight.detach().float(), block_size)
    n = points.shape[0]
    if gram is None:
        factor = torch.eye(block_size, dtype=points.dtype, device=points.device)
    else:
        factor = _metric_factor(gram.to(points), eps)
    z = points @ factor.T
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(z.shape[0], generator=gen, device="cpu")[:n_centroids].to(z.device)
    centroids = z[perm].clone()
    split_scale = 1e-3 * float(z.std().clamp_min(1e-12))
    idx = torch.zeros(n, dtype=torch.long, device=z.device)
    iterations = n_iter
    for it in range(n_iter):
        prev = idx
        idx, _ = _old_assign(z, centroids)
        if it > 0 and torch.equal(idx, prev):
            iterations = it
            break
        counts = torch.bincount(idx, minlength=n_centroids)
        sums = torch.zeros_like(centroids).index_add_(0, idx, z)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1).to(z.dtype)
        _split_empty(centroids, counts, gen, split_scale)  # unchanged by the new EM
    idx, dist = _old_assign(z, centroids)
    codebook = torch.linalg.solve_triangular(factor, centroids.T, upper=True).T.contiguous()
    codes = idx.reshape(weight.shape[0], -1).to(code_dtype(n_centroids))
    return PQResult(codes=codes, codebook=codebook, objective=float(dist.sum()),
                    iterations=iterations)


# -- whole network ---------------------------------------------------------------------------------
def layer_kind(module: torch.nn.Module) -> str:
    """``"3x3 conv"``, ``"1x1 conv"``, ``"Linear"``..."""
    if isinstance(module, torch.nn.Conv2d):
        return "x".join(map(str, module.kernel_size)) + " conv"
    return type(module).__name__


def exact_objective(weight: Tensor, gram: Optional[Tensor], res: PQResult, d: int) -> float:
    """``sum_i (w_i - c_i)^T G (w_i - c_i)`` in float64 from the returned codes and codebook."""
    err = split_subvectors(weight.double(), d) - res.codebook.double()[res.codes.flatten().long()]
    g = torch.eye(d, dtype=torch.float64) if gram is None else gram.double()
    return float(((err @ g) * err).sum())


def capture_grams(cfg, task, model, plan, seeds: Dict[str, int],
                  n_images: int) -> Dict[str, Optional[Tensor]]:
    """Each planned layer's mean input Gram Tensor[d, d] on the dense teacher (None: no metric)."""
    grams: Dict[str, Optional[Tensor]] = {}
    for layer in plan:
        seed = seeds[layer.name]
        module = model.get_submodule(layer.name)
        if not (metric_uses_inputs(cfg.QUANT.METRIC) and has_input_metric(module)):
            grams[layer.name] = None
            continue
        batches = task.calib_batches(n_images=n_images, batch_size=min(n_images, 16),
                                     augment=False, seed=seed)
        acc = capture_gram(model, layer.name, batches, task.forward, block_size=layer.block_size,
                           rows_per_image=cfg.QUANT.CAPTURE_ROWS_PER_IMAGE, seed=seed)
        grams[layer.name] = acc.result(centered=cfg.QUANT.METRIC == "centered")
    return grams


def _load() -> str:
    """1/5/15-minute load averages (a shared machine slows 2-thread timings down)."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _timed(fn, *args, **kwargs) -> tuple[PQResult, float]:
    t0 = time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t0


def _print_totals(totals: Dict[tuple, List[float]], impls: List[str],
                  n_layers: int) -> Dict[str, float]:
    """Per-kind and total EM seconds; returns the totals per implementation."""
    kinds = sorted({k for _, k in totals})
    print("\n| kind | layers | " + " | ".join(f"{i} EM s" for i in impls) + " |")
    print("|---|---|" + "---|" * len(impls))
    for kind in kinds:
        print(f"| {kind} | {totals[(impls[0], kind)][1]:.0f} | "
              + " | ".join(f"{totals[(i, kind)][0]:.1f}" for i in impls) + " |")
    sums = {i: sum(totals[(i, k)][0] for k in kinds) for i in impls}
    print(f"| total | {n_layers} | " + " | ".join(f"{sums[i]:.1f}" for i in impls) + " |")
    return sums


def whole_net(weights: Path, iters: int, n_images: int, only: str, noise: float,
              impls: List[str]) -> None:
    cfg = load_config("configs/ImageNet/resnet50_small_blocks.yaml", [
        "MODEL.WEIGHTS", str(weights), "QUANT.EM_ITERS", str(iters),
        "DATASETS.CALIB", "imagenet_sample_even"])
    task, model = build_task(cfg), build_teacher(cfg).eval()
    order = execution_order(model, task.example_forward)
    plan = build_plan(model, order, QuantRules.from_cfg(cfg.QUANT))
    # The seed the quantizer gives each layer (its index in the whole plan).
    seeds = {layer.name: cfg.SEED * 100003 + index for index, layer in enumerate(plan)}
    plan = [layer for layer in plan if fnmatch.fnmatchcase(layer.name, only)]
    t0 = time.perf_counter()
    grams = capture_grams(cfg, task, model, plan, seeds, n_images)
    print(f"ResNet-50 small blocks, weights {weights}: {len(plan)} layers; Grams captured on the "
          f"dense teacher from {n_images} images in {time.perf_counter() - t0:.1f}s (not timed "
          f"below); {iters} EM iterations at most, {torch.get_num_threads()} threads, "
          f"load average {_load()}")
    fns = {"old": old_em_quantize, "new": em_quantize}
    objectives, totals = [], {}
    print("| layer | kind | N | d | K | " + " | ".join(f"{i} s | {i} iters" for i in impls)
          + f" | objective ({impls[-1]}) | rel. diff |")
    print("|---" * (7 + 2 * len(impls)) + "|")
    for index, layer in enumerate(plan):
        module = model.get_submodule(layer.name)
        weight = module.weight.detach()
        if noise:  # break the exact repeats of a teacher decoded from a codebook
            gen = torch.Generator().manual_seed(seeds[layer.name])
            weight = weight + noise * weight.std() * torch.randn(weight.shape, generator=gen)
        kind, gram = layer_kind(module), grams[layer.name]
        kw = dict(block_size=layer.block_size, n_centroids=layer.n_centroids, n_iter=iters,
                  seed=seeds[layer.name])
        order = impls if index % 2 == 0 else impls[::-1]  # alternate who runs first
        out = {i: _timed(fns[i], weight, gram, **kw) for i in order}
        objs = {i: exact_objective(weight, gram, out[i][0], layer.block_size) for i in impls}
        objectives.append(objs)
        for i in impls:
            t = totals.setdefault((i, kind), [0.0, 0])
            t[0] += out[i][1]
            t[1] += 1
        rel = (objs[impls[-1]] - objs[impls[0]]) / max(abs(objs[impls[0]]), 1e-30)
        print(f"| {layer.name} | {kind} | {layer.n_subvectors} | {layer.block_size} | "
              f"{layer.n_centroids} | "
              + " | ".join(f"{out[i][1]:.2f} | {out[i][0].iterations}" for i in impls)
              + f" | {objs[impls[-1]]:.6g} | {rel:+.2e} |", flush=True)
    sums = _print_totals(totals, impls, len(plan))
    print(f"load average after: {_load()}")
    if len(impls) == 2:
        a, b = impls
        obj_a, obj_b = (sum(o[i] for o in objectives) for i in impls)
        print(f"\nEM wall time {a} {sums[a]:.1f}s, {b} {sums[b]:.1f}s ({sums[a] / sums[b]:.2f}x); "
              f"summed objective (float64, from the returned codes) {a} {obj_a:.8g}, "
              f"{b} {obj_b:.8g}, relative difference {(obj_b - obj_a) / obj_a:+.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", default="layer3.1.conv1")
    p.add_argument("--rows", type=int, default=2048,
                   help="activation sub-vector rows for the brute force")
    p.add_argument("--subvectors", type=int, default=8192)
    p.add_argument("--whole-net", action="store_true")
    p.add_argument("--weights", type=Path, help="dense ResNet-50 state dict (--whole-net)")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--images", type=int, default=8,
                   help="calibration images per Gram (--whole-net)")
    p.add_argument("--layers", default="*", help="glob over layer names (--whole-net)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="add noise * std(W) Gaussian noise to every weight (--whole-net): a "
                        "teacher without the repeated sub-vectors of one decoded from a codebook")
    p.add_argument("--impl", nargs="+", default=["old", "new"], choices=["old", "new"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    setup_logger()
    logging.getLogger("bgd_det").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if not ASSETS.is_dir():
        sys.exit(f"bench_em needs real images and weights in {ASSETS} (absent)")
    os.environ.setdefault("BGD_DATASETS", str(ASSETS))
    if args.whole_net:
        if args.weights is None or not args.weights.is_file():
            print(f"skipped: --whole-net needs --weights, a dense ResNet-50 state dict "
                  f"({args.weights} absent); make it with: python tools/convert_checkpoint.py "
                  f"--from pqf --dense {ASSETS}/peers/pqf/resnet50_large.pth /tmp/r50_dense.pth")
            return
        whole_net(args.weights, args.iters, args.images, args.layers, args.noise, args.impl)
    else:
        one_iteration(args.layer, args.rows, args.subvectors)


if __name__ == "__main__":
    main()
