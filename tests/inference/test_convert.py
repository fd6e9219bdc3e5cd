"""The inference form of compressed models (bgd_det.inference): conversion, BatchNorm folding, the cfg.TEST policy,
and loading checkpoints for inference, against the training-time layers."""
import pytest
import torch
import torchvision
from torch import nn

import bgd_det
from bgd_det import inference as inf
from bgd_det.checkpoint import round_codebooks_to_fp16, save_compressed
from bgd_det.config.checks import check_eval_options
from bgd_det.quantization.layers import PQ_LAYER_TYPES, PQConv2d, PQConvTranspose2d, PQLinear
from bgd_det.quantization.plan import QuantRules, build_plan, execution_order
from bgd_det.quantization.swap import swap_in_skeleton
from conftest import fill_random_pq, random_pq

pytestmark = pytest.mark.usefixtures("compiled_ops")


@pytest.mark.parametrize("fold_bn", [False, True])
def test_reloaded_resnet18_same_logits(resnet18_checkpoint, fold_bn):
    path, x, want = resnet18_checkpoint
    loaded = bgd_det.load_compressed(path, inference=True, fold_bn=fold_bn)
    with torch.inference_mode():
        got = loaded(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * want.abs().max().item())
    assert not any(isinstance(m, PQ_LAYER_TYPES) for m in loaded.modules())
    infer = [m for m in loaded.modules() if isinstance(m, inf.INFER_LAYER_TYPES)]
    assert len(infer) == 20  # 16 block convs + 3 downsample convs + fc; conv1 stays dense
    dense = [n for n, p in loaded.named_parameters() if p.dim() > 1]
    assert dense == ["conv1.weight"]  # no decoded weight is kept anywhere
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
    assert n_bn == (1 if fold_bn else 20)
    if not fold_bn:  # the default keeps returning the training-layer model
        assert any(isinstance(m, PQConv2d) for m in bgd_det.load_compressed(path).modules())


@pytest.mark.parametrize("compiled_op,fold_bn", [(False, False), (True, False), (True, True)])
def test_for_evaluation_follows_test_cfg(resnet18_checkpoint, compiled_op, fold_bn):
    from bgd_det.config import get_cfg

    path, x, want = resnet18_checkpoint
    cfg = get_cfg()
    cfg.TEST.COMPILED_OP, cfg.TEST.FOLD_BN = compiled_op, fold_bn
    model = inf.for_evaluation(bgd_det.load_compressed(path), cfg.TEST)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-3 * want.abs().max().item())
    assert any(isinstance(m, PQ_LAYER_TYPES) for m in model.modules()) is not compiled_op
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == (1 if fold_bn else 20)


def test_for_evaluation_bad_options_and_dense_models():
    from bgd_det.config import get_cfg

    cfg = get_cfg()
    cfg.TEST.FOLD_BN = True
    with pytest.raises(ValueError, match="TEST.FOLD_BN=True needs TEST.COMPILED_OP=True"):
        check_eval_options(cfg.TEST)
    with pytest.raises(ValueError, match="TEST.FOLD_BN=True needs TEST.COMPILED_OP=True"):
        inf.for_evaluation(nn.Linear(2, 2), cfg.TEST)
    cfg.TEST.COMPILED_OP = True
    dense = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert inf.for_evaluation(dense, cfg.TEST) is dense  # nothing to compile: evaluated as it is


class _Untraceable(nn.Module):
    """Data-dependent control flow at the top; traceable blocks inside; one conv with two users."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.conv_r = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.bn_r = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.block(x)
        if y.sum() > 0:  # not traceable
            y = y + 1
        z = self.conv(y)
        return self.bn(z) + z + self.bn_r(self.conv_r(y))


def test_fold_bn_partial_tracing_and_shared_outputs():
    model = _Untraceable()
    x = torch.randn(2, 4, 6, 6)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    swap_in_skeleton(
        model,
        build_plan(
            model,
            ["block.0", "conv", "conv_r"],
            QuantRules(n_centroids=8, block_size_kxk=9, block_size_1x1=4),
        ),
    )
    fill_random_pq(model, seed_by_size=False)
    model.eval()
    with torch.no_grad():
        want = model(x)
    # block.0 -> block.1 is found inside the traceable child; conv's output has two users: not
    # folded.
    assert inf.conv_bn_pairs(model) == [("block.0", "block.1")]
    folded = inf.to_inference(model, fold_bn=True)
    assert isinstance(folded.block[1], nn.Identity) and isinstance(folded.bn, nn.BatchNorm2d)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_inference_layers_match_training_layers():
    torch.manual_seed(0)
    convs = [
        (nn.Conv2d(6, 8, 4, padding="same"), 4),  # asymmetric padding
        (nn.Conv2d(6, 8, 3, padding="same", dilation=2), 9),
        (nn.Conv2d(6, 8, 3, padding=1, padding_mode="circular"), 18),
        (nn.Conv2d(6, 6, 3, stride=2, groups=3, bias=False), 9),
    ]
    for conv, d in convs:
        layer = PQConv2d.from_dense(conv, block_size=d, n_centroids=16)
        codes, cb = random_pq(layer.codes.shape[0], layer.codes.shape[1] * d, d, 16)
        layer.set_quantization(codes, cb)
        x = torch.randn(2, 6, 9, 9)
        torch.testing.assert_close(
            inf.to_inference(layer)(x), layer(x).detach(), rtol=1e-4, atol=1e-4
        )
    lin = PQLinear.from_dense(nn.Linear(32, 5), block_size=8, n_centroids=4)
    lin.set_quantization(*random_pq(5, 32, 8, 4))
    x = torch.randn(3, 32)
    torch.testing.assert_close(inf.to_inference(lin)(x), lin(x).detach(), rtol=1e-4, atol=1e-4)
    tconv = PQConvTranspose2d.from_dense(
        nn.ConvTranspose2d(8, 4, 2, stride=2), block_size=4, n_centroids=8
    )
    tconv.set_quantization(*random_pq(8, 16, 4, 8))
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(inf.to_inference(tconv)(x), tconv(x).detach(), rtol=1e-4, atol=1e-4)


def test_an_arch_that_cannot_be_built_on_meta_loads_for_inference_through_the_cpu(tmp_path):
    """RegNet's builder computes its widths with tensors ("Cannot copy out of meta tensor"): built on the CPU."""
    torch.manual_seed(0)
    model = torchvision.models.regnet_y_400mf(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    plan = build_plan(model, execution_order(model, lambda m: m(x)),
                      QuantRules(skip=["*.se.*", "stem.*"], min_subvectors_per_centroid=1))
    swap_in_skeleton(model, plan)
    fill_random_pq(model, scale=0.05)
    round_codebooks_to_fp16(model)
    path = str(tmp_path / "regnet.pth")
    save_compressed(path, model, arch="regnet_y_400mf", num_classes=10)
    loaded = bgd_det.load_compressed(path, inference=True)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, inf.INFER_LAYER_TYPES) for m in loaded.modules())
    assert not any(isinstance(m, PQ_LAYER_TYPES) for m in loaded.modules())
