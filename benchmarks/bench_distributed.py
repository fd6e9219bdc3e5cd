#!/usr/bin/env python
"""Wall time of capture + EM + a fixed number of finetuning steps for ResNet-18, in 1 and in N CPU processes.

Runs the Quantizer (every layer: activation capture -> EM -> BatchNorm correction -> layer-wise distillation;
then global finetuning) on the real ResNet-18 teacher and imagenet-sample images, once in this process and once
under ``launch`` with ``--processes`` gloo processes. Prints per-phase wall times, the ratio, the CPU seconds of
all processes together, the machine's load average, and how many codes the two runs share. Capture uses every
input position and no augmentation, so the N-process data is exactly the 1-process data.

    BGD_DATASETS=../shared/assets python benchmarks/bench_distributed.py [--processes 2] [--images 16]

On a machine with C cores, 1 process uses C threads and N processes use C/N threads each: the comparison is at
equal cores, so the ratio shows what sharding the data buys minus what communication costs.
"""
import argparse
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

from bgd_det.config import load_config
from bgd_det.engine import quantizer as quantizer_mod
from bgd_det.engine.distributed import build_collectives
from bgd_det.engine.launch import launch
from bgd_det.modeling import build_teacher
from bgd_det.quantization.layers import PQ_LAYER_TYPES
from bgd_det.tasks import build_task
from bgd_det.utils import comm
from bgd_det.utils.logger import setup_logger

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
TEACHER = ASSETS / "teachers" / "resnet18_pqf_small_dense.pth"
PHASES = (("capture_gram", "capture"), ("em_quantize", "EM"), ("correct_bn", "BN correction"),
          ("distill", "finetuning (all steps)"))
logger = logging.getLogger("bgd_det.bench_distributed")


def _timed(phases, name, fn):
    """``fn`` that adds its wall time to ``phases[name]`` (bench-only instrumentation of the Quantizer)."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] += time.perf_counter() - t0

    return wrapper


def job(opts, output_dir: str, threads: int = 0) -> dict:
    """Capture + EM + finetuning of ResNet-18 in every process; returns rank 0's times and the codes."""
    setup_logger(output_dir if comm.get_world_size() > 1 else "", rank=comm.get_rank())
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    # The paper's recipe on the base config (Gram metric, no output-space refinement), so the figures do not
    # move with the demo config's recipe.
    cfg = load_config(str(ROOT / "configs/ImageNet/resnet18_large_blocks.yaml"),
                      ["MODEL.WEIGHTS", str(TEACHER), "OUTPUT_DIR", output_dir, *opts])
    torch.manual_seed(cfg.SEED)
    phases = defaultdict(float)
    patched = [(quantizer_mod, n) for n in ("capture_gram", "em_quantize", "distill")]
    patched.append((quantizer_mod.Quantizer, "correct_bn"))
    originals = [(owner, n, getattr(owner, n)) for owner, n in patched]
    for owner, n, fn in originals:
        setattr(owner, n, _timed(phases, n, fn))
    try:
        teacher, task = build_teacher(cfg), build_task(cfg)
        comm.synchronize()
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = quantizer_mod.Quantizer(cfg, teacher, task, collectives=build_collectives(cfg)).run()
        comm.synchronize()
        total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        threads = torch.get_num_threads()
    finally:
        for owner, n, fn in originals:
            setattr(owner, n, fn)
        torch.set_num_threads(threads_before)
    codes = {n: m.codes.clone() for n, m in result.student.named_modules() if isinstance(m, PQ_LAYER_TYPES)}
    rel_error = sum(r.rel_error for r in result.records) / len(result.records)
    return {"total": total, "cpu": sum(comm.all_gather(cpu)), "phases": dict(phases), "codes": codes,
            "rel_error": rel_error, "threads": threads, "world": comm.get_world_size()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--images", type=int, default=16, help="capture images per layer")
    p.add_argument("--em-iters", type=int, default=5)
    p.add_argument("--layer-iters", type=int, default=1, help="layer-wise distillation steps per layer")
    p.add_argument("--global-iters", type=int, default=4, help="global finetuning steps")
    p.add_argument("--batch-size", type=int, default=8, help="finetuning batch (split over processes)")
    p.add_argument("--output-dir", default="./output/bench_distributed")
    args = p.parse_args()
    if not TEACHER.is_file():
        print(f"skipped: {TEACHER} is absent (offline assets folder)")
        return
    os.environ.setdefault("BGD_DATASETS", str(ASSETS))
    setup_logger()
    opts = ["DATASETS.CALIB", "imagenet_sample_even", "DATASETS.TEST", "imagenet_sample_odd",
            "QUANT.BN_CORRECTION", "mean_var", "FINETUNE.GLOBAL_LR", 0.0001,
            "QUANT.CAPTURE_IMAGES", args.images, "QUANT.CAPTURE_BATCH_SIZE", 8, "QUANT.CAPTURE_ROWS_PER_IMAGE", 0,
            "QUANT.EM_ITERS", args.em_iters, "FINETUNE.LAYER_ITERS", args.layer_iters,
            "FINETUNE.GLOBAL_ITERS", args.global_iters, "FINETUNE.BATCH_SIZE", args.batch_size,
            "FINETUNE.AUGMENT", False]
    opts = [str(o) for o in opts]
    n = args.processes
    configs = [("1 process", 1, 0), ("1 proc, 1 thread", 1, 1), (f"{n} processes", n, 0)]
    runs = []
    for label, procs, threads in configs:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        run = launch(job, procs, args=(opts, os.path.join(args.output_dir, f"np{procs}t{threads}"), threads),
                     backend="gloo")
        run.update(launch=time.perf_counter() - t0, load=load)
        runs.append(run)

    print(f"\nResNet-18, {args.images} capture images/layer (all positions), EM {args.em_iters} iters, "
          f"{args.layer_iters} layer-wise step(s)/layer, {args.global_iters} global steps, batch {args.batch_size}; "
          f"{len(os.sched_getaffinity(0))} cores, torch {torch.__version__}")
    print(f"{'':32}" + "".join(f"{label:>18}" for label, _, _ in configs) + f"{'ratio 1/3':>11}{'ratio 2/3':>11}")
    rows = [("threads per process", "threads", "{:18d}"), ("capture (s)", "capture_gram", "{:18.1f}"),
            ("EM (s)", "em_quantize", "{:18.1f}"), ("BN correction (s)", "correct_bn", "{:18.1f}"),
            ("finetuning, all steps (s)", "distill", "{:18.1f}"), ("total in job (s)", "total", "{:18.1f}"),
            ("launch incl. process start (s)", "launch", "{:18.1f}"), ("CPU s, all processes", "cpu", "{:18.1f}"),
            ("load average (1 min) at start", "load", "{:18.1f}"), ("mean rel. weight error", "rel_error", "{:18.4f}")]
    for label, key, fmt in rows:
        values = [r[key] if key in r else r["phases"].get(key, 0.0) for r in runs]
        ratios = "".join(f"{v / values[-1]:11.2f}" for v in values[:2]) if isinstance(values[0], float) else ""
        print(f"{label:32}" + "".join(fmt.format(v) for v in values) + ratios)
    total = sum(c.numel() for c in runs[0]["codes"].values())
    for i, j in ((0, 2), (1, 2), (0, 1)):  # 0 vs 1: the same data, only the thread count (float order) differs
        a, b = runs[i]["codes"], runs[j]["codes"]
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        agree = sum(int((a[k] == b[k]).sum()) for k in a)
        print(f"codes, {configs[i][0]} vs {configs[j][0]}: {len(a) - len(differ)}/{len(a)} layers identical "
              f"(first differing: {differ[0] if differ else '-'}), {100.0 * agree / total:.2f}% of all codes equal")
    for i in (0, 1):
        print(f"speed-up of {configs[2][0]} over {configs[i][0]} (total in job): "
              f"{runs[i]['total'] / runs[2]['total']:.2f}x")


if __name__ == "__main__":
    main()
