"""Output-space refinement: the objective, the code sweep and the codebook solve against explicit references."""
import copy
import logging
import re

import pytest
import torch
from torch import nn

from bgd_det.quantization.capture import SecondMoments, StopForward, capture_second_moments, input_rows
from bgd_det.quantization.pq import em_quantize, pq_decode
from bgd_det.quantization.refine import (_decode, _solve_codebook, _sweep_codes, damping_metric, output_objective,
                                         refine_pq)


def _moments(xs: torch.Tensor, xt: torch.Tensor) -> SecondMoments:
    """Moments of paired rows Tensor[g, N, D]."""
    xs, xt = xs.double(), xt.double()
    n = xs.shape[1]
    return SecondMoments(xs.transpose(1, 2) @ xs / n, xs.transpose(1, 2) @ xt / n, xt.transpose(1, 2) @ xt / n,
                         xs.mean(1), xt.mean(1), n)


def _problem(g=1, m=24, dim=36, n=3000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(g, dim, dim, generator=gen) / dim ** 0.5
    xt = torch.randn(g, n, dim, generator=gen) @ mix + 0.5  # correlated columns, non-zero mean
    xs = xt + 0.2 * torch.randn(g, n, dim, generator=gen)  # the student's drifted input
    weight = torch.randn(g * m, dim, generator=gen)
    return weight, xs, xt


def _explicit_f(weight, w_hat, xs, xt, lam, rows=None):
    """sum_o r_o (E|w_hat_o x_s - w_o x_t|^2 + lam_g |w_hat_o - w_o|^2) from the rows themselves."""
    g, n, dim = xs.shape
    w = weight.double().reshape(g, -1, dim)
    r = torch.ones(g, w.shape[1]) if rows is None else rows.reshape(g, -1)
    err = xs.double() @ w_hat.double().transpose(1, 2) - xt.double() @ w.transpose(1, 2)  # Tensor[g, n, m]
    per_row = (err * err).sum(1) / n + (lam.view(g, 1, 1) * (w_hat.double() - w) ** 2).sum(2)
    return float((per_row * r.double()).sum())


@pytest.mark.parametrize("target", ["teacher", "weights"])
def test_objective_matches_explicit_output_error(target):
    weight, xs, xt = _problem(g=2, m=6, dim=12)
    rows = torch.rand(12) + 0.5
    obj = output_objective(weight, _moments(xs, xt), damping=0.05, target=target, row_weight=rows)
    w_hat = torch.randn(2, 6, 12, dtype=torch.float64)
    lam = 0.05 * (xs.double().transpose(1, 2) @ xs.double() / xs.shape[1]).diagonal(dim1=1, dim2=2).mean(1)
    ref = _explicit_f(weight, w_hat, xs, xs if target == "weights" else xt, lam, rows)
    assert obj.value(w_hat) == pytest.approx(ref, rel=1e-9)
    # the reported output error leaves the damping out
    plain = _explicit_f(weight, w_hat, xs, xs if target == "weights" else xt, torch.zeros_like(lam), rows)
    assert obj.output_error(w_hat) == pytest.approx(plain, rel=1e-9)
    assert plain < ref


@pytest.mark.parametrize("metric", ["identity", "diagonal", "channel"])
def test_damping_metric_matches_explicit_ridge(metric):
    """f = E|w_hat x_s - w x_t|^2 + lam (w_hat - w) M (w_hat - w)^T, M built here from the rows themselves."""
    g, m, c_in, k = 2, 5, 4, 3
    dim = c_in * k * k
    _, xs, xt = _problem(g=g, m=m, dim=dim)
    weight = torch.randn(g * m, c_in, k, k, generator=torch.Generator().manual_seed(3))
    obj = output_objective(weight, _moments(xs, xt), damping=0.3, metric=metric)
    h = xs.double().transpose(1, 2) @ xs.double() / xs.shape[1]  # Tensor[g, D, D]
    if metric == "identity":
        ref_m = torch.eye(dim, dtype=torch.float64) * h.diagonal(dim1=1, dim2=2).mean(1).view(g, 1, 1)
    elif metric == "diagonal":
        ref_m = torch.diag_embed(h.diagonal(dim1=1, dim2=2))
    else:  # one k*k block per input channel, nothing across channels
        ref_m = torch.zeros_like(h)
        for c in range(c_in):
            cols = slice(c * k * k, (c + 1) * k * k)
            ref_m[:, cols, cols] = h[:, cols, cols]
    assert torch.allclose(damping_metric(h, metric, k * k), ref_m, atol=1e-9)
    # every metric carries the trace of H, so one damping value means a comparable strength
    assert torch.allclose(ref_m.diagonal(dim1=1, dim2=2).sum(1), h.diagonal(dim1=1, dim2=2).sum(1))
    w = weight.double().reshape(g, m, dim)
    w_hat = w + 0.5 * torch.randn(g, m, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    err = xs.double() @ w_hat.transpose(1, 2) - xt.double() @ w.transpose(1, 2)
    diff = w_hat - w
    ref = float((err * err).sum() / xs.shape[1] + 0.3 * (diff @ ref_m * diff).sum())
    assert obj.value(w_hat) == pytest.approx(ref, rel=1e-9)
    # a Linear layer (kernel 1): "channel" is "diagonal"
    lin = torch.randn(g * m, dim, generator=torch.Generator().manual_seed(5))
    a = output_objective(lin, _moments(xs, xt), damping=0.3, metric="channel")
    b = output_objective(lin, _moments(xs, xt), damping=0.3, metric="diagonal")
    assert torch.allclose(a.h, b.h, atol=1e-9) and a.const == pytest.approx(b.const, rel=1e-12)


def test_code_sweep_is_exact_coordinate_descent():
    weight, xs, xt = _problem(m=5, dim=12)
    obj = output_objective(weight, _moments(xs, xt))
    d, k = 4, 6
    codebook = torch.randn(k, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    codes = torch.randint(0, k, (5, 3), generator=torch.Generator().manual_seed(2))
    swept = _sweep_codes(obj, codes, codebook)
    # Reference: block by block, try every centroid for every row with the current other blocks.
    ref = codes.clone()
    for blk in range(3):
        for row in range(5):
            values = []
            for c in range(k):
                trial = ref.clone()
                trial[row, blk] = c
                values.append(obj.value(_decode(trial, codebook, 1)))
            ref[row, blk] = int(torch.tensor(values).argmin())
    assert torch.equal(swept, ref)
    assert obj.value(_decode(swept, codebook, 1)) <= obj.value(_decode(codes, codebook, 1))


@pytest.mark.parametrize("weighted", [False, True])
def test_codebook_solve_equals_least_squares(weighted):
    weight, xs, xt = _problem(m=8, dim=12)
    rows = torch.rand(8, generator=torch.Generator().manual_seed(4)) * 10 + 0.1 if weighted else torch.ones(8)
    obj = output_objective(weight, _moments(xs, xt), row_weight=rows if weighted else None)
    k, d = 5, 4
    codes = torch.randint(0, k - 1, (8, 3), generator=torch.Generator().manual_seed(3))  # centroid 4 unused
    start = torch.randn(k, d, dtype=torch.float64)
    solved = _solve_codebook(obj, codes, start, iters=200)
    # Reference: the codebook enters f linearly through W_hat = S vec(C); solve the normal equations directly.
    basis = torch.eye(k * d, dtype=torch.float64)
    cols = torch.stack([_decode(codes, e.view(k, d), 1).reshape(-1) for e in basis], 1)  # Tensor[m*D, K*d]
    h_big = torch.block_diag(*[obj.h[0] * float(r) for r in rows])
    a = cols.T @ h_big @ cols
    rhs = cols.T @ (obj.b[0] * rows.double().unsqueeze(1)).reshape(-1)
    ref = torch.linalg.lstsq(a, rhs).solution.view(k, d)
    assert obj.value(_decode(codes, solved, 1)) == pytest.approx(obj.value(_decode(codes, ref, 1)), rel=1e-9)
    assert torch.equal(solved[4], start[4])  # an unused centroid is left alone


def test_refine_lowers_output_error_of_the_em_and_keeps_layout():
    weight, xs, xt = _problem(m=32, dim=36)
    moments = _moments(xs, xt)
    init = em_quantize(weight, None, block_size=9, n_centroids=16, n_iter=20, seed=0)
    obj = output_objective(weight, moments)
    before = obj.output_error(_decode(init.codes, init.codebook.double(), 1)) / obj.scale
    out = refine_pq(obj, init.codes, init.codebook, rounds=4)
    assert out.codes.dtype == init.codes.dtype and out.codes.shape == init.codes.shape
    assert out.objective < 0.8 * before
    w_hat = pq_decode(out.codes, out.codebook, weight.shape).double().unsqueeze(0)
    assert obj.output_error(w_hat) / obj.scale == pytest.approx(out.objective, rel=1e-5)  # the damping left out
    assert obj.value(w_hat) / obj.scale > out.objective


def test_refine_stops_at_the_first_round_that_does_not_lower_the_error(caplog):
    weight, xs, xt = _problem(m=32, dim=36)
    init = em_quantize(weight, None, block_size=9, n_centroids=16, n_iter=20, seed=0)
    obj = output_objective(weight, _moments(xs, xt))
    with caplog.at_level(logging.INFO, logger="bgd_det.quantization.refine"):
        long = refine_pq(obj, init.codes, init.codebook, rounds=200, label="probe")
    kept = int(re.search(r"probe: .* (\d+) of 200 rounds kept\)", caplog.text).group(1))
    assert 0 < kept < 200  # converged: a later round did not lower the error and ended the refinement
    short = refine_pq(obj, init.codes, init.codebook, rounds=kept)
    assert torch.equal(short.codes, long.codes) and torch.equal(short.codebook, long.codebook)
    assert short.objective == long.objective


def test_refine_with_groups_treats_each_group_with_its_own_inputs():
    weight, xs, xt = _problem(g=2, m=8, dim=18)
    init = em_quantize(weight, None, block_size=9, n_centroids=8, n_iter=10, seed=0)
    obj = output_objective(weight, _moments(xs, xt))
    out = refine_pq(obj, init.codes, init.codebook, rounds=3)
    lam = 0.01 * obj.h.diagonal(dim1=1, dim2=2).mean(1) / 1.01
    w_hat = pq_decode(out.codes, out.codebook, weight.shape).reshape(2, 8, 18)
    assert obj.value(w_hat) == pytest.approx(_explicit_f(weight, w_hat, xs, xt, lam), rel=1e-4)
    assert out.objective * obj.scale == pytest.approx(_explicit_f(weight, w_hat, xs, xt, 0 * lam), rel=1e-4)


def test_capture_second_moments_pairs_student_and_teacher_positions():
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, groups=2))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.mul_(0.9)
    batches = [torch.randn(2, 3, 5, 5) for _ in range(2)]
    mom = capture_second_moments(student, teacher, "2", batches, lambda m, b: m(b))
    with torch.no_grad():
        def rows(model):
            r = torch.cat([input_rows(model[2], model[1](model[0](b))).reshape(2, 2, 25, 18) for b in batches])
            return r.transpose(0, 1).reshape(2, -1, 18).double()
        xs, xt = rows(student), rows(teacher)
    ref = _moments(xs, xt)
    for name in ("ss", "st", "tt", "mean_s", "mean_t"):
        assert torch.allclose(getattr(mom, name), getattr(ref, name), atol=1e-6), name
    centered = mom.centered()
    assert torch.allclose(centered.st[0], torch.cov(torch.cat([xs[0].T, xt[0].T]), correction=0)[:18, 18:],
                          atol=1e-6)


def test_capture_second_moments_keeps_every_call_of_a_shared_module():
    """A module called several times per forward (the RPN head, once per FPN level) contributes the rows of every
    call, not only the last one's (the bug: 2 of 3 calls were dropped)."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, levels):  # as rpn_stage: every level reaches the capture hook, then stop
            stopped = False
            for x in levels:
                try:
                    self.head(x)
                except StopForward:
                    stopped = True
            if stopped:
                raise StopForward

    teacher = Shared()
    student = copy.deepcopy(teacher)
    levels = [torch.randn(2, 3, s, s) for s in (6, 4, 2)]
    student_levels = [x * 1.1 for x in levels]
    mom = capture_second_moments(student, teacher, "head", [0], lambda m, b: m(student_levels if m is student
                                                                                   else levels))
    xs = torch.cat([input_rows(teacher.head, x) for x in student_levels]).double().unsqueeze(0)
    xt = torch.cat([input_rows(teacher.head, x) for x in levels]).double().unsqueeze(0)
    assert mom.n_rows == 2 * (36 + 16 + 4)
    ref = _moments(xs, xt)
    for name in ("ss", "st", "tt", "mean_s", "mean_t"):
        assert torch.allclose(getattr(mom, name), getattr(ref, name), atol=1e-6), name


def test_merged_moments_equal_the_moments_of_all_rows():
    _, xs, xt = _problem(g=2, m=4, dim=6, n=50)
    whole = _moments(xs, xt)
    parts = _moments(xs[:, :20], xt[:, :20]).merged(_moments(xs[:, 20:], xt[:, 20:]))
    assert parts.n_rows == 50
    for name in ("ss", "st", "tt", "mean_s", "mean_t"):
        assert torch.allclose(getattr(parts, name), getattr(whole, name), atol=1e-12), name
    with_skip = _moments(xs, xt)
    with_skip.sd = torch.zeros(2, 6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="with and without a captured skip path"):
        whole.merged(with_skip)


def test_capture_second_moments_samples_the_same_rows_from_both():
    model = nn.Sequential(nn.Conv2d(2, 3, 1))
    mom = capture_second_moments(model, model, "0", [torch.randn(4, 2, 6, 6)], lambda m, b: m(b),
                                 rows_per_image=5)
    assert mom.n_rows == 20
    assert torch.allclose(mom.ss, mom.st) and torch.allclose(mom.ss, mom.tt)


def test_bad_target_and_shapes_are_named():
    weight, xs, xt = _problem(m=4, dim=8)
    with pytest.raises(ValueError, match="TARGET='student'.*allowed"):
        output_objective(weight, _moments(xs, xt), target="student")
    obj = output_objective(weight, _moments(xs, xt))
    with pytest.raises(ValueError, match="do not match"):
        refine_pq(obj, torch.zeros(4, 3, dtype=torch.uint8), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="row_weight must be positive"):
        output_objective(weight, _moments(xs, xt), row_weight=torch.zeros(4))
    with pytest.raises(ValueError, match="DAMPING_METRIC='block'; allowed: 'identity', 'diagonal', 'channel'"):
        output_objective(weight, _moments(xs, xt), metric="block")


def test_quantizer_refines_conv_layers_and_lowers_their_output_error(tiny_images, tmp_path):
    from bgd_det.engine.quantizer import Quantizer
    from bgd_det.modeling import build_teacher
    from bgd_det.tasks import build_task
    from conftest import tiny_cfg

    # 8 capture images of 32x32 give >= 72 rows for every conv; the fc sees 8 rows < 16 columns: kept as is.
    plain = tiny_cfg(tmp_path / "plain", "QUANT.METRIC", "identity")
    refined = tiny_cfg(tmp_path / "refined", "QUANT.METRIC", "identity", "QUANT.REFINE.ROUNDS", 2)
    torch.manual_seed(0)
    teacher = build_teacher(plain)
    a = Quantizer(plain, teacher, build_task(plain)).run()
    b = Quantizer(refined, teacher, build_task(refined)).run()
    rec_a = {r.name: r for r in a.records}
    rec_b = {r.name: r for r in b.records}
    for name in ("conv1", "conv2", "conv3"):
        assert 0 < rec_b[name].output_error < 1.0, name  # relative output error against the teacher
        assert rec_a[name].output_error != rec_a[name].output_error, name  # nan: not refined
        assert not torch.equal(a.student.get_submodule(name).codes, b.student.get_submodule(name).codes), name
    assert torch.equal(a.student.fc.codes, b.student.fc.codes)  # too few rows: the EM result is kept
    assert rec_b["fc"].output_error != rec_b["fc"].output_error


def test_augmented_views_give_short_layers_enough_rows_to_refine(tiny_images, tmp_path, caplog):
    from bgd_det.engine.quantizer import Quantizer
    from bgd_det.modeling import build_teacher
    from bgd_det.tasks import build_task
    from conftest import tiny_cfg

    # The fc sees 8 rows (one per capture image) for 16 columns: 2 augmented passes give it 24 >= 16; the convs
    # have >= 8 x 16 rows per column from the plain pass and take none.
    cfg = tiny_cfg(tmp_path, "QUANT.METRIC", "identity", "QUANT.REFINE.ROUNDS", 2,
                   "QUANT.REFINE.AUGMENTED_VIEWS", 2, "QUANT.REFINE.MIN_ROWS_PER_COLUMN", 8)
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    with caplog.at_level("INFO", logger="bgd_det.engine.quantizer"):
        result = Quantizer(cfg, teacher, build_task(cfg)).run()
    records = {r.name: r for r in result.records}
    assert 0 < records["fc"].output_error < 1.0  # refined
    assert [m for m in caplog.messages if "augmented passes" in m] == [
        "fc: 8 rows from the plain pass < 8 x 16 columns: 2 augmented passes -> 24 rows"]
    with pytest.raises(ValueError, match="AUGMENTED_VIEWS=-1; allowed: an integer >= 0"):  # when the config loads
        tiny_cfg(tmp_path / "bad", "QUANT.REFINE.ROUNDS", 1, "QUANT.REFINE.AUGMENTED_VIEWS", -1)


def test_damping_grows_with_the_columns_per_captured_row(tiny_images, tmp_path, monkeypatch):
    import bgd_det.engine.quantizer as quantizer
    from bgd_det.modeling import build_teacher
    from bgd_det.tasks import build_task
    from conftest import tiny_cfg

    seen = []
    real = quantizer.output_objective

    def spy(weight, moments, **kwargs):
        seen.append((moments.ss.shape[1], moments.n_rows, kwargs["damping"], kwargs["metric"]))
        return real(weight, moments, **kwargs)

    monkeypatch.setattr(quantizer, "output_objective", spy)
    cfg = tiny_cfg(tmp_path, "QUANT.METRIC", "identity", "QUANT.REFINE.ROUNDS", 1,
                   "QUANT.REFINE.DAMPING_PER_COLUMN", 3.0, "QUANT.REFINE.DAMPING_METRIC", "channel")
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    quantizer.Quantizer(cfg, teacher, build_task(cfg)).run()
    assert len(seen) == 3  # the three convs (the fc has too few rows and is not refined)
    for dim, rows, damping, metric in seen:
        assert damping == pytest.approx(0.01 + 3.0 * dim / rows)
        assert metric == "channel"
    with pytest.raises(ValueError, match="DAMPING_PER_COLUMN=-1.0; allowed: numbers >= 0"):  # when the config loads
        tiny_cfg(tmp_path / "bad", "QUANT.REFINE.ROUNDS", 1, "QUANT.REFINE.DAMPING_PER_COLUMN", -1.0)
    with pytest.raises(ValueError, match="DAMPING_METRIC='full'; allowed: 'identity', 'diagonal', 'channel'"):
        tiny_cfg(tmp_path / "bad2", "QUANT.REFINE.ROUNDS", 1, "QUANT.REFINE.DAMPING_METRIC", "full")


def test_objective_with_skip_difference_matches_explicit_error():
    weight, xs, xt = _problem(m=6, dim=12)
    resid = torch.randn(1, xs.shape[1], 6, generator=torch.Generator().manual_seed(5))  # skip_t - skip_s rows
    gain = torch.rand(6) + 0.5
    mom = _moments(xs, xt)
    n = xs.shape[1]
    mom.sd, mom.td = xs.double().transpose(1, 2) @ resid.double() / n, xt.double().transpose(1, 2) @ resid.double() / n
    mom.dd, mom.mean_d = (resid.double() ** 2).mean(1), resid.double().mean(1)
    for m in (mom, mom.centered()):
        obj = output_objective(weight, m, damping=0.0, residual_gain=gain)
        w_hat = torch.randn(1, 6, 12, dtype=torch.float64)
        a, b, r = xs.double(), xt.double(), resid.double()
        if m is not mom:  # centered: every stream minus its mean
            a, b, r = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), r - r.mean(1, keepdim=True)
        err = a @ w_hat.transpose(1, 2) - b @ weight.double().T - r / gain.double()
        assert obj.value(w_hat) == pytest.approx(float((err * err).sum() / n), rel=1e-9)
    with pytest.raises(ValueError, match="residual_gain is required"):
        output_objective(weight, mom)


def test_residual_ridge_bounds_the_compensation_of_a_shut_channel():
    """A ResNet-50 bn3 gain of ~2e-6 asked its conv3 for r / a (docs/detection_fidelity.md): with the ridge the
    target of that channel stays bounded, the others keep ~r / a, and a floor of 0 is the plain 1 / a."""
    from bgd_det.quantization.refine import residual_ridge

    weight, xs, xt = _problem(m=6, dim=12)
    resid = torch.randn(1, xs.shape[1], 6, generator=torch.Generator().manual_seed(5))
    gain = torch.tensor([1.0, 0.8, 1.2, 0.9, 1.1, 2e-6])
    mom = _moments(xs, xt)
    n = xs.shape[1]
    mom.sd, mom.td = xs.double().transpose(1, 2) @ resid.double() / n, xt.double().transpose(1, 2) @ resid.double() / n
    mom.dd, mom.mean_d = (resid.double() ** 2).mean(1), resid.double().mean(1)
    mu = residual_ridge(gain, 0.05)
    assert mu == pytest.approx((0.05 * float(gain.abs().median())) ** 2)
    assert residual_ridge(gain, 0.0) == 0.0 and residual_ridge(None, 0.05) == 0.0
    plain = output_objective(weight, mom, damping=0.0, residual_gain=gain)
    damped = output_objective(weight, mom, damping=0.0, residual_gain=gain, residual_ridge=mu)
    inv = gain.double() / (gain.double() ** 2 + mu)
    a, b, r = xs.double(), xt.double(), resid.double()
    w_hat = torch.randn(1, 6, 12, dtype=torch.float64)
    err = a @ w_hat.transpose(1, 2) - b @ weight.double().T - r * inv
    assert damped.value(w_hat) == pytest.approx(float((err * err).sum() / n), rel=1e-9)
    # the shut channel's share of the constant: ~r^2 / a^2 (huge) without the ridge, bounded with it
    assert plain.const > 1e9 and damped.const < 1e3
    assert float(inv[:5].mul(gain[:5].double()).min()) > 0.99  # the others keep ~1 / a
    with pytest.raises(ValueError, match="RESIDUAL_GAIN_FLOOR=-1.0; allowed: a finite number >= 0"):
        residual_ridge(gain, -1.0)


def test_residual_rules_and_skip_capture():
    from torchvision.models import resnet18

    from bgd_det.quantization.residual import residual_branch_end

    net = resnet18(num_classes=4).eval()
    assert residual_branch_end(net, "layer1.0.conv1") is None and residual_branch_end(net, "fc") is None
    block_name, skip_fn = residual_branch_end(net, "layer2.0.conv2")
    assert block_name == "layer2.0"
    student = copy.deepcopy(net)
    with torch.no_grad():
        student.conv1.weight.mul_(0.8)
    x = torch.randn(2, 3, 64, 64)
    mom = capture_second_moments(student, net, "layer2.0.conv2", [x], lambda m, b: m(b),
                                 skip=(block_name, skip_fn))
    with torch.no_grad():
        def parts(model):
            h = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
            block = model.layer2[0]
            inner = block.relu(block.bn1(block.conv1(h)))
            rows = input_rows(block.conv2, inner).double()
            skip = block.downsample(h)
            return rows, skip.flatten(2).transpose(1, 2).reshape(-1, skip.shape[1]).double()
        rs, ss = parts(student)
        rt, st = parts(net)
    r = st - ss
    assert torch.allclose(mom.sd[0], rs.T @ r / r.shape[0], atol=1e-5)
    assert torch.allclose(mom.td[0], rt.T @ r / r.shape[0], atol=1e-5)
    assert torch.allclose(mom.dd[0], (r * r).mean(0), atol=1e-6)


def test_rounds_override_reaches_the_refinement(tiny_images, tmp_path, monkeypatch):
    """A per-layer REFINE.ROUNDS override sets that layer's rounds; 0 turns its refinement off."""
    import math

    import bgd_det.engine.quantizer as quantizer
    from bgd_det.modeling import build_teacher
    from bgd_det.tasks import build_task
    from conftest import tiny_cfg

    seen = {}
    real = quantizer.refine_pq

    def spy(obj, codes, codebook, **kwargs):
        seen[kwargs["label"].split(" ")[0]] = kwargs["rounds"]
        return real(obj, codes, codebook, **kwargs)

    monkeypatch.setattr(quantizer, "refine_pq", spy)
    cfg = tiny_cfg(tmp_path, "QUANT.METRIC", "identity", "QUANT.REFINE.ROUNDS", 1,
                   "QUANT.OVERRIDES", "[['conv1', 'REFINE.ROUNDS', 0], ['conv3', 'REFINE.ROUNDS', 3]]")
    torch.manual_seed(0)
    result = quantizer.Quantizer(cfg, build_teacher(cfg), build_task(cfg)).run()
    assert seen == {"conv2": 1, "conv3": 3}  # fc has too few rows to be refined
    records = {r.name: r for r in result.records}
    assert math.isnan(records["conv1"].output_error) and records["conv3"].output_error < 1.0


@pytest.mark.parametrize("rows_per_image", [0, 7])
def test_projected_capture_gives_the_full_capture_objective(rows_per_image):
    """Keeping the teacher's side only as ``W x_t`` (QUANT.REFINE.TARGET 'teacher') gives the objective of the
    full ``st`` / ``tt`` capture, plain and centered, with a skip path and merged over two passes."""
    from torchvision.models import resnet18

    from bgd_det.quantization.residual import residual_branch_end

    torch.manual_seed(0)
    net = resnet18(num_classes=4).eval()
    student = copy.deepcopy(net)
    with torch.no_grad():
        student.conv1.weight.mul_(0.8)
    name = "layer2.0.conv2"
    weight = net.get_submodule(name).weight.detach()
    skip = residual_branch_end(net, name)
    passes = [[torch.randn(2, 3, 64, 64)], [torch.randn(1, 3, 64, 64)]]
    full, proj = [], []
    for seed, batches in enumerate(passes):
        kw = dict(skip=skip, rows_per_image=rows_per_image, seed=seed)
        full.append(capture_second_moments(student, net, name, batches, lambda m, b: m(b), **kw))
        proj.append(capture_second_moments(student, net, name, batches, lambda m, b: m(b), project=weight, **kw))
    assert proj[0].projected and proj[0].st is None and proj[0].tt is None and proj[0].td is None
    full_m, proj_m = full[0].merged(full[1]), proj[0].merged(proj[1])
    gain = torch.rand(128) + 0.5
    w_hat = weight.double().reshape(1, 128, -1) + 0.01 * torch.randn(1, 128, 1152, dtype=torch.float64)
    for a, b in ((full_m, proj_m), (full_m.centered(), proj_m.centered())):
        oa = output_objective(weight, a, damping=0.01, residual_gain=gain, row_weight=gain ** 2)
        ob = output_objective(weight, b, damping=0.01, residual_gain=gain, row_weight=gain ** 2)
        # float32 products summed in another order (W (x_t x_s^T) vs (W x_t) x_s^T): agreement to ~1e-6
        assert float((oa.b - ob.b).abs().max() / oa.b.abs().max()) < 1e-5
        assert ob.const == pytest.approx(oa.const, rel=1e-6)
        assert ob.value(w_hat) == pytest.approx(oa.value(w_hat), rel=1e-5)  # const - 2 b.w + w.h.w cancels
    with pytest.raises(ValueError, match="with and without a projection"):
        full[0].merged(proj[1])


def test_skip_path_first_moves_each_downsample_before_its_branch_end():
    from torchvision.models import resnet18

    from bgd_det.config import load_config
    from bgd_det.quantization.residual import skip_path_first

    net = resnet18(num_classes=4)
    order = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
             "layer2.0.downsample.0", "layer2.1.conv1", "fc"]
    assert skip_path_first(net, order) == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1",
                                           "layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv1", "fc"]
    assert skip_path_first(net, order[:5] + order[6:]) == order[:5] + order[6:]  # downsample skipped: no change
    with pytest.raises(ValueError, match="SKIP_PATH_FIRST=True with QUANT.REFINE.RESIDUAL=False; allowed"):
        load_config("", ["QUANT.REFINE.SKIP_PATH_FIRST", "True"])
