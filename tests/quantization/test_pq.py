"""PQ EM: Gram-form E-step against a brute-force ||X (w - c)||^2 reference; the accelerated EM
(Hamerly bounds, local search, chunked score blocks) against a plain Lloyd EM written out here."""
import pytest
import torch

from bgd_det.quantization import pq
from bgd_det.quantization.pq import assign, code_dtype, em_quantize, pq_decode, split_subvectors


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
    # 64 distinct points in 4 tight groups; K=16 starting from random points leaves clusters empty
    # without splits.
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


# -- the accelerated EM against a plain Lloyd EM written out here ----------------------------------


def reference_em(weight, gram, d, k, n_iter, seed, eps=1e-8):
    """EM as ``em_quantize`` documents it, without bounds or chunks: every E-step is a dense
    argmin of ``||z - c||^2`` (taken as differences) over all K centroids, lowest index on ties.

    Returns:
        (codes Tensor[N], centroids Tensor[K, d] in the transformed space, factor U, iterations).
    """
    z = weight.float().reshape(-1, d)
    if gram is None:
        u = torch.eye(d)
    else:
        g = gram.double()
        jitter = eps * g.diagonal().mean().clamp_min(1e-12) * torch.eye(d, dtype=torch.float64)
        u = torch.linalg.cholesky(g + jitter).T.float()
    z = z @ u.T
    gen = torch.Generator().manual_seed(seed)
    c = z[torch.randperm(z.shape[0], generator=gen)[:k]].clone()
    split_scale = 1e-3 * float(z.std())

    def nearest(c):
        return ((z[:, None, :] - c[None, :, :]) ** 2).sum(-1).argmin(1)

    idx, iterations = nearest(c), n_iter
    for it in range(n_iter):
        if it > 0:
            new = nearest(c)
            if torch.equal(new, idx):
                iterations = it
                break
            idx = new
        counts = torch.bincount(idx, minlength=k)
        for j in range(k):
            if counts[j]:
                c[j] = z[idx == j].mean(0)
        for e in (counts == 0).nonzero().flatten().tolist():  # split the most populated cluster
            big = int(counts.argmax())
            noise = torch.randn(d, generator=gen) * split_scale
            c[e], c[big] = c[big] + noise, c[big] - noise
            counts[e], counts[big] = counts[big] // 2, counts[big] - counts[big] // 2
    if 0 < n_iter == iterations:
        idx = nearest(c)  # the codes of the final centroids
    return idx, c, u, iterations


def _problem(seed, c_out, d, n_blocks, clustered):
    g = torch.Generator().manual_seed(seed)
    if clustered:  # sub-vectors around 24 centres: the EM settles and the bounds skip most points
        centres = torch.randn(24, d, generator=g) * 4
        pick = torch.randint(0, 24, (c_out * n_blocks,), generator=g)
        weight = (centres[pick] + torch.randn(c_out * n_blocks, d, generator=g)).reshape(c_out, -1)
    else:
        weight = torch.randn(c_out, n_blocks * d, generator=g)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, 1, d)
    x = torch.randn(400, d, generator=g) @ mix
    return weight, x.T @ x / 400


@pytest.mark.parametrize("d,k,n_iter,clustered,use_gram", [
    (4, 16, 6, False, True),     # stopped by n_iter (no fixed point yet)
    (9, 32, 100, False, True),   # runs to a fixed point
    (4, 64, 100, True, True),    # K > the 24 natural clusters: empty clusters and splits
    (4, 8, 100, True, False),    # plain k-means
    (8, 5, 0, False, True),      # no iteration: codes of the initial centroids
])
@pytest.mark.parametrize("e_step", ["hamerly", "hamerly+local", "lloyd"])
def test_em_matches_plain_lloyd(d, k, n_iter, clustered, use_gram, e_step, monkeypatch):
    monkeypatch.setattr(pq, "_BOUNDS_MIN_POINTS", 1 << 62 if e_step == "lloyd" else 0)
    if e_step == "hamerly+local":  # the local search (K >= 512 in use) on these small codebooks
        monkeypatch.setattr(pq, "_LOCAL_MIN_K", 0)
        monkeypatch.setattr(pq, "_N_NEAR", 3)
    weight, gram = _problem(d * 100 + k, 48, d, 20, clustered)
    gram = gram if use_gram else None
    res = em_quantize(weight, gram, block_size=d, n_centroids=k, n_iter=n_iter, seed=3)
    ref_idx, ref_c, u, ref_iters = reference_em(weight, gram, d, k, n_iter, seed=3)
    # Same codes: on these random problems no two centroids are within float32 rounding of a point's
    # nearest, so the score form of the implementation and the difference form here agree exactly.
    assert torch.equal(res.codes.flatten().long(), ref_idx)
    assert res.iterations == ref_iters
    # Centroids and objective agree up to summation order (index_add_ there, the mean of a masked
    # selection here; per-point squared distances summed in another order).
    torch.testing.assert_close(res.codebook @ u.T, ref_c, rtol=1e-5, atol=1e-5)
    z = weight.float().reshape(-1, d) @ u.T
    ref_obj = float(((z - ref_c[ref_idx]) ** 2).sum(1).double().sum())
    assert res.objective == pytest.approx(ref_obj, rel=1e-6)


def test_bounds_skip_settled_points(monkeypatch):
    """Most points are not searched again after a few iterations; the codes still match Lloyd's."""
    searched = []
    store = pq._Hamerly._store

    def counting(self, rows, own, found):
        searched.append(rows.numel())
        return store(self, rows, own, found)

    monkeypatch.setattr(pq, "_BOUNDS_MIN_POINTS", 0)
    monkeypatch.setattr(pq._Hamerly, "_store", counting)
    weight, gram = _problem(7, 256, 4, 32, clustered=True)
    n = weight.numel() // 4
    res = em_quantize(weight, gram, block_size=4, n_centroids=32, n_iter=40, seed=1)
    ref_idx, _, _, ref_iters = reference_em(weight, gram, 4, 32, 40, seed=1)
    assert torch.equal(res.codes.flatten().long(), ref_idx) and res.iterations == ref_iters
    assert res.iterations >= 3
    # The E-steps after the first (which searches every point; one per iteration in
    # res.iterations) searched fewer than half of the points on average.
    assert 0 < sum(searched) < 0.5 * n * res.iterations


def test_assign_matches_dense_argmin_and_breaks_ties_low():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(3000, 4, generator=g)
    centroids = torch.randn(40, 4, generator=g)
    centroids[7] = centroids[3]  # an exact duplicate: index 3 must win
    idx, dist = assign(points, centroids, chunk=256)
    ref = torch.cdist(points.double(), centroids.double()).pow(2)
    assert torch.equal(idx, ref.argmin(1))
    assert not (idx == 7).any() and (idx == 3).any()
    torch.testing.assert_close(dist.double(), ref.min(1).values, rtol=1e-4, atol=1e-4)


def test_block_threads_same_codes_and_restores_threads(monkeypatch):
    """Score blocks spread over 2 Python threads give Lloyd's codes; the thread count comes back."""
    monkeypatch.setattr(pq, "_BOUNDS_MIN_POINTS", 0)
    monkeypatch.setattr(pq, "_SCORE_BLOCK", 64 * 16)  # 64-row blocks: many per search
    weight, gram = _problem(11, 64, 4, 20, clustered=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = em_quantize(weight, gram, block_size=4, n_centroids=16, n_iter=30, seed=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    ref_idx, _, _, ref_iters = reference_em(weight, gram, 4, 16, 30, seed=2)
    assert torch.equal(res.codes.flatten().long(), ref_idx) and res.iterations == ref_iters


def test_resampled_em_draws_a_new_image_set_every_iteration(monkeypatch):
    """Item i's Gram is e_i e_i^T: the diagonal of each E-step's metric shows which images were drawn."""
    seen = []
    factor = pq._metric_factor
    monkeypatch.setattr(pq, "_metric_factor", lambda g, eps: seen.append(g.diagonal().clone()) or factor(g, eps))
    grams = torch.diag_embed(torch.eye(4, dtype=torch.float64))
    weight = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    res = pq.em_quantize_resampled(weight, grams, torch.ones(4, dtype=torch.float64), block_size=4, n_centroids=4,
                                   sample=2, n_iter=6, seed=0)
    assert len(seen) == 7 and res.iterations == 6
    draws = [tuple(torch.nonzero(s).flatten().tolist()) for s in seen[:6]]
    assert all(len(d) == 2 and torch.allclose(s[list(d)], torch.full((2,), 0.5)) for d, s in zip(draws, seen))
    assert len(set(draws)) > 1  # resampled, not one fixed draw
    assert torch.allclose(seen[6], torch.full((4,), 0.25))  # the final codes use the whole pool
    with pytest.raises(ValueError, match=r"QUANT.EM_RESAMPLE_IMAGES=5; allowed: 1 .. 4"):
        pq.em_quantize_resampled(weight, grams, torch.ones(4), block_size=4, n_centroids=4, sample=5)


def test_resampled_em_with_the_whole_pool_is_the_plain_em():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(6, 4, generator=g) * 3
    weight = (centres[torch.randint(0, 6, (96,), generator=g)] + 0.05 * torch.randn(96, 4, generator=g)).reshape(24, 16)
    x = torch.randn(40, 4, generator=g) * torch.tensor([0.3, 1.0, 2.0, 0.7])
    grams = torch.einsum("ni,nj->nij", x, x).double()
    counts = torch.ones(40, dtype=torch.float64)
    ref = em_quantize(weight, (grams.sum(0) / 40).float(), block_size=4, n_centroids=6, n_iter=20, seed=3)
    res = pq.em_quantize_resampled(weight, grams, counts, block_size=4, n_centroids=6, sample=40, n_iter=20, seed=3)
    assert torch.equal(res.codes, ref.codes)
    assert torch.allclose(res.codebook, ref.codebook, atol=1e-5)
    assert res.objective == pytest.approx(ref.objective, rel=1e-4)
