"""Size accounting against the rules written out by hand, the swap of dense layers for codebook layers, and the
report's content."""
import json
import re

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from bgd_det.engine.report import format_report, write_report
from bgd_det.quantization.layers import PQConv2d, PQLinear
from bgd_det.quantization.plan import LayerPlan, Unquantized
from bgd_det.quantization.size import model_size
from bgd_det.quantization.swap import make_pq_layer, pq_layers, set_module, swap_in_skeleton


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, bias=False)  # 288 weights
        self.bn = nn.BatchNorm2d(8)                 # 16 affine values (running statistics are buffers)
        self.frozen = FrozenBatchNorm2d(8)          # the same 16, held as buffers
        self.fc = nn.Linear(32, 16)                 # 512 weights + 16 biases


def test_sizes_follow_the_written_rules():
    model = _Net()
    dense = model_size(model)
    assert dense.dense_bytes == dense.compressed_bytes == 4 * (288 + 16 + 16 + 512 + 16)
    swap_in_skeleton(model, [LayerPlan("conv", 9, 16, 0), LayerPlan("fc", 4, 64, 0)])
    size = model_size(model).by_name()
    # conv: 32 sub-vectors of 9 at log2(16) = 4 bits, a 16 x 9 fp16 codebook
    assert size["conv"].bytes == 32 * 4 / 8 + 2 * 16 * 9 and size["conv"].dense_bytes == 4 * 288
    # fc: 128 sub-vectors of 4 at 6 bits, a 64 x 4 fp16 codebook, the bias in fp32
    assert size["fc"].bytes == 128 * 6 / 8 + 2 * 64 * 4 + 4 * 16
    assert size["bn"].bytes == size["frozen"].bytes == 4 * 16
    assert (size["conv"].kind, size["conv"].block_size, size["conv"].n_centroids) == ("pq", 9, 16)
    total = model_size(model)
    assert total.ratio == pytest.approx(total.dense_bytes / total.compressed_bytes)
    assert total.dense_bytes == dense.dense_bytes  # the uncompressed size does not change with the swap


def test_swap_keeps_hyper_parameters_bias_and_device_and_refuses_other_types():
    model = _Net()
    layer = make_pq_layer(model.conv, LayerPlan("conv", 9, 16, 0))
    assert isinstance(layer, PQConv2d) and layer.kernel_size == (3, 3) and layer.bias is None
    assert tuple(layer.codes.shape) == (8, 4) and layer.codes.dtype == torch.uint8
    linear = make_pq_layer(model.fc, LayerPlan("fc", 4, 1024, 0))
    assert isinstance(linear, PQLinear) and linear.codes.dtype == torch.int16
    assert torch.equal(linear.bias, model.fc.bias)
    set_module(model, "fc", linear)
    assert model.fc is linear and list(pq_layers(model)) == ["fc"]
    with pytest.raises(TypeError, match="'bn' is a BatchNorm2d, which cannot be quantized"):
        make_pq_layer(model.bn, LayerPlan("bn", 4, 16, 0))
    with pytest.raises(ValueError, match="block_size=5 does not divide the row length 36"):
        make_pq_layer(model.conv, LayerPlan("conv", 5, 16, 0))


def test_report_lists_sizes_metrics_and_fp32_weights(tmp_path):
    model = _Net()
    swap_in_skeleton(model, [LayerPlan("fc", 4, 64, 0)])
    size = model_size(model)
    metrics = {"uncompressed": {"top1": 70.0, "n_images": 10}, "compressed": {"top1": 65.5, "n_images": 10}}
    unquantized = [Unquantized("conv.weight", 288, "skipped by rule")]
    text = format_report(size, metrics=metrics, timings={"layers": 3.0}, unquantized=unquantized)
    assert re.search(r"^\| fc +\| pq ", text, re.M) and re.search(r"^\| conv +\| fp32 ", text, re.M)
    assert re.search(r"^\| uncompressed +\|.*\| +70 +\|$", text, re.M)
    assert re.search(r"^\| compressed +\|.*\| +65\.5 +\|$", text, re.M)
    assert f"{size.ratio:.1f}x" in text and "layers: 3.0s" in text
    assert "## Weights left in fp32" in text and re.search(r"^\| conv.weight +\| +288 \| skipped by rule", text, re.M)
    write_report(str(tmp_path), size, metrics=metrics, unquantized=unquantized)
    data = json.load(open(tmp_path / "report.json"))
    assert data["ratio"] == pytest.approx(size.ratio) and data["unquantized"][0]["reason"] == "skipped by rule"
    assert (tmp_path / "layer_sizes.png").stat().st_size > 0
