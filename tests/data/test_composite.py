"""The composite detection set (bgd_det/data/composite.py) and the detection teacher's training
(bgd_det/engine/detector_training.py)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from bgd_det.data.coco import CocoInstances, annotations_to_target
from bgd_det.data.composite import Instance, load_sources, make_composite, shared_categories, source_instances
from bgd_det.engine.detector_training import TrainSettings, _lr_factor, from_int8, int8_state_dict, load_backbone


def _instances():
    """Two synthetic objects: a red square (category 1) and a green disc (category 2)."""
    square = Instance(1, np.full((20, 20, 3), (255, 0, 0), np.uint8), np.ones((20, 20), bool), "a#1")
    yy, xx = np.mgrid[:30, :30]
    disc = Instance(2, np.full((30, 30, 3), (0, 255, 0), np.uint8), (yy - 15) ** 2 + (xx - 15) ** 2 < 200, "b#2")
    return [square, disc]


def _backgrounds(tmp_path, n=3):
    paths = []
    for i in range(n):
        path = tmp_path / f"bg{i}.png"
        Image.fromarray(np.full((60, 90, 3), 40 * i, np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _write(tmp_path, name, seed=0, n=6):
    return make_composite(_instances(), _backgrounds(tmp_path), str(tmp_path / name),
                          categories={1: "square", 2: "disc"}, n_images=n, seed=seed, size=96, max_objects=3,
                          quality=95)


def test_composite_annotations_match_the_pasted_pixels(tmp_path):
    path = _write(tmp_path, "set")
    data = json.load(open(path))
    assert [c["id"] for c in data["categories"]] == [1, 2] and len(data["images"]) == 6
    assert data["annotations"], "no object was pasted"
    ds = CocoInstances("set", path, str(tmp_path / "set" / "images"))
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        assert max(item["height"], item["width"]) == 96
        masks = [mask_util.decode(a["segmentation"]).astype(bool) for a in item["annotations"]]
        for a, m in zip(item["annotations"], masks):
            ys, xs = np.nonzero(m)
            assert a["bbox"] == pytest.approx([xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
            assert a["area"] == m.sum()
            rgb = (item["image"].permute(1, 2, 0).numpy() * 255)[m].mean(0)
            expected = (255, 0, 0) if a["category_id"] == 1 else (0, 255, 0)  # the visible pixels are the object's
            assert np.abs(rgb - expected).max() < 40
            seen.add(a["category_id"])
        if len(masks) > 1:  # a later object hides what it covers: visible masks never overlap
            assert np.stack(masks).sum(0).max() == 1
        target = annotations_to_target(item["annotations"], height=item["height"], width=item["width"],
                                       labels=ds.label_map(3))
        assert target["masks"].shape[0] == len(masks)
    assert seen == {1, 2}


def test_composite_is_seeded(tmp_path):
    a, b, c = (json.load(open(_write(tmp_path, n, seed=s))) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    assert a["annotations"] == b["annotations"] and a["annotations"] != c["annotations"]
    assert (tmp_path / "a/images/000001.jpg").read_bytes() == (tmp_path / "b/images/000001.jpg").read_bytes()


def test_composite_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_images=0 with 3 backgrounds"):
        make_composite(_instances(), _backgrounds(tmp_path), str(tmp_path / "x"), categories={1: "a"}, n_images=0,
                       seed=0)
    with pytest.raises(ValueError, match=r"no source instance of categories \[7\]"):
        make_composite(_instances(), _backgrounds(tmp_path), str(tmp_path / "x"), categories={7: "a"}, n_images=1,
                       seed=0)
    with pytest.raises(ValueError, match="half=2; allowed: 0"):
        source_instances(load_sources([], []), half=2)


def test_source_halves_share_no_image(assets_dir):
    root = assets_dir / "coco-tiny"
    files = [str(root / "annotations" / f"instances_{s}2017.json") for s in ("train", "val")]
    folders = [str(root / "images" / f"{s}2017") for s in ("train", "val")]
    sources = load_sources(files, folders)
    train, test = (source_instances(sources, half=h) for h in (0, 1))
    assert {sources.names[c] for c in (1, 3, 47, 84)} == {"person", "car", "cup", "book"}
    images = [{i.source.split("#")[0] for i in half} for half in (train, test)]
    assert images[0] and images[1] and not images[0] & images[1]
    assert shared_categories(train, test) == [1, 3, 47, 84]  # person, car, cup, book
    for inst in train:  # cropped to the mask: its outer rows and columns hold mask pixels
        rows, cols = inst.mask.any(1), inst.mask.any(0)
        assert rows[0] and rows[-1] and cols[0] and cols[-1] and inst.rgb.shape[:2] == inst.mask.shape


def test_int8_round_trip():
    gen = torch.Generator().manual_seed(0)
    state = {"conv.weight": torch.randn(8, 3, 3, 3, generator=gen), "bn.running_var": torch.rand(8, generator=gen),
             "step": torch.tensor(3)}
    packed = int8_state_dict(state)
    assert packed["conv.weight"].dtype == torch.int8 and packed["conv.weight@scale"].shape == (8,)
    back = from_int8(packed)
    assert back.keys() == state.keys()
    assert torch.equal(back["bn.running_var"], state["bn.running_var"]) and torch.equal(back["step"], state["step"])
    err = (back["conv.weight"] - state["conv.weight"]).abs().flatten(1).amax(1)
    assert torch.all(err <= packed["conv.weight@scale"] / 2 + 1e-7)


def test_lr_schedule():
    s = TrainSettings(iters=100, warmup=10)
    assert _lr_factor(0, s) == pytest.approx(0.1) and _lr_factor(9, s) == 1.0 and _lr_factor(69, s) == 1.0
    assert _lr_factor(70, s) == pytest.approx(0.1) and _lr_factor(95, s) == pytest.approx(0.01)


def test_train_detector_runs_and_keeps_the_stem_frozen(tmp_path, monkeypatch):
    """Two supervised iterations on a synthetic composite: finite losses, layer2+ moves, the stem and layer1 not."""
    from torchvision.models import resnet50

    from bgd_det.config import load_config
    from bgd_det.engine.detector_training import train_detector
    from bgd_det.modeling import build_model
    from bgd_det.tasks import build_task

    path = _write(tmp_path, "set", n=4)
    monkeypatch.setenv("BGD_DATASETS", str(tmp_path))
    cfg = load_config("", ["MODEL.ARCH", "maskrcnn_resnet50_fpn", "MODEL.NUM_CLASSES", 3, "MODEL.WEIGHTS", "",
                           "DETECTION.LOSS", "supervised", "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96,
                           "DATASETS.REGISTER", [["toy", "coco", path, str(tmp_path / "set" / "images")]],
                           "DATASETS.CALIB", "toy", "DATASETS.TEST", "toy", "DATALOADER.NUM_WORKERS", 0])
    torch.manual_seed(0)
    model = build_model(cfg)
    backbone = resnet50().state_dict()
    load_backbone(model, backbone)
    assert torch.equal(model.backbone.body.layer3[0].conv2.weight, backbone["layer3.0.conv2.weight"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = train_detector(model, build_task(cfg), TrainSettings(iters=2, batch_size=2, lr=0.01, warmup=1,
                                                                log_period=1))
    assert len(log) == 2 and all(np.isfinite(row["loss"]) for row in log)
    after = model.state_dict()
    assert torch.equal(after["backbone.body.layer1.0.conv1.weight"], before["backbone.body.layer1.0.conv1.weight"])
    assert torch.equal(after["backbone.body.conv1.weight"], before["backbone.body.conv1.weight"])
    assert not torch.equal(after["backbone.body.layer2.0.conv1.weight"], before["backbone.body.layer2.0.conv1.weight"])
    with pytest.raises(ValueError, match="backbone state dict lacks"):
        load_backbone(model, {k: v for k, v in backbone.items() if not k.startswith("layer4")})
