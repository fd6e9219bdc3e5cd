"""BatchNorm correction: pairs found by data flow; corrected statistics match the teacher's exactly."""
import copy

import torch
import torchvision
from torch import nn

from bgd_det.quantization.bn_correction import channel_stats, correct_batchnorm, following_batchnorms


def test_following_batchnorms_on_resnet18():
    model = torchvision.models.resnet18().eval()
    pairs = following_batchnorms(model, lambda m: m(torch.zeros(1, 3, 64, 64)))
    assert pairs["conv1"] == "bn1"
    assert pairs["layer2.0.conv2"] == "layer2.0.bn2"
    assert pairs["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert "fc" not in pairs and len(pairs) == 20


def test_corrected_bn_output_moments_match_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)).eval()
    teacher[1].running_mean.uniform_(-1, 1)
    teacher[1].running_var.uniform_(0.5, 2)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.mul_(1.3).add_(0.05)  # a "quantization" error: scale and shift per channel
    batches = [torch.randn(4, 3, 10, 10) for _ in range(3)]
    fwd = lambda m, b: m(b)  # noqa: E731
    s_stats = channel_stats(student, "1", batches, fwd)
    t_stats = channel_stats(teacher, "1", batches, fwd)
    correct_batchnorm(student[1], s_stats, t_stats, variance=True, max_ratio=10)
    with torch.no_grad():
        out_s = torch.cat([student(b) for b in batches]).transpose(0, 1).reshape(6, -1)
        out_t = torch.cat([teacher(b) for b in batches]).transpose(0, 1).reshape(6, -1)
    assert torch.allclose(out_s.mean(1), out_t.mean(1), atol=1e-4)
    assert torch.allclose(out_s.var(1), out_t.var(1), rtol=1e-3)


def test_bias_correction_matches_the_teachers_output_mean():
    from bgd_det.quantization.bn_correction import correct_bias, output_channel_mean

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 4, 1))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.mul_(1.3)
        student[2].weight.add_(0.1)
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    run = lambda m, b: m(b)  # noqa: E731
    means = [output_channel_mean(m, "2", batches, run) for m in (student, teacher)]
    with torch.no_grad():
        ref = torch.cat([teacher(b) for b in batches]).double().mean((0, 2, 3))
    assert torch.allclose(means[1], ref, atol=1e-6)
    assert (means[0] - means[1]).abs().max() > 0.05
    correct_bias(student[2], *means)
    assert torch.allclose(output_channel_mean(student, "2", batches, run), means[1], atol=1e-5)


def test_quantizer_corrects_the_bias_of_a_layer_without_batchnorm(tiny_images, tmp_path):
    """TinyNet's fc feeds no BatchNorm: with BN correction on (the default) its output mean on the capture images
    equals the teacher's; with QUANT.BIAS_CORRECTION off it does not."""
    from bgd_det.engine.quantizer import Quantizer
    from bgd_det.modeling import build_teacher
    from bgd_det.quantization.bn_correction import output_channel_mean
    from bgd_det.tasks import build_task
    from conftest import tiny_cfg

    gaps = {}
    for on in (True, False):
        cfg = tiny_cfg(tmp_path, "QUANT.BIAS_CORRECTION", on, "QUANT.N_CENTROIDS", 4)
        torch.manual_seed(0)
        teacher = build_teacher(cfg)
        q = Quantizer(cfg, teacher, build_task(cfg))
        student = q.run().student
        batches = list(q.plain_pass.batches(q.task))
        gaps[on] = float((output_channel_mean(student, "fc", batches, q.task.forward)
                          - output_channel_mean(teacher, "fc", batches, q.task.forward)).abs().max())
    assert gaps[True] < 1e-3 < gaps[False]
