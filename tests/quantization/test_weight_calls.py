"""Linears used through ``.weight`` (torchvision's Swin attention calls ``F.linear(x, self.qkv.weight, ...)``):
ordered, captured and quantized like called layers, and run after the swap through the decoded ``.weight``."""
import json

import torch
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer

from bgd_det.checkpoint import load_compressed
from bgd_det.engine.pipeline import quantize_and_report
from bgd_det.modeling import ARCH_REGISTRY
from bgd_det.quantization.capture import for_each_input, for_each_output
from bgd_det.quantization.layers import PQLinear
from bgd_det.quantization.plan import execution_order
from conftest import tiny_cfg


def make_tiny_swin(num_classes: int = 10) -> SwinTransformer:
    """torchvision's Swin-T layout at 32x32: one stage of two blocks, width 16, 4x4 windows."""
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                           num_classes=num_classes)


if "tiny_swin" not in ARCH_REGISTRY:
    @ARCH_REGISTRY.register()
    def tiny_swin(cfg):
        """torchvision SwinTransformer, tiny."""
        return make_tiny_swin(cfg.MODEL.NUM_CLASSES)


class _Direct(nn.Module):
    """``proj`` used through ``.weight`` twice per forward; ``fc`` called."""

    def __init__(self):
        super().__init__()
        self.proj, self.fc = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        y = nn.functional.linear(x, self.proj.weight, self.proj.bias)
        return self.fc(nn.functional.linear(y, self.proj.weight))


def test_order_and_captures_see_linears_used_through_weight():
    torch.manual_seed(0)
    model = _Direct().eval()
    x = torch.randn(4, 6)
    assert execution_order(model, lambda m: m(x)) == ["proj", "fc"]
    inputs, outputs = [], []
    for_each_input(model, "proj", [x], lambda m, batch: m(batch), lambda _m, t: inputs.append(t))
    for_each_output(model, "proj", [x], lambda m, batch: m(batch), lambda _m, t: outputs.append(t))
    assert torch.equal(inputs[0], x)  # the first call, then the forward stops
    torch.testing.assert_close(outputs[0], model.proj(x))
    swin = make_tiny_swin().eval()
    order = execution_order(swin, lambda m: m(torch.zeros(1, 3, 32, 32)))
    assert order.index("features.1.0.attn.qkv") < order.index("features.1.0.attn.proj") < order.index("head")


def test_swin_attention_quantized_end_to_end(tiny_images, tmp_path):
    cfg = tiny_cfg(tmp_path, "MODEL.ARCH", "tiny_swin", "QUANT.SKIP_FIRST", True, "FINETUNE.GLOBAL_ITERS", 2,
                   "FINETUNE.LAYER_ITERS", 1)
    out = quantize_and_report(cfg)
    student = out["result"].student.eval()
    attention = student.features[1][0].attn
    assert isinstance(attention.qkv, PQLinear) and isinstance(attention.proj, PQLinear)
    unquantized = {u["name"]: u["reason"] for u in json.load(open(tmp_path / "report.json"))["unquantized"]}
    assert not any(reason.startswith("not called") for reason in unquantized.values()), unquantized
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = student(x)
        for inference in (False, True):
            got = load_compressed(str(tmp_path / "model_final.pth"), inference=inference)(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
