#!/usr/bin/env python
"""Scoreboard: bgd_det's compressed models against the original BGD and PQF checkpoints.

    BGD_DATASETS=../shared/assets python benchmarks/scoreboard.py \
        --ours r18_large=output/demo_resnet18_large_blocks/model_final.pth [--all] [--output t.md]

    # the frozen protocol (docs/scoreboard.md): seeds of one recipe, calibrated on the odd classes, scored on the
    # even ones, against the peers on the same images
    python benchmarks/scoreboard.py --splits even --only "R18 large,bgd_det" \
        --ours "paper d18=out/s0/model_final.pth,out/s1/model_final.pth,..." --compare "BGD R18 large,PQF R18 large"

All rows are evaluated on the same real images by ``ClassificationTask.evaluate``: by default the 500 odd-class
``imagenet_sample_odd`` images (the even classes are the calibration split of bgd_det's development configs);
``--splits even`` scores the 500 even-class images (the frozen protocol's test split: those configs calibrate on
the odd classes), ``--all`` adds all 1000 ``imagenet_sample`` images (these include calibration images of ours).
Rows: the dense teachers (ResNet-18 from ``teachers/``; ResNet-50 decoded from PQF's ``resnet50_large.pth`` by
:func:`bgd_det.checkpoint.dense_state_dict`, so its function *is* PQF's R50), ``--teacher NAME=ARCH:PATH`` dense state
dicts (e.g. a de-structured teacher), the peers' checkpoints imported by :mod:`bgd_det.checkpoint.peers`, and every ``--ours
NAME=PATH[,PATH...]`` (bgd_det compressed checkpoints; several paths are seeds of one recipe: the row gives the
per-seed top-1, their mean +- sd and, against every row named by ``--compare``, the seed-averaged top-1
difference with a paired bootstrap 95% interval over the images, :mod:`bgd_det.evaluation.protocol`). A
checkpoint whose run scored it on the same images (``tools/quantize_net.py`` saves its report and every image's
top-1 beside ``model_final.pth``) is not evaluated again unless ``--re-evaluate``. Size and ratio come from the one
size function, :func:`bgd_det.quantization.size.model_size`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional


import torch
from tabulate import tabulate

from bgd_det.config import get_cfg
from bgd_det.data.catalog import DatasetCatalog
from bgd_det.engine.pipeline import saved_metrics
from bgd_det.evaluation.protocol import paired_bootstrap, seed_summary
from bgd_det.modeling import build_model, load_weights
from bgd_det.checkpoint import dense_state_dict, import_peer, load_checkpoint_model
from bgd_det.quantization.size import model_size
from bgd_det.tasks.classification import ClassificationTask
from bgd_det.utils.cli import run_tool
from bgd_det.utils.logger import setup_logger

logger = logging.getLogger("bgd_det.scoreboard")

#: (row name, method, path under the assets folder)
PEERS = [
    ("BGD R18 small blocks", "BGD", "peers/bgd/resnet18_small_blocks.pth"),
    ("PQF R18 small blocks", "PQF", "peers/pqf/resnet18.pth"),
    ("BGD R18 large blocks", "BGD", "peers/bgd/resnet18_large_blocks.pth"),
    ("PQF R18 large blocks", "PQF", "peers/pqf/resnet18_large.pth"),
    ("BGD R50 large blocks", "BGD", "peers/bgd/resnet50_large_blocks.pth"),
    ("PQF R50 large blocks", "PQF", "peers/pqf/resnet50_large.pth"),
]
R18_TEACHER = "teachers/resnet18_pqf_small_dense.pth"
#: split -> (short column label, description)
SPLITS = {"imagenet_sample_odd": ("odd", "odd classes"), "imagenet_sample_even": ("even", "even classes"),
          "imagenet_sample": ("all", "all classes")}


def _dense(arch: str, weights) -> torch.nn.Module:
    """Uncompressed ``arch`` with ``weights`` (a state-dict path or an in-memory state dict)."""
    cfg = get_cfg()
    cfg.MODEL.ARCH = arch
    model = build_model(cfg)
    if isinstance(weights, dict):
        model.load_state_dict(weights, strict=True)
    else:
        load_weights(model, arch, weights)
    return model.eval()


def _dense_r50(assets: Path) -> torch.nn.Module:
    pqf_r50, _ = import_peer(str(assets / "peers/pqf/resnet50_large.pth"), "pqf")
    return _dense("resnet50", dense_state_dict(pqf_r50))


def candidates(assets: Path, ours, teachers=()):
    """``(name, method, loaders, checkpoints)`` for every row; a loader builds a model when called (several:
    seeds); ``checkpoints`` are the ``--ours`` paths (empty for the other rows)."""
    rows = [
        ("ResNet-18 dense teacher", "dense", [lambda: _dense("resnet18", str(assets / R18_TEACHER))], []),
        ("ResNet-50 dense (decoded PQF R50)", "dense", [lambda: _dense_r50(assets)], []),
    ]
    for spec in teachers:
        label, _, rest = spec.partition("=")
        arch, _, path = rest.partition(":")
        if not path:
            raise SystemExit(f"--teacher expects NAME=ARCH:PATH, got {spec!r}")
        rows.append((label, "dense", [lambda a=arch, p=path: _dense(a, p)], []))
    for name, method, rel in PEERS:
        rows.append((name, method, [lambda p=str(assets / rel), m=method: import_peer(p, m.lower())[0]], []))
    for spec in ours:
        label, _, paths = spec.partition("=")
        if not paths:
            raise SystemExit(f"--ours expects NAME=PATH[,PATH...], got {spec!r}")
        rows.append((f"bgd_det {label}", "bgd_det",
                     [lambda p=p: load_checkpoint_model(p)[0] for p in paths.split(",")], paths.split(",")))
    return rows


def split_labels(split: str, max_images: int) -> list:
    """The labels of ``split``'s first ``max_images`` images (0: all), in the dataset's order."""
    labels = [label for _, label in DatasetCatalog.get(split).items]
    return labels[:max_images] if max_images else labels


def evaluate(model: torch.nn.Module, split: str, max_images: int, checkpoint: str = "",
             labels: Optional[list] = None) -> dict:
    """Top-1 / top-5 and every image's top-1 hit of ``model`` on ``split``; for a bgd_det ``checkpoint`` whose run
    scored it on the same images (``labels``: :func:`split_labels`), what that run saved
    (:func:`bgd_det.engine.pipeline.saved_metrics`; ``from_run`` says which)."""
    cfg = get_cfg()
    cfg.DATASETS.TEST, cfg.DATASETS.TEST_MAX_IMAGES = split, max_images
    if checkpoint:
        saved = saved_metrics(checkpoint, cfg, labels if labels is not None else split_labels(split, max_images))
        if saved is not None:
            logger.info("%s on %s: the run's own evaluation (%d images)", checkpoint, split, saved["n_images"])
            return {**saved, "from_run": True}
    return {**ClassificationTask(cfg).evaluate(model, per_image=True), "from_run": False}


def main(argv=None) -> list:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--assets",
        default=str(Path(__file__).resolve().parents[2] / "shared/assets"),
        help="offline assets folder (peers/, teachers/, imagenet-sample/)",
    )
    p.add_argument("--ours", action="append", default=[], metavar="NAME=PATH[,PATH...]",
                   help="bgd_det compressed checkpoints, several = seeds of one recipe (repeatable)")
    p.add_argument("--teacher", action="append", default=[], metavar="NAME=ARCH:PATH",
                   help="a dense state dict to add as a row (repeatable)")
    p.add_argument("--compare", default="BGD R18 large,PQF R18 large",
                   help="comma-separated substrings: rows every --ours row is compared with (paired bootstrap; "
                        "both sides seed-averaged)")
    p.add_argument("--splits", default="odd", help="comma-separated: odd, even, all")
    p.add_argument(
        "--all", action="store_true", help="also evaluate on all 1000 imagenet_sample images"
    )
    p.add_argument(
        "--only", default="", help="comma-separated substrings: evaluate only matching rows"
    )
    p.add_argument("--max-images", type=int, default=0, help="cap per split (0: all)")
    p.add_argument("--debug", action="store_true", help="a traceback instead of a one-line error")
    p.add_argument("--re-evaluate", action="store_true",
                   help="evaluate --ours checkpoints even where their run saved its evaluation of the same images")
    p.add_argument(
        "--output", default="", help="also write the table (markdown) and rows (.json) here"
    )
    args = p.parse_args(argv)
    setup_logger()
    assets = Path(args.assets)
    if not (assets / "imagenet-sample").is_dir():
        raise SystemExit(f"assets folder {assets} has no imagenet-sample/ (pass --assets)")
    os.environ.setdefault("BGD_DATASETS", str(assets))
    short = {v[0]: k for k, v in SPLITS.items()}
    splits = [short[x.strip()] for x in args.splits.split(",") if x.strip() in short]
    if not splits:
        raise SystemExit(f"--splits {args.splits!r}; allowed: {', '.join(short)}")
    if args.all and "imagenet_sample" not in splits:
        splits.append("imagenet_sample")
    rows, labels = [], {}
    for name, method, loaders, checkpoints in candidates(assets, args.ours, args.teacher):
        if args.only and not any(s.strip().lower() in name.lower() for s in args.only.split(",")):
            continue
        t0 = time.perf_counter()
        try:
            models = [load() for load in loaders]
        except FileNotFoundError as e:
            if method == "bgd_det":
                raise
            logger.warning("skipping %s: %s", name, e)
            continue
        size = model_size(models[0])
        row = {"model": name, "method": method, "size_mib": size.compressed_mib, "ratio": size.ratio,
               "seeds": len(models)}
        for split in splits:
            saved = [""] * len(models) if args.re_evaluate or not checkpoints else checkpoints
            if any(saved) and split not in labels:  # the image folder is scanned once per split
                labels[split] = split_labels(split, args.max_images)
            per_seed = [evaluate(model, split, args.max_images, ckpt, labels.get(split))
                        for model, ckpt in zip(models, saved)]
            hits = torch.tensor([m["top1_per_image"] for m in per_seed])
            row[split] = {"top1": float(sum(m["top1"] for m in per_seed) / len(per_seed)),
                          "top5": float(sum(m["top5"] for m in per_seed) / len(per_seed)),
                          "n_images": per_seed[0]["n_images"], "top1_per_seed": [m["top1"] for m in per_seed],
                          "top1_sd": seed_summary(hits).sd, "hits": hits.int().tolist(),
                          "from_run": [m["from_run"] for m in per_seed]}
        row["seconds"] = time.perf_counter() - t0
        logger.info("%s: %s", name, json.dumps({k: v for k, v in row.items() if k not in splits}))
        rows.append(row)
        if args.output:  # after every row, so a long run keeps what it measured
            Path(args.output).write_text(format_table(rows, splits, args.compare) + "\n")
            Path(args.output).with_suffix(".json").write_text(json.dumps(rows) + "\n")
    print(format_table(rows, splits, args.compare))
    return rows


def comparisons(rows: list, split: str, compare: str) -> list:
    """``[(ours row, reference row, PairedDifference)]`` for every bgd_det row against every --compare row (a peer,
    or another bgd_det row: an ablation against the recipe it removes something from)."""
    refs = [r for r in rows if any(c.strip().lower() in r["model"].lower() for c in compare.split(",") if c.strip())]
    out = []
    for ours in (r for r in rows if r["method"] == "bgd_det"):
        for ref in refs:
            if ref is ours:
                continue
            diff = paired_bootstrap(torch.tensor(ours[split]["hits"]), torch.tensor(ref[split]["hits"]))
            out.append((ours, ref, diff))
    return out


def format_table(rows: list, splits: list, compare: str = "") -> str:
    headers = ["Model", "Method", "Size (MiB)", "Ratio", "Seeds"]
    for split in splits:
        headers += [f"Top-1 {SPLITS[split][0]} (mean +- sd)", f"Top-5 {SPLITS[split][0]}"]
    headers.append("Images (split)")
    body = []
    for r in rows:
        line = [r["model"], r["method"], f"{r['size_mib']:.2f}", f"{r['ratio']:.1f}x", str(r.get("seeds", 1))]
        for split in splits:
            sd = f" +- {r[split]['top1_sd']:.1f}" if r.get("seeds", 1) > 1 else ""
            line += [f"{r[split]['top1']:.1f}{sd}", f"{r[split]['top5']:.1f}"]
        line.append(" + ".join(f"{r[s]['n_images']} {SPLITS[s][1]} (`{s}`)" for s in splits))
        body.append(line)
    text = tabulate(body, headers, tablefmt="github", disable_numparse=True)
    for split in splits:
        pairs = comparisons(rows, split, compare) if compare else []
        if pairs:
            lines = [[o["model"], ", ".join(f"{v:.1f}" for v in o[split]["top1_per_seed"]), r["model"], str(d)]
                     for o, r, d in pairs]
            text += (f"\n\nTop-1 difference on {SPLITS[split][1]} (`{split}`), points: seed-averaged ours minus the "
                     f"reference, paired bootstrap 95% interval over the images (10000 draws)\n\n")
            text += tabulate(lines, ["Ours", "Top-1 per seed", "Reference", "Difference [95% CI]"],
                             tablefmt="github", disable_numparse=True)
    return text


if __name__ == "__main__":
    run_tool(main)
