"""Conv1d layers end to end: input rows against the convolution itself, the plan, a quantization run, the
checkpoint and the inference model (compiled op on a 1 x L image)."""
import copy

import pytest
import torch
from torch import nn

from bgd_det.checkpoint import load_compressed
from bgd_det.engine.pipeline import quantize_and_report
from bgd_det.modeling import ARCH_REGISTRY
from bgd_det.inference import PQConv1dInfer, to_inference
from bgd_det.quantization.capture import input_rows
from bgd_det.quantization.layers import PQConv1d
from conftest import tiny_cfg


class TinySeqNet(nn.Module):
    """Image -> 2-D stem -> rows as a sequence -> two Conv1d + BatchNorm1d -> Linear (10 classes)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c1 = nn.Conv1d(8, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(16)
        self.c2 = nn.Conv1d(16, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        t = torch.relu(self.stem(x)).mean(2)  # [B, 8, W/2]
        t = torch.relu(self.bn1(self.c1(t)))
        t = torch.relu(self.bn2(self.c2(t)) + t)
        return self.fc(t.mean(-1))


if "tiny_seq_net" not in ARCH_REGISTRY:
    @ARCH_REGISTRY.register()
    def tiny_seq_net(cfg):
        """Tiny test architecture with Conv1d layers."""
        return TinySeqNet(cfg.MODEL.NUM_CLASSES)


@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(padding="same", dilation=2), dict(padding=2, stride=2),
                                    dict(padding=1, padding_mode="reflect"), dict(padding=1, groups=4)])
def test_input_rows_reproduce_the_convolution(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv1d(16, 8, 3, bias=False, **kwargs)
    x = torch.randn(2, 16, 21)
    out = conv(x)  # [B, C_out, L_out]
    rows = input_rows(conv, x)  # [B * groups * L_out, C_in/groups * k] in (image, group, position) order
    g, length = conv.groups, out.shape[-1]
    w = conv.weight.reshape(g, 8 // g, -1)  # [groups, C_out/groups, cols]
    got = torch.einsum("bgln,gon->bgol", rows.reshape(2, g, length, -1), w).reshape(2, 8, length)
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(padding="same"), dict(padding=2, padding_mode="circular"),
                                    dict(padding=1, groups=4, stride=2, dilation=2)])
def test_inference_layer_matches_the_training_layer(kwargs):
    torch.manual_seed(0)
    layer = PQConv1d.from_dense(nn.Conv1d(16, 8, 3, **kwargs), block_size=4, n_centroids=16)
    layer.set_quantization(torch.randint(0, 16, tuple(layer.codes.shape)), torch.randn(16, 4))
    x = torch.randn(2, 16, 21)
    with torch.no_grad():
        want = layer(x)
        infer = to_inference(copy.deepcopy(layer))
        assert isinstance(infer, PQConv1dInfer)
        torch.testing.assert_close(infer(x), want, rtol=1e-5, atol=1e-5)


def test_conv1d_network_is_quantized_saved_and_reloaded(tiny_images, tmp_path):
    cfg = tiny_cfg(tmp_path, "MODEL.ARCH", "tiny_seq_net", "QUANT.SKIP", "['stem']", "FINETUNE.GLOBAL_ITERS", 2)
    out = quantize_and_report(cfg)
    student = out["result"].student.eval()
    assert isinstance(student.c1, PQConv1d) and isinstance(student.c2, PQConv1d)
    assert (student.c1.block_size, student.c1.codes.shape) == (4, (16, 6))  # 8 * 3 columns in blocks of 4
    assert "| c1 " in open(tmp_path / "report.md").read()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = student(x)
        for inference in (False, True):
            torch.testing.assert_close(load_compressed(str(tmp_path / "model_final.pth"), inference=inference)(x),
                                       want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
