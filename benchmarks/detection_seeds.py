#!/usr/bin/env python
"""Seeds of detection recipes side by side, rescored from the detections ``tools/quantize_net.py`` keeps.

    python benchmarks/detection_seeds.py --annotations $DATA/composite/test/annotations.json \
        --recipe "A=out/A_s0,out/A_s1,out/A_s2" --recipe "B=out/B_s0,out/B_s1,out/B_s2" --compare A \
        --held-out-from 50 --output docs/detection_seeds.json

Every run directory is a ``quantize_net`` ``OUTPUT_DIR`` (``predictions/{uncompressed,compressed}``,
``report.json``). For each image set (all test images; with ``--held-out-from N`` also the images after the first
N in the dataset's order, for when the first N were looked at while choosing a setting) it gives the teacher's and
every run's box / mask AP, the compressed model's AP against the teacher's own detections (score >= 0.5), per recipe
the mean +- sd over seeds with a Student-t 95% interval and the fraction of the teacher's AP, and against
``--compare`` the per-seed paired difference (runs paired in the order given: the same seed) with its interval.
The images are fixed: the intervals are over seeds only (:mod:`bgd_det.evaluation.protocol`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Dict, List, Sequence

from tabulate import tabulate

from bgd_det.data.coco import load_coco_api
from bgd_det.evaluation.coco_evaluation import RESULTS_FILE, agreement_with_reference, evaluate_coco_results
from bgd_det.evaluation.protocol import summarize
from bgd_det.utils.logger import setup_logger

logger = logging.getLogger("bgd_det.detection_seeds")

KEYS = ("box_AP", "mask_AP", "box_AP_vs_teacher", "mask_AP_vs_teacher")


def _detections(run: str, model: str) -> List[Dict]:
    path = os.path.join(run, "predictions", model, RESULTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {run!r} is not a quantize_net OUTPUT_DIR with predictions")
    with open(path) as f:
        return json.load(f)


def score(coco, teacher: Sequence[Dict], detections: Sequence[Dict], image_ids: Sequence[int]) -> Dict[str, float]:
    """Box / mask AP (percent) of ``detections`` on ``image_ids`` and their AP against ``teacher``'s detections."""
    out = {f"{p}_AP": evaluate_coco_results(coco, detections, iou_type=t, image_ids=image_ids)["AP"]
           for p, t in (("box", "bbox"), ("mask", "segm"))}
    agree = agreement_with_reference(coco, teacher, detections, image_ids=image_ids)
    out.update(box_AP_vs_teacher=agree["box_AP_vs_reference"], mask_AP_vs_teacher=agree["mask_AP_vs_reference"])
    return out


def main(argv: Sequence[str] | None = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="the test set's COCO instances json")
    parser.add_argument("--recipe", action="append", required=True, metavar="NAME=DIR[,DIR...]",
                        help="a recipe's run directories, one per seed (repeatable)")
    parser.add_argument("--compare", default="", help="the recipe every other one is compared with, seed by seed")
    parser.add_argument("--held-out-from", type=int, default=0, metavar="N",
                        help="also score the images after the first N (the dataset's order)")
    parser.add_argument("--output", default="", help="json file for every number")
    args = parser.parse_args(argv)
    setup_logger(name="bgd_det")
    logging.getLogger("bgd_det.evaluation.coco_evaluation").setLevel(logging.WARNING)

    recipes: Dict[str, List[str]] = {}
    for spec in args.recipe:
        name, sep, dirs = spec.partition("=")
        if not sep or not dirs:
            raise SystemExit(f"--recipe {spec!r}; allowed: NAME=DIR[,DIR...]")
        recipes[name] = dirs.split(",")
    if args.compare and args.compare not in recipes:
        raise SystemExit(f"--compare {args.compare!r} is not a recipe; recipes: {list(recipes)}")
    coco = load_coco_api(args.annotations)
    ids = sorted(coco.imgs)
    if not 0 <= args.held_out_from < len(ids):
        raise SystemExit(f"--held-out-from {args.held_out_from}; allowed: 0 .. {len(ids) - 1} ({len(ids)} images)")
    sets = {f"all {len(ids)}": ids}
    if args.held_out_from:
        sets[f"images {args.held_out_from}-{len(ids) - 1}"] = ids[args.held_out_from:]

    first = next(iter(recipes.values()))[0]
    teacher = _detections(first, "uncompressed")
    result: Dict = {"annotations": args.annotations, "recipes": recipes, "sets": {}}
    for set_name, image_ids in sets.items():
        teacher_ap = score(coco, teacher, teacher, image_ids)
        runs = {name: [score(coco, teacher, _detections(d, "compressed"), image_ids) for d in dirs]
                for name, dirs in recipes.items()}
        rows = [["teacher", "-"] + [f"{teacher_ap[k]:.2f}" for k in KEYS[:2]] + ["-", "-"]]
        summary: Dict = {"teacher": teacher_ap, "recipes": {}}
        for name, scores in runs.items():
            entry = {"per_seed": scores}
            cells = [name, len(scores)]
            for k in KEYS:
                s = summarize([r[k] for r in scores])
                low, high = s.interval()
                entry[k] = {"mean": s.mean, "sd": s.sd, "interval": [low, high]}
                cell = f"{s.mean:.2f} +- {s.sd:.2f} [{low:.2f}, {high:.2f}]"
                if k in ("box_AP", "mask_AP"):
                    entry[k]["of_teacher"] = s.mean / teacher_ap[k]
                    cell += f" ({100 * s.mean / teacher_ap[k]:.1f}%)"
                cells.append(cell)
            if args.compare and name != args.compare:
                base = runs[args.compare]
                if len(base) != len(scores):
                    raise SystemExit(f"{name} has {len(scores)} runs and {args.compare} {len(base)}: the paired "
                                     f"comparison needs one run of each per seed")
                entry["minus_" + args.compare] = {}
                for k in KEYS[:2]:
                    d = summarize([a[k] - b[k] for a, b in zip(scores, base)])
                    entry["minus_" + args.compare][k] = {"per_seed": list(d.values), "mean": d.mean, "sd": d.sd,
                                                         "interval": list(d.interval())}
            summary["recipes"][name] = entry
            rows.append(cells)
        result["sets"][set_name] = summary
        print(f"\n## {set_name} test images (mean +- sd over seeds [Student-t 95% interval] (of the teacher))\n")
        print(tabulate(rows, headers=["model", "seeds", *KEYS], tablefmt="github", disable_numparse=True))
        for name, entry in summary["recipes"].items():
            diff = entry.get("minus_" + args.compare)
            if diff:
                print(f"\n{name} - {args.compare}, paired by seed: " + "; ".join(
                    f"{k} {v['mean']:+.2f} +- {v['sd']:.2f} [{v['interval'][0]:+.2f}, {v['interval'][1]:+.2f}] "
                    f"(per seed {', '.join(f'{x:+.2f}' for x in v['per_seed'])})" for k, v in diff.items()))
    for name, dirs in recipes.items():  # wall times, from the reports
        times = [json.load(open(os.path.join(d, "report.json")))["timings"] for d in dirs]
        result.setdefault("timings", {})[name] = times
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
