"""ImageNet-style folders: both layouts, class indices from imagenet_class_index.json, errors."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from bgd_det.data import DatasetCatalog
from bgd_det.data.imagenet import scan_image_folder

WNIDS = ["n01440764", "n01443537", "n09999999"]  # tench (0), goldfish (1), one not in the index below


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype("uint8")).save(path, format="PNG")


def _index(folder):
    index = {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"], "7": ["n01514668", "cock"]}
    (folder / "imagenet_class_index.json").write_text(json.dumps(index))


def test_image_folder_uses_the_class_index_in_bgd_datasets(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BGD_DATASETS", str(tmp_path))
    for wnid in ("n01514668", "n01440764"):
        _image(tmp_path / "imagenet" / "val" / wnid / "a.JPEG")
    # no index: sorted positions, with a warning (a subset of ImageNet would get the wrong labels)
    log = logging.getLogger("bgd_det.data.imagenet")
    log.addHandler(caplog.handler)  # direct: setup_logger stops bgd_det records from reaching the root logger
    try:
        items = scan_image_folder(str(tmp_path / "imagenet" / "val"))
    finally:
        log.removeHandler(caplog.handler)
    assert [label for _, label in items] == [0, 1]
    assert "2 wnids and no imagenet_class_index.json" in caplog.text
    # the index in $BGD_DATASETS (where the sample folder keeps it) serves imagenet/val too
    _index(tmp_path)
    assert [label for _, label in DatasetCatalog.get("imagenet_val").items] == [0, 7]


def test_flat_sample_layout_and_unknown_wnids(tmp_path, monkeypatch):
    monkeypatch.setenv("BGD_DATASETS", str(tmp_path))
    _index(tmp_path)
    for wnid, label in zip(WNIDS[:2], ("tench", "goldfish")):
        _image(tmp_path / "imagenet-sample" / f"{wnid}_{label}.JPEG")
    assert [label for _, label in DatasetCatalog.get("imagenet_sample").items] == [0, 1]
    assert [label for _, label in DatasetCatalog.get("imagenet_sample_odd").items] == [1]
    _image(tmp_path / "imagenet-sample" / f"{WNIDS[2]}_x.JPEG")
    with pytest.raises(ValueError, match=r"wnids \['n09999999'\] are not in the class index"):
        scan_image_folder(str(tmp_path / "imagenet-sample"))
    with pytest.raises(FileNotFoundError, match="dataset folder not found: .*imagenet/train"):
        DatasetCatalog.get("imagenet_train")


def test_num_workers_automatic_and_errors(monkeypatch):
    from bgd_det.data import num_workers

    assert num_workers(3) == 3 and num_workers(0) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert num_workers(-1) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert num_workers(-1) == 8
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert num_workers(-1) == 3
    with pytest.raises(ValueError, match=r"DATALOADER.NUM_WORKERS=-2; allowed: -1 \(automatic\)"):
        num_workers(-2)


def test_an_unreadable_image_is_named(tiny_images):
    bad = tiny_images / "n00000002_img2.JPEG"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    ds = DatasetCatalog.get("imagenet_sample_even")
    index = [p for p, _ in ds.items].index(str(bad))
    with pytest.raises(ValueError, match=r"unreadable image .*n00000002_img2.JPEG .*remove or replace the file"):
        ds[index]
