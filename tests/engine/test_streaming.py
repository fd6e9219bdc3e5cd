"""Streaming engine (bgd_det/engine/streaming.py): the frontier cache gives the recompute reference's codes."""
import logging

import pytest
import torch

from bgd_det.engine.quantizer import Quantizer
from bgd_det.engine.streaming import RecomputeSource, StreamingSource
from bgd_det.modeling import ARCH_REGISTRY, build_teacher
from bgd_det.modeling.stages import resnet_stages, stage_of_layer
from bgd_det.quantization.capture import capture_second_moments
from bgd_det.quantization.layers import PQ_LAYER_TYPES
from bgd_det.tasks import build_task
from conftest import TinyNet, tiny_cfg

# ResNet-18 at 32x32 on the tiny images: every stage kind (stem, blocks with and without downsample, head),
# the shared metric, refinement with augmented views (MIN_ROWS_PER_COLUMN forces them everywhere), the residual
# target and BatchNorm correction, all of which read the capture source.
RESNET = ["MODEL.ARCH", "resnet18", "QUANT.SKIP", "['conv1', 'layer3.*', 'layer4.*']", "QUANT.METRIC", "shared",
          "QUANT.BLOCK_SIZE.CONV_KXK", 9, "QUANT.N_CENTROIDS", 8, "QUANT.EM_ITERS", 3, "QUANT.REFINE.ROUNDS", 1,
          "QUANT.REFINE.CG_ITERS", 2, "QUANT.REFINE.AUGMENTED_VIEWS", 2, "QUANT.REFINE.MIN_ROWS_PER_COLUMN", 1000,
          "QUANT.REFINE.RESIDUAL", True, "QUANT.CAPTURE_IMAGES", 6, "QUANT.CAPTURE_BATCH_SIZE", 4,
          "QUANT.CAPTURE_ROWS_PER_IMAGE", 64]


def _state(model):
    """Codes, codebooks and BatchNorm statistics of a compressed model."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, PQ_LAYER_TYPES):
            out[name + ".codes"], out[name + ".codebook"] = m.codes, m.codebook.detach()
    out.update({k: v for k, v in model.state_dict().items() if "running" in k})
    return out


def _run(tmp_path, *opts):
    cfg = tiny_cfg(tmp_path, "OUTPUT_DIR", "", *opts)
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    quantizer = Quantizer(cfg, teacher, build_task(cfg))
    return quantizer, quantizer.run()


def _assert_same(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("arch_opts", [[], RESNET], ids=["tiny_net", "resnet18"])
def test_streaming_gives_the_recompute_paths_codes(tiny_images, tmp_path, caplog, arch_opts):
    """With a float32 cache the stage inputs are the tensors the full forward computes, so every code, codebook
    and corrected BatchNorm statistic is bit-identical."""
    with caplog.at_level(logging.INFO, logger="bgd_det.engine.streaming"):
        _, streamed = _run(tmp_path, *arch_opts, "QUANT.ENGINE", "streaming")
    assert "capture engine: streaming over" in caplog.text
    assert "augmented views cached at stage" in caplog.text or not arch_opts
    _, reference = _run(tmp_path, *arch_opts, "QUANT.ENGINE", "recompute")
    _assert_same(_state(streamed.student), _state(reference.student))


def test_spilled_cache_gives_the_same_codes_and_is_removed(tiny_images, tmp_path, caplog):
    spill = tmp_path / "spill"
    spill.mkdir()
    with caplog.at_level(logging.INFO, logger="bgd_det.engine.streaming"):
        _, spilled = _run(tmp_path, *RESNET, "QUANT.STREAM.BUDGET_MB", 0.05, "QUANT.STREAM.SPILL_DIR", str(spill))
    assert "MiB on disk" in caplog.text
    assert list(spill.iterdir()) == []  # the run's spill folder is gone
    _, memory = _run(tmp_path, *RESNET)
    _assert_same(_state(spilled.student), _state(memory.student))


def test_over_budget_without_spill_falls_back_to_recompute(tiny_images, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="bgd_det.engine.streaming"):
        _, fallback = _run(tmp_path, *RESNET, "QUANT.STREAM.BUDGET_MB", 0.3, "QUANT.STREAM.SPILL", False)
    assert "recompute path from here on" in caplog.text or "capture engine: recompute path, because" in caplog.text
    _, memory = _run(tmp_path, *RESNET)
    _assert_same(_state(fallback.student), _state(memory.student))


def test_float16_cache_rounds_the_moments_by_its_precision(tiny_images, tmp_path):
    """fp16 storage rounds every stage input by at most 2^-11 relative: the captured second moments of a layer
    deep in the cache (after two advances) stay within 1e-3 of the float32 cache's."""
    moments = {}
    for dtype in ("float32", "float16"):
        cfg = tiny_cfg(tmp_path, *RESNET, "QUANT.STREAM.DTYPE", dtype)
        torch.manual_seed(0)
        teacher = build_teacher(cfg)
        quantizer = Quantizer(cfg, teacher, build_task(cfg))
        source = quantizer.capture_source(teacher, ["layer2.0.conv1"])
        source.begin_layer("layer2.0.conv1")
        batches, forward = source.plain()
        moments[dtype] = capture_second_moments(teacher, teacher, "layer2.0.conv1", batches, forward)
        assert source.plain_cache.entries[0].student.dtype == getattr(torch, dtype)
        source.close()
    a, b = moments["float32"].ss, moments["float16"].ss
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 1e-3


def test_source_reports_fallback_reasons(tiny_images, tmp_path, caplog):
    """An architecture without stages, or whose stages do not reproduce its forward, is served by recompute."""
    class Shifted(TinyNet):
        def forward(self, x):
            return super().forward(x) + 1.0

    if "tiny_shifted" not in ARCH_REGISTRY:
        @ARCH_REGISTRY.register()
        def tiny_shifted(cfg):
            return Shifted(cfg.MODEL.NUM_CLASSES)

        tiny_shifted.stages = ARCH_REGISTRY.get("tiny_net").stages
    if "tiny_plain" not in ARCH_REGISTRY:
        ARCH_REGISTRY._do_register("tiny_plain", lambda cfg: TinyNet(cfg.MODEL.NUM_CLASSES))
    for arch, why in [("tiny_shifted", "the stages' output differs from the model's forward"),
                      ("tiny_plain", "declares no stages")]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bgd_det.engine.streaming"):
            quantizer, _ = _run(tmp_path, "MODEL.ARCH", arch)
        assert "capture engine: recompute path, because" in caplog.text and why in caplog.text, caplog.text


def test_source_types_and_layer_order(tiny_images, tmp_path):
    cfg = tiny_cfg(tmp_path)
    teacher = build_teacher(cfg)
    quantizer = Quantizer(cfg, teacher, build_task(cfg))
    source = quantizer.capture_source(teacher, ["conv2", "fc"])
    assert isinstance(source, StreamingSource)
    source.begin_layer("fc")
    with pytest.raises(RuntimeError, match="'conv2' runs in stage 'down', which the frontier cache has already "
                                           "passed"):
        source.begin_layer("conv2")
    source.close()
    reference = Quantizer(tiny_cfg(tmp_path, "QUANT.ENGINE", "recompute"), teacher, build_task(cfg))
    assert isinstance(reference.capture_source(teacher, ["conv2"]), RecomputeSource)
    with pytest.raises(ValueError, match="QUANT.ENGINE='stream'; allowed: 'streaming', 'recompute'"):
        Quantizer(tiny_cfg(tmp_path, "QUANT.ENGINE", "stream"), teacher, build_task(cfg))
    with pytest.raises(ValueError, match="QUANT.STREAM.DTYPE='bfloat16'; allowed: 'float32', 'float16'"):
        Quantizer(tiny_cfg(tmp_path, "QUANT.STREAM.DTYPE", "bfloat16"), teacher, build_task(cfg))


def test_resnet_stages_compose_to_the_forward_and_hold_every_layer():
    for arch in ("resnet18", "resnet50", "resnext50_32x4d"):
        model = ARCH_REGISTRY.get(arch)(type("C", (), {"MODEL": type("M", (), {"NUM_CLASSES": 10})})()).eval()
        stages = resnet_stages(model)
        x = torch.randn(2, 3, 64, 64)
        y = x
        with torch.no_grad():
            for stage in stages:
                y = stage.run(model, y)
            assert torch.allclose(y, model(x), atol=1e-5), arch
        names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        order = [stage_of_layer(stages, n) for n in names]
        assert order == sorted(order), arch
    with pytest.raises(ValueError, match="layer 'layer9.conv' runs in 0 stages"):
        stage_of_layer(stages, "layer9.conv")


def test_mask_rcnn_streaming_gives_the_recompute_paths_codes(assets_dir, monkeypatch):
    """The R-CNN stages (body blocks, FPN, RPN on every level, box and mask heads on each model's proposals)
    feed the capture the tensors of the full forward: identical codes and codebooks on real coco-tiny images."""
    from bgd_det.config import load_config

    monkeypatch.setenv("BGD_DATASETS", str(assets_dir))
    opts = ["INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 192, "QUANT.EM_ITERS", 2, "QUANT.CAPTURE_IMAGES", 2,
            "FINETUNE.GLOBAL_ITERS", 0, "OUTPUT_DIR", "",
            "QUANT.SKIP", "['backbone.body.conv1', 'backbone.body.layer2.*', 'backbone.body.layer3.*', "
                          "'backbone.body.layer4.*', 'roi_heads.box_head.fc6']"]
    states = []
    for engine in ("streaming", "recompute"):
        cfg = load_config("configs/COCO/demo_mask_rcnn_coco_tiny.yaml", [str(o) for o in opts + ["QUANT.ENGINE",
                                                                                                 engine]])
        torch.manual_seed(0)
        teacher = build_teacher(cfg)
        quantizer = Quantizer(cfg, teacher, build_task(cfg))
        source = quantizer.capture_source(teacher, [p.name for p in quantizer.make_plan(teacher)])
        assert isinstance(source, StreamingSource if engine == "streaming" else RecomputeSource)
        source.close()
        states.append(_state(quantizer.run().student))
    assert any(k.startswith("rpn.head") for k in states[0]) and any(k.startswith("roi_heads.mask") for k in states[0])
    _assert_same(*states)


@pytest.mark.parametrize("engine", ["streaming", "recompute"])
def test_detector_heads_are_captured_on_the_teachers_proposals(assets_dir, monkeypatch, engine):
    """A student whose RPN differs from the teacher's (so its own proposals would differ) but whose backbone is
    the teacher's: the box head's captured inputs equal the teacher's, because both run on the teacher's
    proposals (before the fix each ran on its own and the paired moments paired different boxes)."""
    import copy

    from bgd_det.config import load_config

    monkeypatch.setenv("BGD_DATASETS", str(assets_dir))
    cfg = load_config("configs/COCO/demo_mask_rcnn_coco_tiny.yaml", [
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192", "QUANT.CAPTURE_IMAGES", "2",
        "QUANT.ENGINE", engine, "OUTPUT_DIR", ""])
    torch.manual_seed(0)
    teacher = build_teacher(cfg).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.rpn.head.cls_logits.weight.normal_()
    quantizer = Quantizer(cfg, teacher, build_task(cfg))
    name = "roi_heads.box_predictor.cls_score"  # 1024 columns: small moments
    source = quantizer.capture_source(student, [name])
    source.begin_layer(name)
    batches, forward = source.plain()
    mom = capture_second_moments(student, teacher, name, list(batches), forward)
    source.close()
    assert torch.equal(mom.ss, mom.tt) and torch.equal(mom.st, mom.tt)
    own = capture_second_moments(student, teacher, name, list(quantizer.plain_pass.batches(quantizer.task)),
                                 quantizer.task.forward)  # each model on its own proposals
    assert not torch.allclose(own.ss, own.tt)


def test_skip_path_first_orders_the_plan_and_streams_like_recompute(tiny_images, tmp_path):
    """QUANT.REFINE.SKIP_PATH_FIRST quantizes layer2.0's downsample before its branch end (whose residual target
    then holds the compressed skip path: test_residual_rules_and_skip_capture); the streaming cache serves that
    order with the recompute path's codes."""
    opts = [*RESNET, "QUANT.REFINE.SKIP_PATH_FIRST", True]
    quantizer, streamed = _run(tmp_path, *opts, "QUANT.ENGINE", "streaming")
    names = [layer.name for layer in quantizer.plan]
    assert names.index("layer2.0.downsample.0") == names.index("layer2.0.conv2") - 1
    assert [n for n in names if "downsample" not in n] == [n for n in quantizer.order if n in names and
                                                           "downsample" not in n]
    _, reference = _run(tmp_path, *opts, "QUANT.ENGINE", "recompute")
    _assert_same(_state(streamed.student), _state(reference.student))
