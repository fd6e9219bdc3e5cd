"""The one checkpoint loader: errors that say what to do, and rebuilding with the recorded config."""
import pytest
import torch

from bgd_det.checkpoint import load_compressed, save_compressed
from bgd_det.modeling import build_model


def test_weights_api_offline_and_peer_checkpoint_errors(tmp_path, monkeypatch):
    """A torchvision weights name that cannot be fetched, and a non-bgd_det checkpoint: one-line errors that
    say what to do."""
    import urllib.error

    import torchvision

    from bgd_det.modeling.weights import load_weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(OSError, match=r"MODEL.WEIGHTS=ResNet18_Weights.IMAGENET1K_V1: could not fetch "
                                      r"https://download.pytorch.org/.*point MODEL.WEIGHTS at a local state dict"):
        load_weights(torchvision.models.resnet18(), "resnet18", "ResNet18_Weights.IMAGENET1K_V1")
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="is not a bgd_det compressed checkpoint .*tools/convert_checkpoint.py"):
        load_compressed(str(tmp_path / "other.pth"))


def test_load_compressed_rebuilds_with_the_recorded_config(tmp_path):
    """A detector compressed at 160 px / 300 proposals / FrozenBatchNorm eps 0 reloads so, in both loaders; a cfg
    passed by the caller overrides the recorded one."""
    from bgd_det.config import load_config

    cfg = load_config("", ["MODEL.ARCH", "fasterrcnn_resnet50_fpn", "MODEL.NUM_CLASSES", 3, "INPUT.MIN_SIZE_TEST", 160,
                           "DETECTION.RPN_POST_NMS_TOPK_TEST", 300, "DETECTION.FROZEN_BN_EPS", 0.0])
    model = build_model(cfg)
    path = str(tmp_path / "det.pth")
    save_compressed(path, model, arch=cfg.MODEL.ARCH, num_classes=3, config=cfg.dump())
    for loaded in (load_compressed(path), load_compressed(path, inference=True)):
        assert loaded.transform.min_size == (160,) and loaded.rpn._post_nms_top_n["testing"] == 300
        assert loaded.backbone.body.bn1.eps == 0.0 and loaded.roi_heads.box_predictor.cls_score.out_features == 3
    override = load_config("", ["INPUT.MIN_SIZE_TEST", 200])
    assert load_compressed(path, cfg=override).transform.min_size == (200,)
