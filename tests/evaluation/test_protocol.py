"""The frozen protocol's statistics: per-seed summary and the paired bootstrap against a loop reference."""
import math

import pytest
import torch

from bgd_det.evaluation.classification import ClassificationEvaluator
from bgd_det.evaluation.protocol import paired_bootstrap, seed_summary


def test_seed_summary_is_mean_and_sample_sd_of_per_seed_top1():
    hits = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    s = seed_summary(hits)
    assert s.values == (50.0, 75.0, 25.0) and s.mean == pytest.approx(50.0) and s.sd == pytest.approx(25.0)
    assert seed_summary(hits[0]).sd == 0.0


def test_paired_bootstrap_matches_a_loop_reference_and_is_paired():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(200, generator=g) < 0.7
    ours = torch.stack([ref ^ (torch.rand(200, generator=g) < 0.1) for _ in range(4)])
    res = paired_bootstrap(ours, ref, n_boot=2000, seed=5)
    diff = ours.double().mean(0) - ref.double()
    assert res.mean == pytest.approx(100 * float(diff.mean()))
    gen = torch.Generator().manual_seed(5)
    draws = torch.randint(0, 200, (2000, 200), generator=gen)
    boot = sorted(100 * float(diff[d].mean()) for d in draws)
    assert res.low == pytest.approx(boot[int(0.025 * 1999)], abs=0.2)
    assert res.high == pytest.approx(boot[int(math.ceil(0.975 * 1999))], abs=0.2)
    assert res.low < res.mean < res.high
    # Pairing: an identical model has a zero-width interval, which unpaired resampling would not give.
    same = paired_bootstrap(ref, ref, n_boot=500)
    assert same.mean == same.low == same.high == 0.0


def test_paired_bootstrap_averages_a_reference_over_its_seeds():
    g = torch.Generator().manual_seed(1)
    ours = torch.rand(3, 100, generator=g) < 0.6
    ref = torch.rand(2, 100, generator=g) < 0.6
    res = paired_bootstrap(ours, ref, n_boot=500)
    assert res.mean == pytest.approx(100 * float(ours.double().mean(0).mean() - ref.double().mean(0).mean()))
    # the same as handing it the per-image hit rate over its seeds
    rate = paired_bootstrap(ours, ref.double().mean(0), n_boot=500)
    assert (res.low, res.high) == pytest.approx((rate.low, rate.high))


def test_paired_bootstrap_refuses_different_images():
    with pytest.raises(ValueError, match="ours has 3 images and the reference 4"):
        paired_bootstrap(torch.ones(2, 3), torch.ones(4))


def test_evaluator_per_image_hits_follow_the_images():
    ev = ClassificationEvaluator(topk=(1,), per_image=True)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 3.0, 1.0]])
    ev.process((None, torch.tensor([0, 1, 1])), logits)
    out = ev.evaluate()
    assert out["top1_per_image"] == [True, False, True] and out["top1"] == pytest.approx(200 / 3)


def test_student_t_quantiles_and_the_interval_of_a_seed_mean():
    from bgd_det.evaluation.protocol import student_t_quantile, summarize

    # the textbook table (two-sided 95% and 90%)
    for df, want in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert student_t_quantile(0.975, df) == pytest.approx(want, abs=1e-3), df
    assert student_t_quantile(0.95, 5) == pytest.approx(2.015, abs=1e-3)
    s = summarize([1.0, 2.0, 3.0])
    assert (s.mean, s.sd) == (2.0, 1.0)
    assert s.interval() == pytest.approx((2.0 - 4.3027 / 3 ** 0.5, 2.0 + 4.3027 / 3 ** 0.5), abs=1e-3)
    assert all(v != v for v in summarize([5.0]).interval())  # one seed: no interval
    with pytest.raises(ValueError, match="p=0.4, df=2; allowed: 0.5 < p < 1, df >= 1"):
        student_t_quantile(0.4, 2)
