"""The classification task: mixup as distillation augmentation."""
import pytest
import torch

from bgd_det.modeling import build_teacher
from conftest import tiny_cfg


def test_mix_images_is_a_seeded_per_image_mixup():
    import numpy as np

    from bgd_det.tasks.classification import mix_images

    x = torch.randn(6, 3, 4, 5)
    out = mix_images(x, 0.4, np.random.default_rng(7))
    ref_rng = np.random.default_rng(7)
    lam, perm = ref_rng.beta(0.4, 0.4, size=6), ref_rng.permutation(6)
    for i in range(6):
        assert torch.allclose(out[i], lam[i] * x[i] + (1 - lam[i]) * x[perm[i]], atol=1e-6)
    assert not torch.allclose(out, x)
    assert torch.equal(out, mix_images(x, 0.4, np.random.default_rng(7)))


def test_mixup_distillation_shows_both_models_the_same_images(tmp_path):
    """Teacher against itself: zero loss only if both forwards saw the same mixed batch; bad alpha refused."""
    from bgd_det.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, "FINETUNE.MIXUP_ALPHA", 1.0)
    model = build_teacher(cfg).eval()
    task = ClassificationTask(cfg)
    batch = (torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    assert float(task.distill_loss(model, model, batch)) == pytest.approx(0.0, abs=1e-6)
    other = build_teacher(cfg).eval()
    plain = ClassificationTask(tiny_cfg(tmp_path))
    assert float(task.distill_loss(other, model, batch)) != pytest.approx(float(plain.distill_loss(other, model,
                                                                                                  batch)))
    with pytest.raises(ValueError, match=r"FINETUNE.MIXUP_ALPHA=-0.5; allowed: a number >= 0"):
        ClassificationTask(tiny_cfg(tmp_path, "FINETUNE.MIXUP_ALPHA", -0.5))
