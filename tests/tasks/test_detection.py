"""Mask R-CNN: plan order and the paper's rules (6.65 MiB), compressed forward, save/reload, capture over FPN
levels, distillation / supervised losses, bad input. Randomly initialised models at min_size 320 on CPU."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bgd_det.checkpoint import load_compressed, round_codebooks_to_fp16, save_compressed
from bgd_det.config import load_config
from bgd_det.data import DatasetCatalog
from bgd_det.data.coco import register_coco_instances
from bgd_det.engine.quantizer import Quantizer
from bgd_det.modeling import ARCH_REGISTRY, build_model, build_teacher
from bgd_det.quantization.capture import capture_gram
from bgd_det.quantization.layers import PQConvTranspose2d
from bgd_det.quantization.plan import QuantRules, build_plan
from bgd_det.quantization.pq import split_subvectors
from bgd_det.quantization.size import model_size
from bgd_det.quantization.swap import swap_in_skeleton
from bgd_det.tasks import build_task
from bgd_det.modeling.rcnn import rpn_stage
from bgd_det.tasks.detection import DetectionTask
from conftest import REPO

CONFIG = str(REPO / "configs" / "COCO" / "mask_rcnn_R_50_FPN_small_blocks.yaml")
SMALL = ["MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", 320, "INPUT.MAX_SIZE_TEST", 320,
         "DETECTION.RPN_PRE_NMS_TOPK_TEST", 200, "DETECTION.RPN_POST_NMS_TOPK_TEST", 50,
         "DETECTION.DETECTIONS_PER_IMAGE", 10, "DETECTION.SCORE_THRESH_TEST", 0.0,
         "DETECTION.DISTILL_BOX_PROPOSALS", 32, "DETECTION.DISTILL_MASK_PROPOSALS", 4,
         "QUANT.METRIC", "identity", "QUANT.EM_ITERS", 0, "QUANT.BN_CORRECTION", "none",
         "FINETUNE.GLOBAL_ITERS", 0, "FINETUNE.LAYER_ITERS", 0]


def small_cfg(*extra):
    return load_config(CONFIG, [str(o) for o in SMALL + list(extra)])


def image(seed=0, h=240, w=320):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def cfg():
    return small_cfg()


@pytest.fixture(scope="module")
def teacher(cfg):
    torch.manual_seed(0)
    return build_teacher(cfg).eval()


@pytest.fixture(scope="module")
def quantizer(cfg, teacher):
    return Quantizer(cfg, teacher, build_task(cfg))


@pytest.fixture(scope="module")
def plan(quantizer, teacher):
    return quantizer.make_plan(copy.deepcopy(teacher))


@pytest.fixture(scope="module")
def compressed(teacher, plan):
    """The paper's plan with codebooks drawn from each layer's own sub-vectors and random codes (fast; EM and
    finetuning are covered by the engine tests and the slow end-to-end test)."""
    student = swap_in_skeleton(copy.deepcopy(teacher), plan)
    gen = torch.Generator().manual_seed(0)
    for layer in plan:
        dense = teacher.get_submodule(layer.name).weight.detach()
        pq = student.get_submodule(layer.name)
        points = split_subvectors(dense, layer.block_size)
        codebook = points[torch.randperm(points.shape[0], generator=gen)[: layer.n_centroids]]
        pq.set_quantization(torch.randint(0, layer.n_centroids, pq.codes.shape, generator=gen), codebook)
    round_codebooks_to_fp16(student)
    return student.eval()


def test_registry_and_weights_api():
    for name in ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn"):
        assert ARCH_REGISTRY.get(name).task == "detection"
    import torchvision

    # MODEL.WEIGHTS names resolve through torchvision's weights API (no download here)
    assert len(torchvision.models.get_weight("MaskRCNN_ResNet50_FPN_Weights.COCO_V1").meta["categories"]) == 91
    assert torchvision.models.get_model_weights("maskrcnn_resnet50_fpn_v2").DEFAULT is not None
    with pytest.raises(ValueError, match="category mismatch: MODEL.WEIGHTS .*COCO_V1 has 91 classes but "
                                         "MODEL.NUM_CLASSES is 81"):
        DetectionTask(small_cfg("MODEL.WEIGHTS", "MaskRCNN_ResNet50_FPN_Weights.COCO_V1", "MODEL.NUM_CLASSES", 81))


def test_plan_order_rules_and_paper_size(plan, teacher):
    names = [p.name for p in plan]
    by = {p.name: p for p in plan}
    # execution order: body -> fpn (top-down, inner then layer block) -> rpn -> box head -> mask head
    stages = ["backbone.body.", "backbone.fpn.", "rpn.head.", "roi_heads.box_head.", "roi_heads.box_predictor.",
              "roi_heads.mask_head.", "roi_heads.mask_predictor."]
    stage_of = [next(i for i, s in enumerate(stages) if n.startswith(s)) for n in names]
    assert stage_of == sorted(stage_of) and set(stage_of) == set(range(len(stages)))
    fpn = [n for n in names if n.startswith("backbone.fpn.")]
    assert fpn == [f"backbone.fpn.{kind}_blocks.{i}.0" for i in (3, 2, 1, 0) for kind in ("inner", "layer")]
    assert names[0] == "backbone.body.layer1.0.conv1" and names[-1] == "roi_heads.mask_predictor.conv5_mask"
    assert names[-10:-5] == ["rpn.head.conv.0.0", "roi_heads.box_head.fc6", "roi_heads.box_head.fc7",
                             "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"]
    for skipped in ("backbone.body.conv1", "rpn.head.cls_logits", "rpn.head.bbox_pred",
                    "roi_heads.mask_predictor.mask_fcn_logits"):
        assert skipped not in by
    assert len(plan) == 70
    # per-module rules
    assert (by["roi_heads.box_head.fc6"].block_size, by["roi_heads.box_head.fc6"].n_centroids) == (16, 256)
    assert (by["backbone.body.layer1.0.conv1"].block_size, by["backbone.body.layer1.0.conv1"].n_centroids) == (4, 128)
    conv5 = by["roi_heads.mask_predictor.conv5_mask"]
    assert (conv5.block_size, conv5.n_centroids) == (4, 256)
    assert by["backbone.body.layer2.0.conv2"].block_size == 9 and by["backbone.fpn.inner_blocks.0.0"].block_size == 4
    assert by["roi_heads.box_predictor.cls_score"].block_size == 4 and by["rpn.head.conv.0.0"].block_size == 9
    assert all(p.n_centroids == 256 for p in plan if p.name != "backbone.body.layer1.0.conv1")
    # the paper's size: sizes do not depend on weights, so empty codebook layers give the final size
    size = model_size(swap_in_skeleton(copy.deepcopy(teacher), plan))
    assert size.dense_mib == pytest.approx(169.58, abs=0.01)
    assert size.compressed_mib == pytest.approx(6.65, abs=0.01)
    assert size.ratio == pytest.approx(25.5, abs=0.05)


def test_frozen_bn_counts_like_batchnorm(plan, cfg):
    # torchvision keeps FrozenBatchNorm2d's affine in buffers: it must cost as much as BatchNorm2d's parameters
    torch.manual_seed(0)
    plain = build_model(small_cfg("DETECTION.FROZEN_BN", False))
    assert not any(type(m).__name__ == "FrozenBatchNorm2d" for m in plain.modules())
    frozen = build_model(cfg)
    a, b = model_size(swap_in_skeleton(plain, plan)), model_size(swap_in_skeleton(frozen, plan))
    assert a.compressed_bytes == b.compressed_bytes and a.dense_bytes == b.dense_bytes


def test_unknown_module_in_override(plan, teacher, quantizer):
    order = ["backbone.body.conv1"] + [p.name for p in plan] + ["rpn.head.cls_logits", "rpn.head.bbox_pred",
                                                                 "roi_heads.mask_predictor.mask_fcn_logits"]
    assert build_plan(teacher, order, QuantRules.from_cfg(small_cfg().QUANT)) == plan
    rules = QuantRules.from_cfg(small_cfg("QUANT.OVERRIDES", "[['roi_heads.box_head.fc8', 'BLOCK_SIZE', 16]]").QUANT)
    with pytest.raises(ValueError, match=r"'roi_heads.box_head.fc8' matches no quantizable module; near matches: "
                                         r".*roi_heads.box_head.fc"):
        build_plan(teacher, order, rules)


def test_transposed_conv_quantized_with_identity_metric_under_shared(plan, teacher):
    """The default QUANT.METRIC ('shared') quantizes the mask predictor's ConvTranspose2d with plain k-means (no
    input metric applies to it); an unknown metric fails before any layer is quantized."""
    shared = small_cfg("QUANT.METRIC", "shared", "QUANT.EM_ITERS", 2)
    quantizer = Quantizer(shared, teacher, build_task(shared))
    index = [p.name for p in plan].index("roi_heads.mask_predictor.conv5_mask")
    student = copy.deepcopy(teacher)
    record = quantizer.quantize_layer(student, plan[index], index)
    assert record.name == "roi_heads.mask_predictor.conv5_mask"
    assert isinstance(student.roi_heads.mask_predictor.conv5_mask, PQConvTranspose2d)
    with pytest.raises(ValueError, match="QUANT.METRIC='gram'; allowed: 'shared', 'centered', 'identity'"):
        small_cfg("QUANT.METRIC", "gram")  # refused when the config loads


def test_capture_sees_every_fpn_level_of_the_shared_rpn_conv(teacher, cfg):
    task = DetectionTask(cfg)
    batch = {"images": [image(1)]}
    acc = capture_gram(teacher, "rpn.head.conv.0.0", [batch], task.forward, block_size=9)
    with torch.no_grad():
        stage = rpn_stage(teacher, batch["images"])
    positions = sum(f.shape[-2] * f.shape[-1] for f in stage.features.values())
    assert len(stage.features) == 5
    assert acc.n_rows == positions * (256 * 9 // 9)  # every position of every level, 256 sub-vectors per row


def test_compressed_forward_save_reload_identical(compressed, cfg, tmp_path):
    size = model_size(compressed)
    assert size.compressed_mib == pytest.approx(6.65, abs=0.01)
    conv5 = compressed.roi_heads.mask_predictor.conv5_mask
    assert isinstance(conv5, PQConvTranspose2d)
    x = torch.randn(2, 256, 14, 14)
    ref = F.conv_transpose2d(x, conv5.decoded_weight(), conv5.bias, stride=2)
    assert torch.allclose(conv5(x), ref, atol=1e-5)

    images = [image(2), image(3, 320, 240)]
    with torch.no_grad():
        before = compressed(images)
    assert all(len(o["boxes"]) == 10 and o["masks"].shape[1:] == (1,) + tuple(im.shape[1:])
               for o, im in zip(before, images))
    path = tmp_path / "model_final.pth"
    save_compressed(str(path), compressed, arch=cfg.MODEL.ARCH, num_classes=cfg.MODEL.NUM_CLASSES)
    reloaded = load_compressed(str(path), cfg=cfg)
    assert type(reloaded.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"
    with torch.no_grad():
        after = reloaded(images)
    for a, b in zip(before, after):
        for key in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(a[key], b[key]), key
    assert model_size(reloaded).compressed_bytes == size.compressed_bytes


def _targets(images):
    out = []
    for im in images:
        h, w = im.shape[1:]
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 20:120, 30:150] = 1
        masks[1, 100:200, 150:300] = 1
        out.append({"boxes": torch.tensor([[30.0, 20.0, 150.0, 120.0], [150.0, 100.0, 300.0, 200.0]]),
                    "labels": torch.tensor([1, 18]), "masks": masks})
    return out


@pytest.fixture
def small_inputs(teacher):
    """The teacher at min_size 160 for the loss tests (its transform is restored afterwards)."""
    saved = teacher.transform.min_size, teacher.transform.max_size
    teacher.transform.min_size, teacher.transform.max_size = (160,), 160
    try:
        yield teacher
    finally:
        teacher.transform.min_size, teacher.transform.max_size = saved


def test_distill_and_supervised_losses(compressed, small_inputs, cfg):
    teacher = small_inputs
    batch = {"images": [image(4)]}
    task = DetectionTask(cfg)
    same = task.distill_loss(teacher, teacher, batch)
    assert float(same) == pytest.approx(0.0, abs=1e-5)
    assert set(task.last_terms) == {"distill_rpn_obj", "distill_rpn_box", "distill_cls", "distill_box",
                                    "distill_mask"}
    student = copy.deepcopy(compressed)
    student.transform.min_size, student.transform.max_size = (160,), 160
    for p in student.parameters():
        p.requires_grad_(True)
    loss = task.distill_loss(student, teacher, batch)
    assert float(loss.detach()) > 0 and all(v >= -1e-6 for v in task.last_terms.values())
    loss.backward()
    for name in ("backbone.body.layer1.0.conv1", "backbone.fpn.layer_blocks.0.0", "rpn.head.conv.0.0",
                 "roi_heads.box_head.fc6", "roi_heads.mask_head.3.0", "roi_heads.mask_predictor.conv5_mask"):
        grad = student.get_submodule(name).codebook.grad
        assert grad is not None and grad.abs().sum() > 0, name

    both = DetectionTask(small_cfg("DETECTION.LOSS", "both"))
    student.zero_grad()
    student.roi_heads.fg_bg_sampler.batch_size_per_image = 64  # sampled RoIs per image (512 by default)
    batch["targets"] = _targets(batch["images"])
    loss = both.distill_loss(student, teacher, batch)
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask",
            "distill_cls"} <= set(both.last_terms)
    assert torch.isfinite(loss)
    loss.backward()
    assert student.roi_heads.mask_predictor.conv5_mask.codebook.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="DETECTION.LOSS='supervised' needs annotated calibration batches"):
        DetectionTask(small_cfg("DETECTION.LOSS", "supervised")).distill_loss(student, teacher,
                                                                             {"images": batch["images"]})
    with pytest.raises(ValueError, match="DETECTION.LOSS='labels'; allowed"):
        DetectionTask(small_cfg("DETECTION.LOSS", "labels"))
    with pytest.raises(ValueError, match="FINETUNE.MIXUP_ALPHA=0.2; allowed for detection: 0"):
        DetectionTask(small_cfg("FINETUNE.MIXUP_ALPHA", 0.2))


def test_category_mismatch_between_checkpoint_and_dataset(compressed, cfg, tmp_path, monkeypatch):
    root = tmp_path / "toy" / "images"
    root.mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "a.jpg")
    (tmp_path / "toy" / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 64, "width": 64}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": []}))
    monkeypatch.setenv("BGD_DATASETS", str(tmp_path))
    if "test_toy_two_classes" not in DatasetCatalog:
        register_coco_instances("test_toy_two_classes", "toy/ann.json", "toy/images")
    task = DetectionTask(small_cfg("DATASETS.TEST", "test_toy_two_classes"))
    with pytest.raises(ValueError, match="category mismatch: the model uses torchvision's 91 COCO classes .* "
                                         "categories of test_toy_two_classes are not COCO's: .*'person'"):
        task.evaluate(compressed)
    # a dense state dict with another number of classes
    sd = {"roi_heads.box_predictor.cls_score.weight": torch.zeros(3, 1024)}
    torch.save(sd, tmp_path / "teacher.pth")
    with pytest.raises(ValueError, match="category mismatch: MODEL.WEIGHTS .*teacher.pth has 3 classes"):
        DetectionTask(small_cfg("MODEL.WEIGHTS", str(tmp_path / "teacher.pth")))


def test_quantize_net_and_eval_coco_on_coco_tiny(assets_dir, tmp_path, monkeypatch):
    """tools/quantize_net.py then tools/eval_coco.py on coco-tiny (a few layers, short settings)."""
    import subprocess
    import sys

    from conftest import load_tool

    monkeypatch.setenv("BGD_DATASETS", str(assets_dir))
    root = REPO
    demo = str(root / "configs" / "COCO" / "demo_mask_rcnn_coco_tiny.yaml")
    few = str([["backbone.body.*", "SKIP", True], ["backbone.body.layer1.0.conv1", "N_CENTROIDS", 128],
               ["roi_heads.box_head.fc6", "BLOCK_SIZE", 16], ["backbone.body.layer4.2.conv3", "SKIP", False]])
    opts = ["INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "224", "QUANT.EM_ITERS", "2",
            "QUANT.CAPTURE_IMAGES", "2", "FINETUNE.GLOBAL_ITERS", "1", "DATASETS.TEST_MAX_IMAGES", "2",
            "QUANT.OVERRIDES", few, "OUTPUT_DIR", str(tmp_path)]
    subprocess.run([sys.executable, str(root / "tools" / "quantize_net.py"), "--config", demo, *opts], check=True,
                   cwd=root)
    tool = load_tool("eval_coco")
    seen = {}  # the teacher each evaluation ran: its parameters
    evaluate = DetectionTask.evaluate

    def recording(self, model, **kwargs):
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        seen.setdefault(kwargs.get("desc", ""), []).append(flat)
        return evaluate(self, model, **kwargs)

    monkeypatch.setattr(DetectionTask, "evaluate", recording)
    args = tool.default_argument_parser().parse_args(
        ["--config", demo, *opts, "MODEL.WEIGHTS", str(tmp_path / "model_final.pth")])
    result = tool.main(args)
    # another SEED on the command line: the random teacher is still the one the checkpoint was compressed from
    tool.main(tool.default_argument_parser().parse_args(
        ["--config", demo, *opts, "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"), "SEED", "7",
         "OUTPUT_DIR", str(tmp_path / "seed7")]))
    teachers = seen["uncompressed on coco_tiny_val"]
    assert len(teachers) == 2 and torch.equal(teachers[0], teachers[1])
    rows = result["rows"]
    assert set(rows) == {"uncompressed", "compressed"}
    assert rows["uncompressed"]["n_images"] == 2 and "mask_AP" in rows["compressed"]
    assert rows["compressed"]["size_mib"] < rows["uncompressed"]["size_mib"]
    # the label-free figure against the teacher's own detections, and the flag for a teacher that finds nothing
    assert "teacher_instances" in rows["compressed"] and "box_AP_vs_teacher" in rows["compressed"]
    assert rows["uncompressed"]["box_AP"] < 1.0 and "warning: the teacher's box AP is" in result["table"]
    assert (tmp_path / "eval_coco" / "compressed" / "coco_instances_results.json").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    # the teacher is re-created from SEED by eval_coco: same AP as measured while compressing
    assert rows["uncompressed"]["box_AP"] == pytest.approx(report["metrics"]["uncompressed"]["box_AP"])
    # quantize_net ran the teacher beside the student: the same agreement figure, and both models' detections kept
    assert report["metrics"]["compressed"]["reference_instances"] == rows["compressed"]["teacher_instances"]
    assert report["metrics"]["compressed"]["box_AP_vs_reference"] == pytest.approx(
        rows["compressed"]["box_AP_vs_teacher"], abs=0.5, nan_ok=True)
    for model in ("uncompressed", "compressed"):
        assert (tmp_path / "predictions" / model / "coco_instances_results.json").is_file()
    # as deployed: through the compiled CPU ops with FrozenBatchNorm folded, the same AP
    deployed = tool.main(tool.default_argument_parser().parse_args(
        ["--config", demo, *opts, "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"), "TEST.EVAL_TEACHER", "False",
         "TEST.COMPILED_OP", "True", "TEST.FOLD_BN", "True", "OUTPUT_DIR", str(tmp_path / "deployed")]))["rows"]
    assert set(deployed) == {"compressed"}
    for key in ("box_AP", "mask_AP"):
        assert deployed["compressed"][key] == pytest.approx(rows["compressed"][key], abs=0.5), key


def test_a_classification_dataset_given_to_a_detector_is_one_clear_error(tiny_images):
    task = DetectionTask(small_cfg("DATASETS.TEST", "imagenet_sample_odd"))
    with pytest.raises(ValueError, match="'imagenet_sample_odd' is a ImageList, not a COCO instances dataset"):
        task.test_loader()
