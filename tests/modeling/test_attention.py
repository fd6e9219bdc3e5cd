"""Multi-head attention with module projections: the same function, masks and state dict keys as
nn.MultiheadAttention, and a torchvision ViT whose attention projections are quantized end to end."""
import json

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from bgd_det.checkpoint import load_compressed
from bgd_det.engine.pipeline import quantize_and_report
from bgd_det.modeling import ARCH_REGISTRY
from bgd_det.modeling.attention import ProjectedMultiheadAttention, expose_attention_projections
from bgd_det.quantization.layers import PQLinear
from conftest import tiny_cfg


def _masks():
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.triu(torch.ones(5, 7, dtype=torch.bool), 3)
    per_head = torch.randn(2 * 4, 5, 7)
    return [dict(), dict(need_weights=False), dict(key_padding_mask=padding), dict(attn_mask=causal),
            dict(attn_mask=per_head, key_padding_mask=padding, average_attn_weights=False),
            dict(attn_mask=causal.float().masked_fill(causal, float("-inf")), need_weights=False)]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kwargs", _masks(), ids=["plain", "no-weights", "padding", "causal", "per-head", "float"])
def test_same_outputs_as_multihead_attention(batch_first, kwargs):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=batch_first, bias=True).eval()
    ours = ProjectedMultiheadAttention(reference).eval()
    shape = (lambda n: (2, n, 16)) if batch_first else (lambda n: (n, 2, 16))
    x, y = torch.randn(shape(5)), torch.randn(shape(7))
    with torch.no_grad():
        for query, key in ((x, y), (y, y)):  # cross- and self-attention
            if query is key and kwargs.get("attn_mask") is not None:
                continue  # the masks are for 5 queries
            want, got = reference(query, key, key, **kwargs), ours(query, key, key, **kwargs)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
            assert (got[1] is None) == (want[1] is None)
            if want[1] is not None:
                torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_unbatched_input_and_old_state_dict_keys():
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4).eval()
    ours = ProjectedMultiheadAttention(nn.MultiheadAttention(16, 4)).eval()
    assert "in_proj_weight" in reference.state_dict()
    ours.load_state_dict(reference.state_dict())  # torchvision weights name the packed projection in_proj_weight
    x = torch.randn(5, 16)
    with torch.no_grad():
        for got, want in zip(ours(x, x, x), reference(x, x, x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="only MultiheadAttention with kdim == vdim == embed_dim"):
        ProjectedMultiheadAttention(nn.MultiheadAttention(16, 4, kdim=8))


def make_tiny_vit(num_classes: int = 10) -> VisionTransformer:
    """torchvision's ViT at 32x32: 8x8 patches, 2 layers, 2 heads, width 16."""
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=num_classes)


if "tiny_vit" not in ARCH_REGISTRY:
    @ARCH_REGISTRY.register()
    def tiny_vit(cfg):
        """torchvision VisionTransformer, tiny."""
        return make_tiny_vit(cfg.MODEL.NUM_CLASSES)


def test_vit_function_kept_and_attention_quantized_end_to_end(tiny_images, tmp_path):
    torch.manual_seed(0)
    plain = make_tiny_vit().eval()
    nn.init.normal_(plain.heads.head.weight, std=0.1)  # torchvision zero-initialises the head
    converted = make_tiny_vit().eval()
    assert expose_attention_projections(converted) == ["encoder.layers.encoder_layer_0.self_attention",
                                                       "encoder.layers.encoder_layer_1.self_attention"]
    converted.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), plain(x), rtol=1e-5, atol=1e-6)

    cfg = tiny_cfg(tmp_path, "MODEL.ARCH", "tiny_vit", "QUANT.SKIP", "['conv_proj']", "FINETUNE.GLOBAL_ITERS", 2)
    out = quantize_and_report(cfg)
    student = out["result"].student.eval()
    attention = student.encoder.layers.encoder_layer_0.self_attention
    assert isinstance(attention.in_proj, PQLinear) and isinstance(attention.out_proj, PQLinear)
    unquantized = {u["name"] for u in json.load(open(tmp_path / "report.json"))["unquantized"]}
    assert unquantized == {"conv_proj.weight", "class_token", "encoder.pos_embedding"}
    with torch.no_grad():
        want = student(x)
        for inference in (False, True):
            got = load_compressed(str(tmp_path / "model_final.pth"), inference=inference)(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
