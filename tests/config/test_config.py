"""Config: _BASE_ inheritance, strict keys in files and on the command line, one-line errors."""
import re

import pytest

from bgd_det.config import get_cfg, load_config


def test_base_inheritance_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text('MODEL:\n  ARCH: "resnet50"\nQUANT:\n  N_CENTROIDS: 64\n  SKIP: ["conv1"]\n')
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "base.yaml"\nQUANT:\n  N_CENTROIDS: 128\n')
    cfg = load_config(str(child), ["QUANT.EM_ITERS", "7", "QUANT.SKIP", "['conv1', 'fc']"])
    assert cfg.MODEL.ARCH == "resnet50"  # from the base
    assert cfg.QUANT.N_CENTROIDS == 128  # the child wins
    assert cfg.QUANT.EM_ITERS == 7 and cfg.QUANT.SKIP == ["conv1", "fc"]  # typed by the defaults
    assert cfg.is_frozen() and get_cfg().QUANT.N_CENTROIDS == 256  # the defaults are untouched


def test_unknown_keys_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("QUANT:\n  N_CENTROID: 64\n")
    with pytest.raises(KeyError, match=r"bad.yaml: .*N_CENTROID.*see bgd_det/config/defaults.py for allowed keys"):
        load_config(str(bad))
    with pytest.raises(KeyError, match="command-line override: .*QUANT.EM_ITER"):
        load_config("", ["QUANT.EM_ITER", "3"])
    with pytest.raises(FileNotFoundError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_overrides_must_be_pairs_and_options_come_first():
    with pytest.raises(ValueError, match="must be KEY VALUE pairs"):
        load_config("", ["QUANT.EM_ITERS"])
    # argparse puts an option typed after the overrides into them (opts is a REMAINDER)
    with pytest.raises(ValueError, match="command-line option '--resume' after the KEY VALUE overrides; put "
                                         "options first"):
        load_config("", ["QUANT.EM_ITERS", "3", "--resume"])
    assert load_config("", ["SEED", "-3"]).SEED == -3  # a negative number is a value, not an option


def test_model_import_registers_an_architecture_without_a_wrapper(tmp_path, monkeypatch):
    from bgd_det.modeling import build_teacher

    (tmp_path / "my_nets_for_test.py").write_text(
        "import torch\n"
        "from bgd_det.modeling import ARCH_REGISTRY\n\n\n"
        "@ARCH_REGISTRY.register()\n"
        "def my_mlp_for_test(cfg):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, cfg.MODEL.NUM_CLASSES))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config("", ["MODEL.IMPORT", "['my_nets_for_test']", "MODEL.ARCH", "my_mlp_for_test",
                           "MODEL.NUM_CLASSES", 3])
    assert build_teacher(cfg)[1].out_features == 3


@pytest.mark.parametrize("key, value, message", [
    ("QUANT.ENGINE", "fast", "QUANT.ENGINE='fast'; allowed: 'streaming', 'recompute'"),
    ("QUANT.INDIVISIBLE", "largest", "QUANT.INDIVISIBLE='largest'; allowed: error, divisor, skip"),
    ("QUANT.MAX_UNQUANTIZED", "2.0", "QUANT.MAX_UNQUANTIZED=2.0; allowed: a fraction in [0, 1]"),
    ("QUANT.REFINE.TARGET", "student", "QUANT.REFINE.TARGET='student'; allowed: 'teacher', 'weights'"),
    ("FINETUNE.OPTIMIZER", "lamb", "FINETUNE.OPTIMIZER='lamb'; allowed: adam, sgd"),
    ("FINETUNE.MIXUP_ALPHA", "-1.0", "FINETUNE.MIXUP_ALPHA=-1.0; allowed: a number >= 0"),
    ("TEST.FOLD_BN", "True", "TEST.FOLD_BN=True needs TEST.COMPILED_OP=True"),
    ("DATASETS.BAD_IMAGES", "ignore", "DATASETS.BAD_IMAGES='ignore'; allowed: error, skip"),
    ("DETECTION.LOSS", "kl", "DETECTION.LOSS='kl'; allowed: 'distill', 'supervised', 'both'"),
])
def test_bad_values_fail_when_the_config_loads(key, value, message):
    """Every allowed set is checked once, when the config loads (bgd_det/config/checks.py), before any model."""
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(opts=[key, value])
