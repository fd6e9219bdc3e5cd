"""Activation capture: Gram matrices against patches gathered by explicit loops."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bgd_det.quantization.capture import capture_gram, capture_gram_pool, input_rows


def loop_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Reference im2col by explicit loops over output positions and groups."""
    b, c, h, w = x.shape
    ph, pw = conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cg = c // conv.groups
    rows = []
    for n in range(b):
        for g in range(conv.groups):
            for i in range(oh):
                for j in range(ow):
                    patch = xp[n, g * cg:(g + 1) * cg, i * sh: i * sh + dh * (kh - 1) + 1: dh,
                               j * sw: j * sw + dw * (kw - 1) + 1: dw]
                    rows.append(patch.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, groups=2),
                                    dict(kernel_size=(3, 1), dilation=2, padding=(2, 0)), dict(kernel_size=1)])
def test_input_rows_match_loops(kwargs):
    conv = nn.Conv2d(4, 6, **kwargs)
    x = torch.randn(2, 4, 7, 6)
    ours = input_rows(conv, x)
    ref = loop_rows(conv, x)
    # same multiset of rows: compare sorted by a projection, and Gram matrices.
    assert ours.shape == ref.shape
    assert torch.allclose(ours.T @ ours, ref.T @ ref, atol=1e-4)
    # rows reproduce the conv: out = rows @ W_g^T
    out = conv(x)
    b, o, oh, ow = out.shape
    g = conv.groups
    w = conv.weight.reshape(g, o // g, -1)
    rows = ours.reshape(b, g, oh * ow, -1)
    rebuilt = torch.einsum("bgpc,goc->bgop", rows, w).reshape(b, o, oh, ow) + conv.bias.view(1, -1, 1, 1)
    assert torch.allclose(rebuilt, out, atol=1e-5)


def test_capture_gram_is_mean_of_subvector_outer_products_and_stops_early():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    batches = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    calls = []
    model[3].register_forward_hook(lambda *a: calls.append(1))
    acc = capture_gram(model, "2", batches, lambda m, b: m(b), block_size=9)
    with torch.no_grad():
        rows = torch.cat([input_rows(model[2], model[1](model[0](b))) for b in batches])
    z = rows.reshape(-1, 9).double()
    assert torch.allclose(acc.result().double(), z.T @ z / z.shape[0], rtol=1e-5, atol=1e-6)
    assert calls == []  # the forward stopped at the captured layer
    assert not model[2]._forward_pre_hooks  # hook removed


def test_capture_linear_and_row_sampling():
    lin = nn.Linear(8, 2)
    model = nn.Sequential(lin)
    acc = capture_gram(model, "0", [torch.randn(10, 8)], lambda m, b: m(b), block_size=4, rows_per_image=3)
    assert acc.n_rows == 3 * 2  # 3 sampled rows, each 2 sub-vectors of size 4


def test_centered_gram_is_sum_of_block_covariances():
    from bgd_det.quantization.capture import GramAccumulator

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 12, generator=g) + torch.arange(12.0)  # 3 blocks of d=4 with distinct means
    acc = GramAccumulator(4)
    acc.add(rows[:100])
    acc.add(rows[100:])
    blocks = rows.double().reshape(300, 3, 4)
    centered = blocks - blocks.mean(0, keepdim=True)
    ref = torch.einsum("nbi,nbj->ij", centered, centered) / (300 * 3)
    assert torch.allclose(acc.result(centered=True).double(), ref, atol=1e-5)
    raw = torch.einsum("nbi,nbj->ij", blocks, blocks) / (300 * 3)
    assert torch.allclose(acc.result().double(), raw, rtol=1e-5)


def test_gram_pool_holds_one_gram_per_image_that_sum_to_the_shared_gram():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2))
    batches = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    grams, counts = capture_gram_pool(model, "2", batches, lambda m, b: m(b), block_size=6)
    acc = capture_gram(model, "2", batches, lambda m, b: m(b), block_size=6)
    assert grams.shape == (6, 6, 6) and counts.tolist() == [2 * 16 * 6] * 6  # 2 groups x 16 positions x 6 blocks
    assert torch.allclose(grams.sum(0) / counts.sum(), acc.result().double(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        first = input_rows(model[2], model[1](model[0](batches[0][:1]))).reshape(-1, 6).double()
    assert torch.allclose(grams[0], first.T @ first, rtol=1e-6)  # item 0 is image 0 alone
    sampled, n = capture_gram_pool(model, "2", batches, lambda m, b: m(b), block_size=6, rows_per_image=5)
    assert n.tolist() == [5 * 6] * 6 and not torch.allclose(sampled, grams)
