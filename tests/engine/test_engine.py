"""End-to-end engine on a tiny network and real image files: quantize, resume, checkpoint round trip, report."""
import json
import os
import re

import pytest
import torch

from bgd_det.checkpoint import load_compressed, read_compressed, save_compressed
from bgd_det.data.catalog import DatasetCatalog
from bgd_det.engine.pipeline import FINAL_CHECKPOINT, quantize_and_report, saved_metrics
from bgd_det.engine.quantizer import PROGRESS_FILE, Quantizer, QuantizerHook
from bgd_det.modeling import build_teacher
from bgd_det.quantization.layers import PQ_LAYER_TYPES
from bgd_det.tasks import build_task
from bgd_det.tasks.classification import ClassificationTask
from conftest import tiny_cfg


class Interrupt(Exception):
    pass


def _codes(model):
    return {n: (m.codes.clone(), m.codebook.detach().clone()) for n, m in model.named_modules()
            if isinstance(m, PQ_LAYER_TYPES)}


@pytest.mark.parametrize("mixup", [0.0, 1.0])
def test_resume_gives_same_codes_as_uninterrupted_run(tiny_images, tmp_path, mixup):
    extra = ["FINETUNE.LAYER_ITERS", 2, "FINETUNE.GLOBAL_ITERS", 2, "FINETUNE.MIXUP_ALPHA", mixup]
    torch.manual_seed(0)
    teacher = build_teacher(tiny_cfg(tmp_path / "a", *extra))
    full = Quantizer(tiny_cfg(tmp_path / "a", *extra), teacher, build_task(tiny_cfg(tmp_path / "a", *extra))).run()

    cfg = tiny_cfg(tmp_path / "b", *extra)

    class StopAfterTwo(QuantizerHook):
        def after_layer(self, quantizer, index, record):
            if index == 1:
                raise Interrupt

    class Done(QuantizerHook):
        def __init__(self):
            self.indices = []

        def after_layer(self, quantizer, index, record):
            self.indices.append(index)

    with pytest.raises(Interrupt):
        Quantizer(cfg, teacher, build_task(cfg), output_dir=cfg.OUTPUT_DIR, hooks=[StopAfterTwo()]).run()
    assert os.path.isfile(tmp_path / "b" / PROGRESS_FILE)
    done = Done()
    resumed = Quantizer(cfg, teacher, build_task(cfg), output_dir=cfg.OUTPUT_DIR, hooks=[done]).run(resume=True)
    done = done.indices
    assert done == [2, 3]  # layers 0 and 1 came from the progress file
    a, b = _codes(full.student), _codes(resumed.student)
    assert list(a) == ["conv1", "conv2", "conv3", "fc"] == list(b)
    for name in a:
        assert torch.equal(a[name][0], b[name][0]), name
        assert torch.allclose(a[name][1], b[name][1], atol=1e-6), name


@pytest.mark.parametrize("key,value,message", [
    ("QUANT.METRIC", "gram", "QUANT.METRIC='gram'; allowed: 'shared', 'centered', 'identity'"),
    ("QUANT.REFINE.ROUNDS", -1, "QUANT.REFINE.ROUNDS=-1; allowed: an integer >= 0"),
    ("QUANT.REFINE.TARGET", "student", "QUANT.REFINE.TARGET='student'; allowed: 'teacher', 'weights'"),
    ("QUANT.REFINE.DAMPING_METRIC", "full", "QUANT.REFINE.DAMPING_METRIC='full'; allowed: 'identity', 'diagonal'"),
    ("QUANT.REFINE.AUGMENTED_VIEWS", -1, "QUANT.REFINE.AUGMENTED_VIEWS=-1; allowed: an integer >= 0"),
    ("QUANT.REFINE.DAMPING", -0.5, "QUANT.REFINE.DAMPING=-0.5, DAMPING_PER_COLUMN=0.0; allowed: numbers >= 0"),
    ("QUANT.BN_CORRECTION", "full", "QUANT.BN_CORRECTION='full'; allowed: 'mean_var', 'mean', 'none'"),
    ("FINETUNE.BN", "running", "FINETUNE.BN='running'; allowed: 'affine', 'frozen', 'stats', 'train'"),
    ("QUANT.EM_RESAMPLE_IMAGES", -1, "QUANT.EM_RESAMPLE_IMAGES=-1 with QUANT.METRIC='shared'; allowed: 0, or an integer > 0"),
    ("QUANT.K_CLAMP", "lte", "QUANT.K_CLAMP='lte'; allowed: 'le', 'lt'"),
    ("FINETUNE.TEMPERATURE", 0.0, "FINETUNE.TEMPERATURE=0.0; allowed: a number > 0"),
    ("FINETUNE.OPTIMIZER", "lbfgs", "FINETUNE.OPTIMIZER='lbfgs'; allowed: adam, sgd"),
    ("FINETUNE.CENTROID_GRAD", "max", "FINETUNE.CENTROID_GRAD='max'; allowed: sum, mean"),
    ("FINETUNE.LR_SCHEDULE", "poly", "FINETUNE.LR_SCHEDULE='poly'; allowed: constant, step, cosine"),
    ("FINETUNE.LR_MILESTONES", "[0.6, 0.3]", "FINETUNE.LR_MILESTONES=[0.6, 0.3]; allowed: increasing fractions"),
    ("FINETUNE.GLOBAL_EPOCHS", -1.0, "FINETUNE.GLOBAL_EPOCHS=-1.0; allowed: a number >= 0"),
    ("FINETUNE.FEATURE_LAYERS", "['layer9']", "FINETUNE.FEATURE_LAYERS: no module 'layer9' in TinyNet"),
    # plan rules and dataset names: they used to fail only after the teacher's evaluation
    ("QUANT.OVERRIDES", '[["conv9", "BLOCK_SIZE", 4]]', "'conv9'"),
    ("QUANT.BLOCK_SIZE.LINEAR", 7, "block size 7"),
    ("QUANT.MAX_UNQUANTIZED", 1.5, "QUANT.MAX_UNQUANTIZED=1.5; allowed: a fraction in [0, 1]"),
    ("DATASETS.TEST", "imagenet_sample_odd_typo", "unknown dataset DATASETS.TEST 'imagenet_sample_odd_typo'"),
])
def test_bad_settings_fail_before_the_teacher_is_evaluated(tiny_images, tmp_path, monkeypatch, key, value, message):
    """Checked when the Quantizer is built: FINETUNE.BN used to fail only after every layer was quantized."""
    def evaluate(*args, **kwargs):
        raise AssertionError("the teacher was evaluated before the settings were checked")

    monkeypatch.setattr(ClassificationTask, "evaluate", evaluate)
    with pytest.raises((ValueError, KeyError), match=re.escape(message)):
        quantize_and_report(tiny_cfg(tmp_path, key, value))


def test_resume_refuses_a_different_plan(tiny_images, tmp_path):
    cfg = tiny_cfg(tmp_path)
    teacher = build_teacher(cfg)
    Quantizer(cfg, teacher, build_task(cfg), output_dir=cfg.OUTPUT_DIR).run()
    other = tiny_cfg(tmp_path, "QUANT.N_CENTROIDS", 8)
    with pytest.raises(ValueError, match="different plan"):
        Quantizer(other, teacher, build_task(other), output_dir=other.OUTPUT_DIR).run(resume=True)


def test_resume_refuses_other_settings_with_the_keys_named(tiny_images, tmp_path):
    cfg = tiny_cfg(tmp_path)
    teacher = build_teacher(cfg)
    Quantizer(cfg, teacher, build_task(cfg), output_dir=cfg.OUTPUT_DIR).run()
    for key, value, shown in (("SEED", 3, "SEED 0 -> 3"), ("QUANT.EM_ITERS", 9, "QUANT.EM_ITERS 5 -> 9"),
                              ("QUANT.METRIC", "identity", "QUANT.METRIC 'shared' -> 'identity'")):
        other = tiny_cfg(tmp_path, key, value)
        with pytest.raises(ValueError, match=re.escape(shown)):
            Quantizer(other, teacher, build_task(other), output_dir=other.OUTPUT_DIR).run(resume=True)
    same = tiny_cfg(tmp_path, "QUANT.ENGINE", "recompute", "FINETUNE.EVAL_PERIOD", 3,  # exempt: same result
                    "FINETUNE.GLOBAL_ITERS", 1)  # and a finished layer stage may be finetuned otherwise
    Quantizer(same, teacher, build_task(same), output_dir=same.OUTPUT_DIR).run(resume=True)
    weights = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), weights)
    moved = tiny_cfg(tmp_path / "w", "MODEL.WEIGHTS", str(weights))
    Quantizer(moved, teacher, build_task(moved), output_dir=moved.OUTPUT_DIR).run()
    with torch.no_grad():
        teacher.fc.bias.add_(1.0)
    torch.save(teacher.state_dict(), weights)  # another teacher in the same file
    with pytest.raises(ValueError, match=r"MODEL.WEIGHTS sha256:\w+ -> sha256:\w+"):
        Quantizer(moved, teacher, build_task(moved), output_dir=moved.OUTPUT_DIR).run(resume=True)


def test_pipeline_checkpoint_roundtrip_and_report(tiny_images, tmp_path):
    cfg = tiny_cfg(tmp_path, "FINETUNE.GLOBAL_ITERS", 2)
    out = quantize_and_report(cfg)
    student = out["result"].student
    for m in student.modules():  # BN running statistics must survive the checkpoint
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "model_rt.pth"
    save_compressed(str(path), student, arch="tiny_net", num_classes=10)
    raw = torch.load(path, weights_only=True)
    assert raw["model"]["conv2.codes"].dtype == torch.uint8
    assert raw["model"]["conv2.codebook"].dtype == torch.float16
    reloaded = load_compressed(str(path))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(student.eval()(x), reloaded(x))
    for name in ("report.md", "report.json", "layer_sizes.png", "model_final.pth"):
        assert os.path.isfile(tmp_path / name), name
    text = open(tmp_path / "report.md").read()
    assert "| compressed" in text and "| uncompressed" in text and "top1" in text
    assert out["metrics"]["compressed"]["n_images"] == 10
    assert out["metrics"]["compressed"]["kl_to_reference"] >= 0.0  # measured against the teacher
    assert 0.0 <= out["metrics"]["compressed"]["top1_agreement"] <= 100.0
    for model in ("uncompressed", "compressed"):  # both evaluations keep their raw predictions
        saved = json.loads((tmp_path / "predictions" / model / "predictions.json").read_text())
        assert len(saved["top1"]) == len(saved["label"]) == 10


def test_bad_checkpoints(tmp_path, tiny_images):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_compressed(str(bad))
    with pytest.raises(FileNotFoundError, match="compressed checkpoint not found"):
        read_compressed(str(tmp_path / "missing.pth"))
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="not a bgd_det compressed checkpoint"):
        read_compressed(str(tmp_path / "plain.pth"))
    cfg = tiny_cfg(tmp_path)
    res = Quantizer(cfg, build_teacher(cfg), build_task(cfg)).run()
    save_compressed(str(tmp_path / "ok.pth"), res.student, arch="resnet18", num_classes=10)
    with pytest.raises(ValueError, match="do not exist in the model"):
        load_compressed(str(tmp_path / "ok.pth"))
    # a truncated file: nothing of the original is lost, the error is one line
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_compressed(str(tmp_path / "trunc.pth"))


def test_non_finite_models_are_refused_with_the_tensor_named(tiny_images, tmp_path):
    cfg = tiny_cfg(tmp_path / "a")
    torch.manual_seed(0)
    result = Quantizer(cfg, build_teacher(cfg), build_task(cfg)).run()
    path = str(tmp_path / "ok.pth")
    save_compressed(path, result.student, arch="tiny_net", num_classes=10)
    load_compressed(path)  # a finite model loads
    with torch.no_grad():
        result.student.conv2.codebook[3, 0] = float("nan")
    save_compressed(path, result.student, arch="tiny_net", num_classes=10)
    for inference in (False, True):
        with pytest.raises(FloatingPointError, match=r"conv2.codebook holds non-finite values"):
            load_compressed(path, inference=inference)
    with torch.no_grad():
        result.student.conv2.codebook[3, 0] = 0.0
        result.student.bn2.running_var[0] = -1.0
    save_compressed(path, result.student, arch="tiny_net", num_classes=10)
    with pytest.raises(FloatingPointError, match=r"bn2.running_var holds negative variances"):
        load_compressed(path)


def test_a_layer_that_goes_non_finite_stops_the_run_named(tiny_images, tmp_path, monkeypatch):
    import bgd_det.engine.quantizer as quantizer_module

    fit = Quantizer.fit

    def nan_conv2(self, student, layer, source, seed):
        result, err, secs = fit(self, student, layer, source, seed)
        if layer.name == "conv2":
            result.codebook[0, 0] = float("nan")
        return result, err, secs

    monkeypatch.setattr(quantizer_module.Quantizer, "fit", nan_conv2)
    cfg = tiny_cfg(tmp_path / "a", "QUANT.BN_CORRECTION", "none")
    with pytest.raises(FloatingPointError, match=r"after layer 'conv2': conv2.codebook holds non-finite"):
        Quantizer(cfg, build_teacher(cfg), build_task(cfg), output_dir=cfg.OUTPUT_DIR).run()
    progress = torch.load(tmp_path / "a" / PROGRESS_FILE, weights_only=True)
    assert len(progress["records"]) == 1  # conv1's work is kept; the NaN layer was never saved


def test_empty_calibration_split_fails_at_once(tmp_path, monkeypatch):
    """Every image is of an odd class: the even split is empty (it used to loop forever)."""
    import json

    import numpy as np
    from PIL import Image

    root = tmp_path / "datasets" / "imagenet-sample"
    root.mkdir(parents=True)
    (tmp_path / "datasets" / "imagenet_class_index.json").write_text(
        json.dumps({"0": ["n00000000", "a"], "1": ["n00000001", "b"]}))
    Image.fromarray(np.zeros((8, 8, 3), dtype="uint8")).save(root / "n00000001_0.JPEG", format="PNG")
    monkeypatch.setenv("BGD_DATASETS", str(tmp_path / "datasets"))
    task = build_task(tiny_cfg(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"DATASETS.CALIB 'imagenet_sample_even' holds no images"):
        next(task.calib_batches(n_images=4, batch_size=2, augment=False, seed=0))


def test_saved_metrics_are_the_runs_own_evaluation(tiny_images, tmp_path):
    cfg = tiny_cfg(tmp_path / "run")
    out = quantize_and_report(cfg)
    ckpt = str(tmp_path / "run" / FINAL_CHECKPOINT)
    labels = [label for _, label in DatasetCatalog.get("imagenet_sample_odd").items]
    saved = saved_metrics(ckpt, cfg, labels=labels)
    # what evaluating the reloaded checkpoint again gives, image by image
    again = ClassificationTask(cfg).evaluate(load_compressed(ckpt), per_image=True)
    assert saved["top1_per_image"] == again["top1_per_image"]
    assert (saved["top1"], saved["top5"], saved["n_images"]) == (again["top1"], again["top5"], again["n_images"])
    assert saved["top1"] == out["metrics"]["compressed"]["top1"]
    # other images or another preprocessing: not this run's evaluation
    for key, value in (("DATASETS.TEST", "imagenet_sample_even"), ("DATASETS.TEST_MAX_IMAGES", 3),
                       ("INPUT.CROP", 28), ("INPUT.RESIZE", 40)):
        other = cfg.clone()
        other.merge_from_list([key, value])
        assert saved_metrics(ckpt, other) is None, key
    with pytest.raises(ValueError, match=r"its 10 labels are not imagenet_sample_odd's 10 in order"):
        saved_metrics(ckpt, cfg, labels=labels[::-1])
    preds = tmp_path / "run" / "predictions" / "compressed" / "predictions.json"
    raw = json.loads(preds.read_text())
    assert saved["top1"] < 100.0  # a random teacher's student
    raw["top1"] = raw["label"]  # every image a hit: no longer what the report says
    preds.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"\(10 of 10 right\) disagrees with .*report\.json"):
        saved_metrics(ckpt, cfg)
    later = os.path.getmtime(preds) + 10  # a checkpoint written after the evaluation: another model
    os.utime(ckpt, (later, later))
    assert saved_metrics(ckpt, cfg) is None
    preds.unlink()
    assert saved_metrics(ckpt, cfg) is None
