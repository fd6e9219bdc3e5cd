"""Codebook layers reproduce dense layers whose weights are exactly their decode."""
import pytest
import torch
from torch import nn

from bgd_det.quantization.layers import PQConv2d, PQConvTranspose2d, PQLinear
from bgd_det.quantization.pq import pq_decode


def fill_random(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, layer.n_centroids, layer.codes.shape, generator=g)
    layer.set_quantization(codes, torch.randn(layer.n_centroids, layer.block_size, generator=g))
    return layer


@pytest.mark.parametrize("kwargs,d", [(dict(kernel_size=3, padding=1), 9), (dict(kernel_size=3, stride=2, groups=2), 18),
                                      (dict(kernel_size=3, dilation=2, padding=2), 9), (dict(kernel_size=1), 4)])
def test_pq_conv_matches_dense_conv(kwargs, d):
    dense = nn.Conv2d(8, 16, **kwargs)
    pq = fill_random(PQConv2d.from_dense(dense, block_size=d, n_centroids=16))
    dense.weight.data = pq_decode(pq.codes, pq.codebook.data, dense.weight.shape)
    x = torch.randn(2, 8, 9, 9)
    assert torch.allclose(pq(x), dense(x), atol=1e-5)
    assert "weight" not in dict(pq.named_parameters())
    assert pq.codes.dtype == torch.uint8 and "codes" in dict(pq.named_buffers())


def test_pq_linear_int16_codes_and_grad():
    dense = nn.Linear(16, 5)
    pq = fill_random(PQLinear.from_dense(dense, block_size=4, n_centroids=512))
    assert pq.codes.dtype == torch.int16
    dense.weight.data = pq.decoded_weight().detach()
    x = torch.randn(3, 16)
    assert torch.allclose(pq(x), dense(x), atol=1e-5)
    pq(x).sum().backward()
    assert pq.codebook.grad is not None and pq.codebook.grad.abs().sum() > 0


def test_pq_conv_transpose_matches_dense():
    dense = nn.ConvTranspose2d(8, 6, 2, stride=2)
    pq = fill_random(PQConvTranspose2d.from_dense(dense, block_size=4, n_centroids=8))
    dense.weight.data = pq.decoded_weight().detach()
    x = torch.randn(1, 8, 5, 5)
    assert torch.allclose(pq(x), dense(x), atol=1e-5)


def test_set_quantization_validates():
    pq = PQLinear(8, 2, block_size=4, n_centroids=4)
    with pytest.raises(ValueError, match="codes shape"):
        pq.set_quantization(torch.zeros(3, 2, dtype=torch.uint8), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="out of range"):
        pq.set_quantization(torch.full((2, 2), 7, dtype=torch.uint8), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="does not divide"):
        PQLinear(10, 2, block_size=4, n_centroids=4)
