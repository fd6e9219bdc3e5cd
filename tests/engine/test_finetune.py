"""The paper's finetuning pieces: per-centroid gradient averaging, the step schedule, BatchNorm running statistics in
train mode, epoch budgets, and a global finetuning that resumes to the codebooks of an uninterrupted run."""
import os

import pytest
import torch
from torch import nn

from bgd_det.engine.finetune import OptimSpec, bn_train_mode, centroid_mean_grads
from bgd_det.engine.quantizer import FINETUNE_STATE_FILE, Quantizer
from bgd_det.modeling import build_teacher
from bgd_det.quantization.layers import PQConv2d
from bgd_det.tasks import build_task
from bgd_det.tasks.classification import ClassificationTask
from conftest import tiny_cfg


class Interrupt(Exception):
    pass


def _pq_conv(codes: torch.Tensor, k: int = 4, d: int = 3) -> PQConv2d:
    conv = nn.Conv2d(2, codes.shape[0], (1, 3), bias=False)
    pq = PQConv2d.from_dense(conv, block_size=d, n_centroids=k)
    pq.set_quantization(codes, torch.randn(k, d))
    return pq


def test_centroid_mean_grads_divide_each_row_by_its_assignment_count():
    codes = torch.tensor([[0, 0], [0, 1], [1, 3]])  # centroid 0: 3 sub-vectors, 1: 2, 2: none, 3: 1
    pq = _pq_conv(codes)
    x = torch.randn(5, 2, 4, 6)
    pq(x).pow(2).sum().backward()
    summed = pq.codebook.grad.clone()
    pq.codebook.grad = None
    with centroid_mean_grads(pq, [pq.codebook]):
        pq(x).pow(2).sum().backward()
    expected = summed / torch.tensor([3.0, 2.0, 1.0, 1.0]).unsqueeze(1)
    assert torch.allclose(pq.codebook.grad, expected, rtol=1e-6, atol=1e-7)
    pq.codebook.grad = None  # the hook is gone once the context closes
    pq(x).pow(2).sum().backward()
    assert torch.allclose(pq.codebook.grad, summed, rtol=1e-6)


def test_step_schedule_decays_at_the_milestones_and_sgd_uses_momentum_and_weight_decay():
    spec = OptimSpec(lr=0.01, optimizer="sgd", momentum=0.9, weight_decay=1e-4, schedule="step",
                     milestones=(1 / 3, 2 / 3), gamma=0.1)
    spec.check()
    p = nn.Parameter(torch.ones(2))
    opt, sched = spec.build([p], iters=9)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-4
    lrs = []
    for _ in range(9):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros(2)
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01] * 3 + [0.001] * 3 + [0.0001] * 3)
    cosine = OptimSpec(lr=1.0, schedule="cosine")
    assert [cosine.lr_factor(s, 4) for s in (0, 2, 4)] == pytest.approx([1.0, 0.5, 0.0])


def test_bn_train_mode_moves_running_statistics_only_while_open():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    before = model[1].running_mean.clone()
    with bn_train_mode(model, True):
        assert model[1].training and not model[0].training
        model(torch.randn(8, 3, 5, 5) + 3)
    assert not model[1].training
    assert not torch.allclose(model[1].running_mean, before)
    moved = model[1].running_mean.clone()
    with bn_train_mode(model, False):
        model(torch.randn(8, 3, 5, 5))
    assert torch.equal(model[1].running_mean, moved)


def _quantizer(tmp_path, name, *extra):
    cfg = tiny_cfg(tmp_path / name, *extra)
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    return cfg, Quantizer(cfg, teacher, build_task(cfg), output_dir=cfg.OUTPUT_DIR)


def test_paper_mode_runs_and_its_finetuning_updates_running_statistics_and_counts_epochs(tiny_images, tmp_path):
    cfg, q = _quantizer(tmp_path, "a", "FINETUNE.GLOBAL_EPOCHS", 1.5, "FINETUNE.BN", "stats",
                        "FINETUNE.OPTIMIZER", "sgd", "FINETUNE.GLOBAL_LR", 0.01, "FINETUNE.CENTROID_GRAD", "mean",
                        "FINETUNE.WEIGHT_DECAY", 1e-4, "FINETUNE.LR_SCHEDULE", "step",
                        "FINETUNE.LR_MILESTONES", "[0.5]", "QUANT.EM_RESAMPLE_IMAGES", 4,
                        "QUANT.CAPTURE_AUGMENT", True, "QUANT.BN_CORRECTION", "none")
    assert q.global_iters() == 4  # ceil(1.5 epochs * 10 even-class images / batch 4)
    result = q.run()
    bn_t, bn_s = q.teacher.bn2, result.student.bn2
    assert not torch.allclose(bn_t.running_var, bn_s.running_var)  # "stats": running statistics moved
    assert torch.equal(bn_t.weight, bn_s.weight)  # ... and the affine parameters did not


@pytest.mark.parametrize("mixup", [0.0, 1.0])
def test_global_finetuning_resumes_to_the_codebooks_of_an_uninterrupted_run(tiny_images, tmp_path, monkeypatch,
                                                                             mixup):
    extra = ["FINETUNE.MIXUP_ALPHA", mixup, "FINETUNE.GLOBAL_ITERS", 6, "FINETUNE.CHECKPOINT_PERIOD", 2,
             "FINETUNE.OPTIMIZER", "sgd", "FINETUNE.GLOBAL_LR", 0.05, "FINETUNE.BN", "train",
             "FINETUNE.LR_SCHEDULE", "step", "FINETUNE.LR_MILESTONES", "[0.5]"]
    _, q = _quantizer(tmp_path, "a", *extra)
    full = q.run().student.state_dict()
    assert not os.path.exists(tmp_path / "a" / FINETUNE_STATE_FILE)  # removed at the end

    cfg, q = _quantizer(tmp_path, "b", *extra)
    calls = {"n": 0}
    loss = ClassificationTask.distill_loss

    def crash_at_fifth(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Interrupt
        return loss(self, *args)

    monkeypatch.setattr(ClassificationTask, "distill_loss", crash_at_fifth)
    with pytest.raises(Interrupt):
        q.run()
    state = torch.load(tmp_path / "b" / FINETUNE_STATE_FILE, weights_only=True)
    assert state["step"] == 4
    monkeypatch.setattr(ClassificationTask, "distill_loss", loss)
    _, other = _quantizer(tmp_path, "b", *extra[:-2], "FINETUNE.LR_MILESTONES", "[0.25]")
    with pytest.raises(ValueError, match=r"FINETUNE.LR_MILESTONES \[0.5\] -> \[0.25\]"):
        other.run(resume=True)  # the layer stage may be finetuned otherwise, a half-done finetuning may not
    cfg, q = _quantizer(tmp_path, "b", *extra)
    resumed = q.run(resume=True).student.state_dict()
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    codebooks = [k for k in full if k.endswith("codebook")]
    assert codebooks and not os.path.exists(tmp_path / "b" / FINETUNE_STATE_FILE)


def test_a_stale_finetuning_state_is_not_continued_without_resume(tiny_images, tmp_path):
    cfg, q = _quantizer(tmp_path, "a", "FINETUNE.GLOBAL_ITERS", 2, "FINETUNE.CHECKPOINT_PERIOD", 1)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    torch.save({"step": 1}, os.path.join(cfg.OUTPUT_DIR, FINETUNE_STATE_FILE))
    q.run()  # would fail to load the bogus state if it were read
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, FINETUNE_STATE_FILE))


def test_periodic_validation_runs_every_period_and_at_the_end(tiny_images, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(ClassificationTask, "evaluate", lambda self, model: seen.append(model.training) or {})
    _, q = _quantizer(tmp_path, "a", "FINETUNE.GLOBAL_ITERS", 5, "FINETUNE.EVAL_PERIOD", 2, "FINETUNE.BN", "stats")
    q.run()
    assert seen == [False, False, False]  # steps 2, 4 and 5, every BatchNorm back in eval mode


def test_feature_taps_and_loss():
    from torch import nn

    from bgd_det.engine.finetune import feature_loss, feature_taps

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with feature_taps(model, ["0", "2"]) as fa, feature_taps(other, ["0", "2"]) as fb:
        model(x)
        other(x)
    assert not model[0]._forward_hooks and not other[2]._forward_hooks  # removed on exit
    ref = sum(((model[:i + 1](x) - other[:i + 1](x)) ** 2).sum() / (other[:i + 1](x) ** 2).sum() for i in (0, 2))
    assert torch.allclose(feature_loss(fa, fb), ref)
    assert float(feature_loss(fb, fb).detach()) == 0.0
    with pytest.raises(KeyError, match="no module 'layer9'"):
        with feature_taps(model, ["layer9"]):
            pass


def test_feature_loss_on_dict_and_tuple_outputs():
    """A module returning several tensors (an FPN's dict of levels) contributes one term per tensor."""
    from collections import OrderedDict

    from bgd_det.engine.finetune import feature_loss

    t = OrderedDict(p2=torch.randn(2, 3), p3=torch.randn(4))
    s = OrderedDict(p2=torch.randn(2, 3), p3=torch.randn(4))
    pair = (torch.randn(3), [torch.randn(2)])
    pair_s = (torch.randn(3), [torch.randn(2)])
    want = sum(((a - b) ** 2).sum() / (b ** 2).sum()
               for a, b in [(s["p2"], t["p2"]), (s["p3"], t["p3"]), (pair_s[0], pair[0]), (pair_s[1][0], pair[1][0])])
    assert torch.allclose(feature_loss({"fpn": s, "head": pair_s}, {"fpn": t, "head": pair}), want)
    with pytest.raises(TypeError, match="'fpn' returned a str; allowed: a tensor, or a dict / list / tuple"):
        feature_loss({"fpn": "x"}, {"fpn": "x"})
