"""PQ EM: Gram-form E-step against a brute-force ||X (w - c)||^2 reference."""
import pytest
import torch

from bgd_det.quantization.pq import code_dtype, em_quantize, pq_decode, split_subvectors


def brute_force_assign(points, codebook, x):
    """argmin_c sum_n (x_n . (w - c))^2 computed directly from the activations X Tensor[N, d]."""
    # out[i, k] = ||X (w_i - c_k)||^2
    diff = points[:, None, :] - codebook[None, :, :]  # [P, K, d]
    proj = torch.einsum("nd,pkd->pkn", x, diff)
    return proj.pow(2).sum(-1).argmin(1), proj.pow(2).sum(-1)


@pytest.mark.parametrize("d,k", [(4, 16), (9, 32), (8, 8)])
def test_assignments_match_brute_force(d, k):
    g = torch.Generator().manual_seed(d)
    weight = torch.randn(24, 4 * d, generator=g, dtype=torch.float64).float()
    # Correlated, anisotropic activations so the metric differs from Euclidean.
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, 1.5, d)
    x = torch.randn(500, d, generator=g) @ mix
    gram = x.T @ x
    res = em_quantize(weight, gram, block_size=d, n_centroids=k, n_iter=8, seed=1)
    points = split_subvectors(weight, d)
    ref, dist = brute_force_assign(points.double(), res.codebook.double(), x.double())
    assert torch.equal(res.codes.flatten().long(), ref)
    assert res.objective == pytest.approx(float(dist.gather(1, ref[:, None]).sum()), rel=1e-3)
    # The metric matters: Euclidean assignment differs on these anisotropic activations.
    eucl = torch.cdist(points, res.codebook).argmin(1)
    assert not torch.equal(eucl, ref)


def test_gram_metric_reduces_output_error_vs_kmeans():
    g = torch.Generator().manual_seed(0)
    d = 9
    weight = torch.randn(64, 16 * d, generator=g)
    x = torch.randn(2000, d, generator=g) * torch.logspace(-1, 1, d)
    gram = x.T @ x
    ours = em_quantize(weight, gram, block_size=d, n_centroids=32, n_iter=20, seed=0)
    kmeans = em_quantize(weight, None, block_size=d, n_centroids=32, n_iter=20, seed=0)

    def output_error(res):
        err = split_subvectors(weight, d) - res.codebook[res.codes.flatten().long()]
        return float((err @ x.T).pow(2).sum())

    assert output_error(ours) < 0.8 * output_error(kmeans)


def test_em_decreases_objective_and_is_seeded():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 36, generator=g)
    gram = torch.eye(4) + 0.1
    r1 = em_quantize(weight, gram, block_size=4, n_centroids=16, n_iter=1, seed=5)
    r20 = em_quantize(weight, gram, block_size=4, n_centroids=16, n_iter=20, seed=5)
    r20b = em_quantize(weight, gram, block_size=4, n_centroids=16, n_iter=20, seed=5)
    assert r20.objective < r1.objective
    assert torch.equal(r20.codes, r20b.codes) and torch.equal(r20.codebook, r20b.codebook)


def test_empty_clusters_are_split():
    # 64 distinct points in 4 tight groups; K=16 starting from random points leaves clusters empty without splits.
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 4, generator=g) * 10
    points = centers.repeat_interleave(16, 0) + 0.01 * torch.randn(64, 4, generator=g)
    res = em_quantize(points, None, block_size=4, n_centroids=16, n_iter=10, seed=0)
    counts = torch.bincount(res.codes.flatten().long(), minlength=16)
    assert (counts > 0).all()


def test_exact_when_weight_has_k_distinct_subvectors():
    g = torch.Generator().manual_seed(1)
    book = torch.randn(8, 4, generator=g)
    codes = torch.arange(8).repeat(16)[torch.randperm(128, generator=g)].reshape(16, 8)
    weight = pq_decode(codes, book, (16, 32))
    res = em_quantize(weight, None, block_size=4, n_centroids=8, n_iter=30, seed=0)
    assert torch.allclose(pq_decode(res.codes, res.codebook, (16, 32)), weight, atol=1e-5)


def test_decode_layout_and_dtypes():
    book = torch.arange(12.0).reshape(3, 4)
    codes = torch.tensor([[2, 0], [1, 1]], dtype=torch.uint8)
    w = pq_decode(codes, book, (2, 8))
    assert torch.equal(w[0], torch.cat([book[2], book[0]]))
    assert torch.equal(w[1], torch.cat([book[1], book[1]]))
    assert code_dtype(256) == torch.uint8 and code_dtype(2048) == torch.int16


def test_bad_inputs():
    with pytest.raises(ValueError, match="block_size=5 does not divide"):
        em_quantize(torch.randn(4, 18), None, block_size=5, n_centroids=2)
    with pytest.raises(ValueError, match="n_centroids=64 exceeds"):
        em_quantize(torch.randn(4, 8), None, block_size=4, n_centroids=64)
    with pytest.raises(ValueError, match=r"gram has shape \(3, 3\)"):
        em_quantize(torch.randn(4, 8), torch.eye(3), block_size=4, n_centroids=2)
