#!/usr/bin/env python
"""Scoreboard: bgd_det's compressed models against the original BGD and PQF checkpoints.

    BGD_DATASETS=../shared/assets python benchmarks/scoreboard.py \
        --ours r18_large=output/demo_resnet18_large_blocks/model_final.pth [--all] [--output t.md]

All rows are evaluated on the same real images by ``ClassificationTask.evaluate``: the 500 odd-class
``imagenet_sample_odd`` images (even classes are the calibration split of bgd_det's demo configs)
and, with ``--all``, also all 1000 ``imagenet_sample`` images (these include the calibration images
of ours: not a held-out number for ours). Rows: the dense teachers (ResNet-18 from ``teachers/``;
ResNet-50 decoded from PQF's ``resnet50_large.pth`` by :func:`bgd_det.peers.dense_state_dict`, so
its function *is* PQF's R50), the peers' checkpoints imported by :mod:`bgd_det.peers`, and every
``--ours NAME=PATH`` (a bgd_det compressed checkpoint). Size and ratio come from the one size
function, :func:`bgd_det.quantization.size.model_size`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from bgd_det.config import get_cfg  # noqa: E402
from bgd_det.modeling import build_model, load_weights  # noqa: E402
from bgd_det.peers import dense_state_dict, import_peer, load_checkpoint_model  # noqa: E402
from bgd_det.quantization.size import model_size  # noqa: E402
from bgd_det.tasks.classification import ClassificationTask  # noqa: E402
from bgd_det.utils.logger import setup_logger  # noqa: E402

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
SPLITS = {"imagenet_sample_odd": ("odd", "odd classes"), "imagenet_sample": ("all", "all classes")}


def _dense(arch: str, weights) -> torch.nn.Module:
    """Uncompressed ``arch`` with ``weights`` (a state-dict path or an in-memory state dict)."""
    cfg = get_cfg()
    cfg.MODEL.ARCH = arch
    model = build_model(cfg, load=False)
    if isinstance(weights, dict):
        model.load_state_dict(weights, strict=True)
    else:
        load_weights(model, arch, weights)
    return model.eval()


def _dense_r50(assets: Path) -> torch.nn.Module:
    pqf_r50, _ = import_peer(str(assets / "peers/pqf/resnet50_large.pth"), "pqf")
    return _dense("resnet50", dense_state_dict(pqf_r50))


def candidates(assets: Path, ours):
    """``(name, method, loader)`` for every row; a loader builds the model when called."""
    rows = [
        ("ResNet-18 dense teacher", "dense", lambda: _dense("resnet18", str(assets / R18_TEACHER))),
        ("ResNet-50 dense (decoded PQF R50)", "dense", lambda: _dense_r50(assets)),
    ]
    for name, method, rel in PEERS:
        rows.append(
            (name, method, lambda p=str(assets / rel), m=method: import_peer(p, m.lower())[0])
        )
    for spec in ours:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--ours expects NAME=PATH, got {spec!r}")
        rows.append((f"bgd_det {label}", "bgd_det", lambda p=path: load_checkpoint_model(p)[0]))
    return rows


def evaluate(model: torch.nn.Module, split: str, max_images: int) -> dict:
    cfg = get_cfg()
    cfg.DATASETS.TEST, cfg.DATASETS.TEST_MAX_IMAGES = split, max_images
    return ClassificationTask(cfg).evaluate(model)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--assets",
        default=str(Path(__file__).resolve().parents[2] / "shared/assets"),
        help="offline assets folder (peers/, teachers/, imagenet-sample/)",
    )
    p.add_argument(
        "--ours",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a bgd_det compressed checkpoint to add (repeatable)",
    )
    p.add_argument(
        "--all", action="store_true", help="also evaluate on all 1000 imagenet_sample images"
    )
    p.add_argument(
        "--only", default="", help="comma-separated substrings: evaluate only matching rows"
    )
    p.add_argument("--max-images", type=int, default=0, help="cap per split (0: all)")
    p.add_argument(
        "--output", default="", help="also write the table (markdown) and rows (.json) here"
    )
    args = p.parse_args(argv)
    setup_logger()
    assets = Path(args.assets)
    if not (assets / "imagenet-sample").is_dir():
        raise SystemExit(f"assets folder {assets} has no imagenet-sample/ (pass --assets)")
    os.environ.setdefault("BGD_DATASETS", str(assets))
    splits = ["imagenet_sample_odd"] + (["imagenet_sample"] if args.all else [])
    rows = []
    for name, method, load in candidates(assets, args.ours):
        if args.only and not any(s.strip().lower() in name.lower() for s in args.only.split(",")):
            continue
        t0 = time.perf_counter()
        try:
            model = load()
        except FileNotFoundError as e:
            if method == "bgd_det":
                raise
            logger.warning("skipping %s: %s", name, e)
            continue
        size = model_size(model)
        row = {
            "model": name,
            "method": method,
            "size_mib": size.compressed_mib,
            "ratio": size.ratio,
        }
        for split in splits:
            m = evaluate(model, split, args.max_images)
            row[split] = {"top1": m["top1"], "top5": m["top5"], "n_images": m["n_images"]}
        row["seconds"] = time.perf_counter() - t0
        logger.info("%s: %s", name, json.dumps(row))
        rows.append(row)
        if args.output:  # after every row, so a long run keeps what it measured
            Path(args.output).write_text(format_table(rows, splits) + "\n")
            Path(args.output).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(format_table(rows, splits))
    return rows


def format_table(rows: list, splits: list) -> str:
    headers = ["Model", "Method", "Size (MiB)", "Ratio"]
    for split in splits:
        headers += [f"Top-1 {SPLITS[split][0]}", f"Top-5 {SPLITS[split][0]}"]
    headers.append("Images (split)")
    body = []
    for r in rows:
        line = [r["model"], r["method"], f"{r['size_mib']:.2f}", f"{r['ratio']:.1f}x"]
        for split in splits:
            line += [f"{r[split]['top1']:.1f}", f"{r[split]['top5']:.1f}"]
        line.append(" + ".join(f"{r[s]['n_images']} {SPLITS[s][1]} (`{s}`)" for s in splits))
        body.append(line)
    return tabulate(body, headers, tablefmt="github", disable_numparse=True)


if __name__ == "__main__":
    main()
