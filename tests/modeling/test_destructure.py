"""De-structured teacher (bgd_det/modeling/destructure.py): function kept, codebook structure gone."""
import copy

import pytest
import torch
import torchvision
from torch import nn

from bgd_det.modeling.destructure import compare_logits, destructure_resnet, distinct_subvectors, structure_report

SIZES = {"kxk": 9, "1x1": 4, "linear": 4}


def codebook_structured(arch: str) -> nn.Module:
    """A random torchvision ResNet whose every conv / fc is made of 16 distinct sub-vectors (like a decoded PQ
    teacher), with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not model.conv1:  # 7x7x3 rows: no 9-blocks
                d = SIZES["linear"] if isinstance(m, nn.Linear) else SIZES["1x1" if m.kernel_size == (1, 1) else "kxk"]
                atoms = torch.randn(16, d) * m.weight.std()
                m.weight.copy_(atoms[torch.randint(16, (m.weight.numel() // d,))].reshape(m.weight.shape))
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(-0.2, 1.5)  # a few negative gammas, as in the decoded teachers
                m.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_function_is_kept_and_structure_is_gone(arch):
    teacher = codebook_structured(arch)
    model = destructure_resnet(copy.deepcopy(teacher), spread=0.5, seed=1)
    x = torch.randn(6, 3, 64, 64)
    check = compare_logits(teacher, model, [(x, None)])
    assert check["max_rel_diff"] < 1e-5 and check["top1_same"] == 1 and check["top5_same"] == 1
    if arch != "resnet18":  # every layer kind, without sorting ResNet-50's 6M sub-vectors
        names = ["layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3", "layer1.0.downsample.0", "layer4.2.conv2"]
        for name in names:
            w = model.get_submodule(name).weight
            d = SIZES["1x1" if w.shape[-1] == 1 else "kxk"]
            assert distinct_subvectors(teacher.get_submodule(name).weight, d) <= 16
            assert distinct_subvectors(w, d) > 0.9 * w.numel() // d, name
        return
    before, after = structure_report(teacher, SIZES), structure_report(model, SIZES)
    for name, row in after.items():
        assert before[name]["distinct"] <= 16, name
        # fc's rows cannot be scaled (the logits are the output): one atom at the same block of two rows stays
        # one sub-vector, 1 - (15/16)^10 of 16 x 128 pairs here
        assert row["distinct"] > (0.7 if name == "fc" else 0.9) * row["subvectors"], (name, row)
    assert "conv1" not in after  # 147 columns: not cut into 9-blocks


def test_permutations_alone_keep_the_atoms():
    """spread 0: only the internal permutations act; they move channels, not values."""
    teacher = codebook_structured("resnet18")
    model = destructure_resnet(copy.deepcopy(teacher), spread=0.0, seed=3)
    assert not torch.equal(model.layer1[0].conv1.weight, teacher.layer1[0].conv1.weight)
    assert distinct_subvectors(model.layer1[0].conv1.weight, 9) == distinct_subvectors(teacher.layer1[0].conv1.weight, 9)
    x = torch.randn(2, 3, 64, 64)
    assert compare_logits(teacher, model, [(x, None)])["max_rel_diff"] < 1e-5


def test_compare_logits_sees_a_change():
    teacher = codebook_structured("resnet18")
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        model.fc.bias[3] += 100.0
    check = compare_logits(teacher, model, [(torch.randn(4, 3, 64, 64), None)])
    assert check["max_rel_diff"] > 0.1 and check["top1_same"] == 0.0
