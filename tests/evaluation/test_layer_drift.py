"""benchmarks/layer_drift.py: a layer's output error split into its inputs' drift and its own weights' share."""
import copy

import pytest
import torch
from torchvision.models import resnet18

from tests.conftest import load_benchmark


def test_drift_table_separates_inherited_and_own_error():
    torch.manual_seed(0)
    teacher = resnet18(num_classes=10).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.layer1[0].conv1.weight.mul_(1.3)  # the student's own error in layer1.0.conv1 only
    images = torch.randn(6, 3, 64, 64)
    bench = load_benchmark("layer_drift")
    rows = bench.drift_table(student, teacher, ["layer1.0.conv1", "layer1.0.conv2"], images, batch_size=4)
    (first, drift1, own1), (second, drift2, own2) = rows
    assert (first, second) == ("layer1.0.conv1", "layer1.0.conv2")
    assert drift1 == 0.0 and own1 == pytest.approx(0.3, rel=1e-6)  # same input; weights scaled by 1.3
    assert drift2 > 0 and own2 == pytest.approx(drift2, rel=1e-9)  # conv2 itself untouched: all drift
    assert bench.drift_table(teacher, teacher, ["layer1.0.conv2"], images)[0][1:] == [0.0, 0.0]
