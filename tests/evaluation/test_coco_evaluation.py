"""COCO data catalog and the COCO evaluator, checked against pycocotools on hand-made predictions."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from bgd_det.data import DatasetCatalog
from bgd_det.data.coco import (CocoInstances, annotations_to_target, label_map, load_coco_api,
                               register_coco_instances)
from bgd_det.evaluation.coco_evaluation import RESULTS_FILE, COCOEvaluator, instances_to_coco_json


def _square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture
def tiny_coco(tmp_path):
    """One 100x80 image, two categories (ids 3 and 7), two objects; returns (json path, image root)."""
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(root / "a.jpg")
    data = {
        "images": [{"id": 5, "file_name": "a.jpg", "height": 80, "width": 100}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 3, "bbox": [10, 10, 50, 50], "area": 2500.0, "iscrowd": 0,
             "segmentation": _square(10, 10, 60, 60)},
            {"id": 2, "image_id": 5, "category_id": 7, "bbox": [70, 5, 20, 30], "area": 600.0, "iscrowd": 0,
             "segmentation": _square(70, 5, 90, 35)},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, root


def _mask(coco, ann_id):
    return torch.from_numpy(coco.annToMask(coco.anns[ann_id])).float()[None]


def _evaluate(coco, outputs, labels_to_cat, output_dir=""):
    ev = COCOEvaluator(coco, labels_to_cat, output_dir=output_dir)
    ev.process({"image_ids": [5]}, [outputs])
    return ev.evaluate()


def test_perfect_and_partial_predictions(tiny_coco, tmp_path):
    path, _ = tiny_coco
    coco = load_coco_api(str(path))
    labels = label_map([3, 7], 3)  # contiguous: 3 -> 1, 7 -> 2
    assert labels == {3: 1, 7: 2}
    to_cat = {v: k for k, v in labels.items()}
    # Object 1: box IoU 1550/2500 = 0.62 (matches at IoU 0.50, 0.55, 0.60 of the ten thresholds); mask exact.
    # Object 2: perfect box and mask.
    out = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 41.0], [70.0, 5.0, 90.0, 35.0]]),
           "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2]),
           "masks": torch.cat([_mask(coco, 1), _mask(coco, 2)])[:, None]}
    m = _evaluate(coco, out, to_cat, output_dir=str(tmp_path / "eval"))
    # box AP = mean over the two categories of (3/10, 10/10); mask AP is 1.0 although box 1 is off: mask AP
    # uses the masks alone (no bbox field in the segm results).
    assert m["box_AP"] == pytest.approx(100 * (0.3 + 1.0) / 2)
    assert m["box_AP50"] == pytest.approx(100.0) and m["box_AP75"] == pytest.approx(50.0)
    assert m["mask_AP"] == pytest.approx(100.0)
    assert m["n_images"] == 1
    saved = json.loads((tmp_path / "eval" / RESULTS_FILE).read_text())
    assert len(saved) == 2 and saved[0]["bbox"] == [10.0, 10.0, 50.0, 31.0] and "counts" in saved[0]["segmentation"]


def test_false_positive_halves_precision(tiny_coco):
    path, _ = tiny_coco
    coco = load_coco_api(str(path))
    to_cat = {1: 3, 2: 7}
    # A higher-scoring false positive of category 3 before the true positive: precision 1/2 at recall 1,
    # so the 101-point interpolated AP of category 3 is 0.5 at every IoU threshold.
    out = {"boxes": torch.tensor([[0.0, 60.0, 10.0, 80.0], [10.0, 10.0, 60.0, 60.0], [70.0, 5.0, 90.0, 35.0]]),
           "scores": torch.tensor([0.95, 0.9, 0.8]), "labels": torch.tensor([1, 1, 2])}
    m = _evaluate(coco, out, to_cat)
    assert m["box_AP"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert "mask_AP" not in m  # no masks in the outputs: segm skipped


def test_no_detections_and_unknown_labels(tiny_coco):
    path, _ = tiny_coco
    coco = load_coco_api(str(path))
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 1, 80, 100)}
    m = _evaluate(coco, empty, {1: 3, 2: 7})
    assert m["box_AP"] == 0.0 and m["mask_AP"] == 0.0
    # a label outside the dataset's categories (torchvision's 91-class gaps) is dropped
    out = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "scores": torch.tensor([0.5]),
           "labels": torch.tensor([12])}
    assert instances_to_coco_json(out, 5, {1: 3, 2: 7}) == []


def test_rle_at_image_resolution_roundtrip():
    mask = torch.zeros(1, 1, 30, 40)
    mask[0, 0, 5:15, 10:30] = 0.9
    out = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 15.0]]), "scores": torch.tensor([0.7]),
           "labels": torch.tensor([1]), "masks": mask}
    (res,) = instances_to_coco_json(out, 1, {1: 4})
    assert res["category_id"] == 4 and res["bbox"] == [10.0, 5.0, 20.0, 10.0]
    assert res["segmentation"]["size"] == [30, 40]
    decoded = mask_util.decode({"size": res["segmentation"]["size"],
                                "counts": res["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded, (mask[0, 0] > 0.5).numpy().astype(np.uint8))


def test_coco_tiny_ground_truth_gives_ap_one(assets_dir, monkeypatch):
    monkeypatch.setenv("BGD_DATASETS", str(assets_dir))
    ds = DatasetCatalog.get("coco_tiny_val")
    labels = ds.label_map(91)  # torchvision's COCO label space (names checked against COCO's)
    assert labels == {c: c for c in ds.cat_ids}
    assert ds.label_map(81) == {c: i + 1 for i, c in enumerate(ds.cat_ids)}  # contiguous
    ev = COCOEvaluator(ds.coco, {v: k for k, v in labels.items()})
    for i in range(len(ds)):
        item = ds[i]
        target = annotations_to_target(item["annotations"], height=item["height"], width=item["width"],
                                       labels=labels)
        n = target["labels"].shape[0]
        ev.process({"image_ids": [item["image_id"]]},
                   [{"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n),
                     "masks": target["masks"][:, None].float()}])
    m = ev.evaluate()
    assert m["n_images"] == 6
    assert m["box_AP"] == pytest.approx(100.0) and m["mask_AP"] == pytest.approx(100.0)


def test_subset_restricts_evaluated_images(tiny_coco, tmp_path):
    path, root = tiny_coco
    data = json.loads(path.read_text())
    data["images"].append({"id": 6, "file_name": "b.jpg", "height": 80, "width": 100})
    data["annotations"].append({"id": 3, "image_id": 6, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100.0,
                                "iscrowd": 0, "segmentation": _square(0, 0, 10, 10)})
    path.write_text(json.dumps(data))
    coco = load_coco_api(str(path))
    out = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0], [70.0, 5.0, 90.0, 35.0]]),
           "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}
    # image 6 was not processed: its missed object must not count.
    assert _evaluate(coco, out, {1: 3, 2: 7})["box_AP"] == pytest.approx(100.0)


# -- catalog and bad input --------------------------------------------------------------------------------------
def test_register_and_load(tiny_coco, tmp_path, monkeypatch):
    path, root = tiny_coco
    monkeypatch.setenv("BGD_DATASETS", str(tmp_path))
    name = "test_tiny_coco_register"
    if name not in DatasetCatalog:
        register_coco_instances(name, "instances.json", "images")
    ds = DatasetCatalog.get(name)
    assert isinstance(ds, CocoInstances) and len(ds) == 1 and ds.cat_ids == [3, 7]
    item = ds[0]
    assert item["image"].shape == (3, 80, 100) and item["image_id"] == 5 and len(item["annotations"]) == 2
    target = annotations_to_target(item["annotations"], height=80, width=100, labels={3: 1, 7: 2})
    assert target["boxes"].tolist() == [[10, 10, 60, 60], [70, 5, 90, 35]]
    assert target["labels"].tolist() == [1, 2] and target["masks"].shape == (2, 80, 100)
    assert int(target["masks"][0].sum()) == 50 * 50  # the 50x50 square polygon, rasterised


def test_bad_input_errors(tiny_coco, tmp_path):
    path, root = tiny_coco
    with pytest.raises(FileNotFoundError, match="COCO annotation file not found: .*missing.json"):
        load_coco_api(str(tmp_path / "missing.json"))
    bad = tmp_path / "corrupt.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_coco_api(str(bad))
    bad.write_text('{"images": []}')
    with pytest.raises(ValueError, match=r"has no \['annotations', 'categories'\]"):
        load_coco_api(str(bad))
    with pytest.raises(FileNotFoundError, match="image folder of dataset 'x' not found"):
        CocoInstances("x", str(path), str(tmp_path / "no_images"))
    with pytest.raises(ValueError, match="category mismatch: the model has 5 classes .* 2 categories with ids 3..7"):
        label_map([3, 7], 5, dataset="tiny")
    with pytest.raises(ValueError, match=r"categories of tiny are not COCO's: \(id, name, COCO name\) "
                                         r"\[\(3, 'cat', 'car'\), \(7, 'dog', 'train'\)\]"):
        label_map([3, 7], 91, dataset="tiny", names={3: "cat", 7: "dog"})
    assert label_map([3, 7], 91, names={3: "car", 7: "train"}) == {3: 3, 7: 7}
    with pytest.raises(KeyError, match="unknown dataset 'coco_2018_val'; registered datasets: .*coco_2017_val"):
        DatasetCatalog.get("coco_2018_val")


def test_degenerate_annotations_are_dropped_on_load_with_a_count(tiny_coco, caplog):
    """An empty segmentation or a 2-point polygon crashed pycocotools only at evaluation, after inference."""
    path, _ = tiny_coco
    data = json.loads(path.read_text())
    good = data["annotations"]
    bad = [dict(good[0], id=10, segmentation=[]),  # empty polygon list
           dict(good[0], id=11, segmentation=[[10, 10, 20, 20]]),  # 2 points
           dict(good[0], id=12, bbox=[10, 10, 0, 5]),  # zero-width box
           dict(good[0], id=13, category_id=99),  # unknown category
           dict(good[1], id=14, segmentation=[[70, 5, 80, 5]] + _square(70, 5, 90, 35))]  # one bad polygon of two
    data["annotations"] = good + bad
    path.write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        coco = load_coco_api(str(path))
    assert sorted(coco.anns) == [1, 2, 14]
    assert coco.anns[14]["segmentation"] == _square(70, 5, 90, 35)
    assert "dropped 4 of 7 annotations" in caplog.text and "2 no polygon of 3 or more points" in caplog.text
    assert "1 unknown category_id" in caplog.text and "1 empty or malformed bbox" in caplog.text
    # The cleaned ground truth evaluates (pycocotools raised on the 2-point polygon before).
    to_cat = {1: 3, 2: 7}
    out = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([1]), "masks": _mask(coco, 1)[None]}
    metrics = _evaluate(coco, out, to_cat)
    assert metrics["mask_AP"] > 0


def test_detections_are_written_before_cocoeval_can_fail(tiny_coco, tmp_path, monkeypatch):
    path, _ = tiny_coco
    coco = load_coco_api(str(path))
    import bgd_det.evaluation.coco_evaluation as ce

    def broken(*args, **kwargs):
        raise RuntimeError("COCOeval failed")

    monkeypatch.setattr(ce, "evaluate_coco_results", broken)
    out = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([1])}
    with pytest.raises(RuntimeError, match="COCOeval failed"):
        _evaluate(coco, out, {1: 3, 2: 7}, output_dir=str(tmp_path / "eval"))
    written = json.loads((tmp_path / "eval" / RESULTS_FILE).read_text())
    assert len(written) == 1 and written[0]["image_id"] == 5 and written[0]["category_id"] == 3


def test_datasets_registered_from_the_config(tiny_coco, tmp_path, monkeypatch, caplog):
    from bgd_det.config import load_config

    path, root = tiny_coco
    data = json.loads(path.read_text())
    data["annotations"][0]["keypoints"] = [20, 20, 2]
    path.write_text(json.dumps(data))
    folder = tmp_path / "mine"
    (folder / "n01440764").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "n01440764" / "a.JPEG", format="PNG")
    monkeypatch.setenv("BGD_DATASETS", str(tmp_path))
    entries = str([["cfg_coco", "coco", path.name, root.name], ["cfg_folder", "imagefolder", "mine"]])
    cfg = load_config("", ["DATASETS.REGISTER", entries, "DATASETS.TEST", "cfg_coco"])
    load_config("", ["DATASETS.REGISTER", entries])  # the same entries again: a no-op
    with caplog.at_level("WARNING"):
        ds = DatasetCatalog.get(cfg.DATASETS.TEST)
    assert len(ds) == 1 and ds.cat_ids == [3, 7] and "keypoints are ignored" in caplog.text
    assert len(DatasetCatalog.get("cfg_folder")) == 1
    bad = [([["x", "lmdb", "a"]], "allowed: [name, 'coco', annotation file, image folder]; [name, 'imagefolder'"),
           ([["x", "coco", "nowhere.json", root.name]], f"'x': annotation file {tmp_path / 'nowhere.json'} not found"),
           ([["cfg_coco", "imagefolder", "mine"]], "dataset 'cfg_coco' is already registered"),
           ([["coco_2017_val", "imagefolder", "mine"]], "dataset 'coco_2017_val' is already registered")]
    for entries, message in bad:
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
            load_config("", ["DATASETS.REGISTER", str(entries)])
    with pytest.raises(ValueError, match=r"MODEL.IMPORT 'my_missing_pkg.nets' cannot be imported"):
        load_config("", ["MODEL.IMPORT", "['my_missing_pkg.nets']"])


def test_agreement_with_the_reference_models_own_detections(tiny_coco):
    from bgd_det.evaluation.coco_evaluation import agreement_with_reference

    path, _ = tiny_coco
    coco = load_coco_api(str(path))
    to_cat = {1: 3, 2: 7}
    teacher = instances_to_coco_json(
        {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0], [70.0, 5.0, 90.0, 35.0], [0.0, 0.0, 5.0, 5.0]]),
         "scores": torch.tensor([0.9, 0.8, 0.2]), "labels": torch.tensor([1, 2, 1]),
         "masks": torch.cat([_mask(coco, 1), _mask(coco, 2), torch.zeros(1, 80, 100)])[:, None]}, 5, to_cat)
    same = agreement_with_reference(coco, teacher, teacher, image_ids=[5])
    # the 0.2-score box is not a reference instance; as a prediction it is a false positive of the lowest score
    assert same["reference_instances"] == 2
    assert same["box_AP_vs_reference"] == pytest.approx(100.0) and same["mask_AP_vs_reference"] == pytest.approx(100.0)
    moved = [dict(r, bbox=[r["bbox"][0] + 20, *r["bbox"][1:]]) if r["category_id"] == 7 else r for r in teacher]
    half = agreement_with_reference(coco, teacher, moved, image_ids=[5], iou_types=("bbox",))
    assert half["box_AP_vs_reference"] == pytest.approx(50.0) and "mask_AP_vs_reference" not in half
    elsewhere = [dict(r, image_id=9) for r in teacher]  # detections on an image outside image_ids are not scored
    assert agreement_with_reference(coco, teacher + elsewhere, moved + elsewhere, image_ids=[5],
                                    iou_types=("bbox",)) == half
    none = agreement_with_reference(coco, teacher, teacher, image_ids=[5], score_threshold=0.95)
    assert none["reference_instances"] == 0 and none["box_AP_vs_reference"] != none["box_AP_vs_reference"]  # NaN


def _both_objects(coco):
    """Detections of tiny_coco's two objects, exact boxes and masks (labels 1 = cat, 2 = dog)."""
    return {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0], [70.0, 5.0, 90.0, 35.0]]),
            "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2]),
            "masks": torch.cat([_mask(coco, 1), _mask(coco, 2)])[:, None]}


def _dog_moved(detections, shift):
    """``detections`` with the dog's box moved ``shift`` px right."""
    moved = dict(detections, boxes=detections["boxes"].clone())
    moved["boxes"][1, [0, 2]] += shift
    return moved


def test_evaluator_with_a_reference_model_adds_its_agreement(tiny_coco):
    """inference_on_dataset runs the reference on the same batch (in eval mode, its training flag given back); the
    evaluator's agreement equals agreement_with_reference on the two lists."""
    from bgd_det.evaluation.evaluator import inference_on_dataset
    from bgd_det.evaluation.coco_evaluation import agreement_with_reference

    path, _ = tiny_coco
    coco = load_coco_api(str(path))
    to_cat = {1: 3, 2: 7}
    teacher = _both_objects(coco)
    student = _dog_moved(teacher, 20.0)  # its mask did not move
    seen = []

    class Fixed(torch.nn.Module):  # a "model" whose output is fixed; it records the mode it was run in
        def __init__(self, output):
            super().__init__()
            self.output = output

        def forward(self, batch):
            seen.append((self.output is teacher, self.training, list(batch["image_ids"])))
            return [self.output]

    model, reference = Fixed(student), Fixed(teacher).train()
    ev = COCOEvaluator(coco, to_cat, reference_score=0.5)
    m = inference_on_dataset(model, [{"image_ids": [5]}], ev, forward=lambda net, batch: net(batch),
                             reference=reference)
    assert seen == [(False, False, [5]), (True, False, [5])] and reference.training and model.training
    want = agreement_with_reference(coco, instances_to_coco_json(teacher, 5, to_cat),
                                    instances_to_coco_json(student, 5, to_cat), image_ids=[5])
    assert m["box_AP_vs_reference"] == pytest.approx(want["box_AP_vs_reference"]) == pytest.approx(50.0)
    assert m["mask_AP_vs_reference"] == pytest.approx(100.0) and m["reference_instances"] == 2
    assert m["box_AP"] == pytest.approx(50.0)  # against the ground truth, as without a reference


def test_detection_seeds_benchmark_rescores_the_kept_detections(tiny_coco, tmp_path, capsys):
    """benchmarks/detection_seeds.py: per-seed AP from each run's predictions, mean +- sd, paired differences."""
    from tests.conftest import load_benchmark

    bench = load_benchmark("detection_seeds")
    path, _ = tiny_coco
    coco = load_coco_api(str(path))
    to_cat = {1: 3, 2: 7}
    teacher = _both_objects(coco)

    def run(name, shift):
        student = _dog_moved(teacher, shift)  # box AP 50 once it misses
        for model, out in (("uncompressed", teacher), ("compressed", student)):
            (tmp_path / name / "predictions" / model).mkdir(parents=True)
            (tmp_path / name / "predictions" / model / RESULTS_FILE).write_text(
                json.dumps(instances_to_coco_json(out, 5, to_cat)))
        (tmp_path / name / "report.json").write_text(json.dumps({"timings": {"layers": 1.0}}))
        return str(tmp_path / name)

    good, bad = [run("g0", 0.0), run("g1", 0.0)], [run("b0", 20.0), run("b1", 0.0)]
    out = bench.main(["--annotations", str(path), "--recipe", "good=" + ",".join(good),
                      "--recipe", "bad=" + ",".join(bad), "--compare", "good"])
    entry = out["sets"]["all 1"]["recipes"]
    assert entry["good"]["box_AP"]["mean"] == pytest.approx(100.0) and entry["good"]["box_AP"]["sd"] == 0.0
    assert [r["box_AP"] for r in entry["bad"]["per_seed"]] == pytest.approx([50.0, 100.0])
    assert entry["bad"]["box_AP"]["of_teacher"] == pytest.approx(0.75)
    assert entry["bad"]["minus_good"]["box_AP"]["per_seed"] == pytest.approx([-50.0, 0.0])
    assert entry["bad"]["box_AP_vs_teacher"]["mean"] == pytest.approx(75.0)
    assert "| bad" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--compare 'worse' is not a recipe"):
        bench.main(["--annotations", str(path), "--recipe", "good=" + good[0], "--compare", "worse"])
