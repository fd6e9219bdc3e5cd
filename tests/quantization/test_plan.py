"""Plan: execution order from a traced forward, rules, errors, and the paper's sizes."""

import pytest
import torch
from torch import nn

from bgd_det.config import load_config
from bgd_det.engine.quantizer import Quantizer
from bgd_det.modeling import build_model
from bgd_det.quantization.plan import (PlanError, QuantRules, build_plan, clamp_power, execution_order,
                                       unquantized_weights)
from bgd_det.quantization.size import model_size
from bgd_det.quantization.swap import swap_in_skeleton
from bgd_det.tasks import build_task
from conftest import REPO


class Reordered(nn.Module):
    """Modules defined in the opposite order of execution (as torchvision's FPN runs top-down)."""

    def __init__(self):
        super().__init__()
        self.late = nn.Linear(8, 4)
        self.early = nn.Conv2d(3, 8, 3)
        self.conv1x1 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.conv1x1(self.early(x))
        return self.late(x.mean((2, 3)))


def run(model):
    return model(torch.randn(1, 3, 8, 8))


def test_execution_order_not_definition_order():
    model = Reordered()
    assert execution_order(model, run) == ["early", "conv1x1", "late"]
    assert list(dict(model.named_children())) == ["late", "early", "conv1x1"]


def test_rules_types_overrides_skip_and_clamp():
    model = Reordered()
    order = execution_order(model, run)
    rules = QuantRules(block_size_kxk=9, block_size_1x1=4, block_size_linear=4, n_centroids=256,
                       skip=["early"], overrides=[["late", "SKIP", True], ["conv*", "N_CENTROIDS", 4]])
    plan = build_plan(model, order, rules)
    assert [(p.name, p.block_size, p.n_centroids) for p in plan] == [("conv1x1", 4, 4)]
    # late: 4 x 8 weights with d=8 -> 4 sub-vectors: too few for any codebook (K <= 4 / 4).
    with pytest.raises(ValueError, match="'late' has only 4 sub-vectors of size 8; skip it"):
        build_plan(model, order, QuantRules(skip=["early"], overrides=[["late", "BLOCK_SIZE", 8]]))


def test_override_values_in_order_without_malformed_entries():
    rules = QuantRules(overrides=[["*", "REFINE.ROUNDS", 4], ["late", "BLOCK_SIZE", 3], ["x", "REFINE.ROUNDS"],
                                  ["late", "REFINE.ROUNDS", 0], "junk"])
    assert rules.override_values("REFINE.ROUNDS") == [4, 0]
    assert rules.override_values("BLOCK_SIZE") == [3]
    assert rules.override_values("N_CENTROIDS") == []
    # from a config, a malformed entry reaches build_plan's one-line error (not a TypeError)
    cfg = load_config(opts=["QUANT.OVERRIDES", "[5]", "QUANT.SKIP", "[]"])
    model = Reordered()
    for bad in (QuantRules.from_cfg(cfg.QUANT), rules):
        with pytest.raises(ValueError, match=r"QUANT.OVERRIDES entry .* must be \[pattern, KEY, value\]"):
            build_plan(model, execution_order(model, run), bad)


def test_refinement_overrides():
    """The plan resolves every layer's refinement ridge and rounds to numbers: QUANT.REFINE's values, replaced by the
    matching REFINE.* overrides (later entries win)."""
    model = Reordered()
    order = execution_order(model, run)
    defaults = dict(refine_damping=0.01, refine_damping_per_column=5.0, refine_rounds=4)
    rules = QuantRules(**defaults, overrides=[["conv*", "REFINE.DAMPING_PER_COLUMN", 15], ["*", "REFINE.DAMPING", 0.5],
                                              ["late", "REFINE.DAMPING", 0.0]])
    plan = {p.name: p for p in build_plan(model, order, rules)}
    assert (plan["conv1x1"].damping, plan["conv1x1"].damping_per_column) == (0.5, 15.0)
    assert (plan["early"].damping, plan["early"].damping_per_column) == (0.5, 5.0)
    assert (plan["late"].damping, plan["late"].damping_per_column) == (0.0, 5.0)
    assert plan["conv1x1"].refine_damping(8, 100) == pytest.approx(0.5 + 15 * 8 / 100)
    assert plan["early"].refine_damping(27, 270) == pytest.approx(0.5 + 5 * 27 / 270)
    # no override: the QUANT.REFINE values, and the same plan as with an override that changes nothing
    plain = build_plan(model, order, QuantRules(**defaults))
    assert plain[0].refine_damping(27, 270) == pytest.approx(0.01 + 0.5) and plain[0].rounds == 4
    assert plain == build_plan(model, order, QuantRules(**defaults, overrides=[["late", "SKIP", False]]))
    for bad in (-1.0, "1e-2", True):
        with pytest.raises(ValueError, match=r"REFINE.DAMPING_PER_COLUMN=.* for 'early'; allowed: a number >= 0"):
            build_plan(model, order, QuantRules(overrides=[["early", "REFINE.DAMPING_PER_COLUMN", bad]]))
    rounds = {p.name: p for p in build_plan(model, order, QuantRules(**defaults, overrides=[
        ["*", "REFINE.ROUNDS", 16], ["late", "REFINE.ROUNDS", 0]]))}
    assert [rounds[n].rounds for n in ("early", "conv1x1", "late")] == [16, 16, 0]
    for bad in (-1, 2.5, "4", True):
        with pytest.raises(ValueError, match=r"REFINE.ROUNDS=.* for 'late'; allowed: an integer >= 0"):
            build_plan(model, order, QuantRules(overrides=[["late", "REFINE.ROUNDS", bad]]))
    with pytest.raises(ValueError, match=r"QUANT.REFINE.ROUNDS=-1 for 'early'; allowed: an integer >= 0"):
        build_plan(model, order, QuantRules(refine_rounds=-1))


def test_clamp_to_power_of_two():
    model = nn.Sequential(nn.Linear(48, 10))
    plan = build_plan(model, ["0"], QuantRules(block_size_linear=4))
    # 10 * 12 = 120 sub-vectors -> 120/4 = 30 -> 16
    assert plan[0].n_centroids == 16 and plan[0].n_subvectors == 120


def test_k_clamp_rules_le_and_lt():
    """"le" (the paper's text, PQF) and "lt" (the paper's released code) differ only where n_sub / 4 is a power of
    two: ResNet-50 layer1.0.conv1 at d=8 (64 x 8 = 512 sub-vectors) gets 128 / 64."""
    assert clamp_power(512, 4, "le") == 128 and clamp_power(512, 4, "lt") == 64
    assert clamp_power(120, 4, "le") == clamp_power(120, 4, "lt") == 16
    for rule, k in (("le", 128), ("lt", 64)):
        _, plan, _ = _plan_and_size(load_config("configs/ImageNet/resnet50_large_blocks.yaml", ["QUANT.K_CLAMP", rule]))
        plan = {p.name: p for p in plan}
        assert plan["layer1.0.conv1"].n_centroids == k and plan["layer2.0.conv2"].n_centroids == 256
    with pytest.raises(ValueError, match=r"QUANT.K_CLAMP='lte'; allowed: le, lt"):
        clamp_power(512, 4, "lte")


def test_errors_name_the_bad_value():
    model = Reordered()
    order = execution_order(model, run)
    with pytest.raises(ValueError, match=r"'layer9' matches no quantizable module; near matches"):
        build_plan(model, order, QuantRules(skip=["layer9"]))
    with pytest.raises(ValueError, match=r"pattern 'eraly' matches no .*'early'"):
        build_plan(model, order, QuantRules(overrides=[["eraly", "BLOCK_SIZE", 9]]))
    with pytest.raises(ValueError, match="key 'BLOK_SIZE' unknown"):
        build_plan(model, order, QuantRules(overrides=[["early", "BLOK_SIZE", 9]]))
    with pytest.raises(ValueError, match="block size 5 for 'early' does not divide its row length 27"):
        build_plan(model, order, QuantRules(overrides=[["early", "BLOCK_SIZE", 5]]))


def test_every_rule_error_at_once_with_the_valid_block_sizes():
    model = Reordered()
    order = execution_order(model, run)
    with pytest.raises(PlanError) as info:
        build_plan(model, order, QuantRules(skip=["layer9"], overrides=[["early", "BLOCK_SIZE", 5],
                                                                        ["late", "N_CENTROIDS", 3]]))
    errors = info.value.errors
    assert len(errors) == 3 and str(info.value).startswith("3 errors in the quantization plan:")
    assert "'layer9' matches no quantizable module" in errors[0]
    assert "allowed: a divisor of 27 (1, 3, 9, 27)" in errors[1]
    assert "N_CENTROIDS=3 for 'late' must be a power of two" in errors[2]


def test_plan_only_lists_every_layer_with_its_bytes_and_skips(tmp_path):
    from bgd_det.engine.pipeline import describe_plan

    cfg = load_config("configs/ImageNet/resnet18_large_blocks.yaml", ["MODEL.WEIGHTS", ""])
    text = describe_plan(cfg)
    lines = text.splitlines()
    assert any(line.startswith("| conv1 ") and "skipped: QUANT.SKIP_FIRST" in line and "QUANT.SKIP 'conv1'" in line
               for line in lines)
    assert any(line.startswith("| layer4.1.conv2 ") and "| Conv2d " in line and "| 18 " in line and "| 256 " in line
               for line in lines)
    assert "1.03 MiB" in text and "43.3x" in text
    # bytes at d/2 (codes at log2(K) bits + K * d fp16 + fp32 bias): layer1.0.conv2 at d=9 has 4096 sub-vectors,
    # 4096 + 256 * 9 * 2 = 8704 bytes against 2048 + 256 * 18 * 2 = 11264 at d=18; fc at d=2 (K=2048):
    # 256000 * 11 / 8 + 2048 * 2 * 2 + 1000 * 4 = 364192
    row = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]
           if line.startswith("| ")}
    assert row["layer1.0.conv2"][5:7] == ["11264", "8704 (-2560)"]
    assert row["fc"][5:7] == ["196384", "364192 (+167808)"]
    assert row["conv1"][6] == "-"
    odd = describe_plan(load_config("configs/ImageNet/resnet18_small_blocks.yaml", ["MODEL.WEIGHTS", ""]))
    assert any(line.startswith("| layer1.0.conv2 ") and "| 9 " in line and "| - " in line for line in odd.splitlines())


def _plan_and_size(cfg):
    """Execution order, plan and size report of ``cfg``'s model (no weights loaded)."""
    model = build_model(cfg).eval()
    order = execution_order(model, lambda m: m(torch.zeros(1, 3, 64, 64)))
    plan = build_plan(model, order, QuantRules.from_cfg(cfg.QUANT))
    return order, plan, model_size(swap_in_skeleton(model, plan))


@pytest.mark.parametrize("config", [
    "configs/ImageNet/resnet18_small_blocks.yaml",
    "configs/ImageNet/resnet50_large_blocks.yaml",
])
def test_resnet_plans_skip_conv1_and_end_with_fc(config):
    order, plan, _ = _plan_and_size(load_config(config))
    assert order[0] == "conv1" and plan[0].name == "layer1.0.conv1" and plan[-1].name == "fc"


CONFIG_DIR = REPO / "configs"
#: Every shipped config (not the Base-* ones) with its compressed size in MiB and ratio (as documented).
SHIPPED_SIZES = {
    "COCO/composite_mask_rcnn_R_50_FPN.yaml": (6.45, 26.0),
    "COCO/composite_mask_rcnn_R_50_FPN_cpu.yaml": (6.45, 26.0),
    "COCO/composite_mask_rcnn_R_50_FPN_refined.yaml": (6.45, 26.0),
    "COCO/demo_mask_rcnn_coco_tiny.yaml": (6.65, 25.5),
    "COCO/faster_rcnn_R_50_FPN_small_blocks.yaml": (6.22, 25.6),
    "COCO/mask_rcnn_R_50_FPN_small_blocks.yaml": (6.65, 25.5),
    "ImageNet/demo_resnet18_large_blocks_sample.yaml": (1.03, 43.3),
    "ImageNet/demo_resnet18_mixed_blocks_sample.yaml": (1.03, 43.3),
    "ImageNet/demo_resnet50_d18_d16_sample.yaml": (2.60, 37.5),
    "ImageNet/frozen_resnet18_large_blocks_sample.yaml": (1.03, 43.3),
    "ImageNet/frozen_resnet50_large_blocks_sample.yaml": (3.19, 30.6),
    "ImageNet/resnet50_mixed_blocks_sample.yaml": (3.19, 30.5),
    "ImageNet/resnet18_large_blocks.yaml": (1.03, 43.3),
    "ImageNet/resnet18_small_blocks.yaml": (1.54, 28.9),
    "ImageNet/resnet50_large_blocks.yaml": (3.19, 30.6),
    "ImageNet/resnet50_small_blocks.yaml": (5.09, 19.1),
    "ImageNet/paper/demo_resnet18_large_blocks_sample.yaml": (1.03, 43.3),
    "ImageNet/paper/resnet18_large_blocks.yaml": (1.03, 43.3),
    "ImageNet/paper/resnet18_small_blocks.yaml": (1.54, 28.9),
    "ImageNet/paper/resnet50_large_blocks.yaml": (3.19, 30.6),
    "ImageNet/paper/resnet50_small_blocks.yaml": (5.09, 19.1),
    # torchvision names (Base-Torchvision.yaml)
    "ImageNet/torchvision/efficientnet_b0.yaml": (1.57, 12.8),
    "ImageNet/torchvision/mobilenet_v2.yaml": (1.04, 12.9),
    "ImageNet/torchvision/regnet_y_400mf.yaml": (1.35, 12.3),
    "ImageNet/torchvision/resnext50_32x4d.yaml": (6.20, 15.4),
    "ImageNet/torchvision/swin_t.yaml": (7.18, 15.0),
    "ImageNet/torchvision/vit_b_16.yaml": (23.83, 13.9),
}


def test_every_shipped_config_is_listed():
    shipped = {str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml") if not p.name.startswith("Base-")}
    assert shipped == set(SHIPPED_SIZES)


@pytest.mark.parametrize("config", sorted(SHIPPED_SIZES))
def test_shipped_config_builds_its_quantizer_and_plan(config, tmp_path, monkeypatch):
    """The config loads, the Quantizer accepts it (its checks run before any layer) and its plan, built from the
    task's own example forward, has the documented size."""
    if "composite" in config:  # its datasets are made by tools/make_composite.py, checked when the config loads
        from conftest import write_tiny_composite

        monkeypatch.setenv("BGD_DATASETS", str(tmp_path))
        write_tiny_composite(tmp_path)
    cfg = load_config(str(CONFIG_DIR / config), ["MODEL.WEIGHTS", ""])
    model = build_model(cfg).eval()
    plan = Quantizer(cfg, model, build_task(cfg)).make_plan(model)
    report = model_size(swap_in_skeleton(model, plan))
    mib, ratio = SHIPPED_SIZES[config]
    assert report.compressed_mib == pytest.approx(mib, abs=0.01)
    assert report.ratio == pytest.approx(ratio, abs=0.1)


def test_mixed_blocks_demo_spends_exactly_the_large_blocks_bytes():
    large_cfg = load_config("configs/ImageNet/demo_resnet18_large_blocks_sample.yaml")
    mixed_cfg = load_config("configs/ImageNet/demo_resnet18_mixed_blocks_sample.yaml")
    _, large_plan, large_size = _plan_and_size(large_cfg)
    _, mixed_plan, mixed_size = _plan_and_size(mixed_cfg)
    assert mixed_size.compressed_bytes == large_size.compressed_bytes == 1079328
    large = {p.name: p.block_size for p in large_plan}
    mixed = {p.name: p.block_size for p in mixed_plan}
    changed = {n for n in large if large[n] != mixed[n]}
    assert changed == {f"layer{g}.{b}.conv{c}" for g in (1, 2) for b in (0, 1) for c in (1, 2)}
    assert all(large[n] == 18 and mixed[n] == 9 for n in changed)
    # A yaml list replaces its _BASE_'s: the mixed config repeats the demo's overrides and must stay in step with them.
    base = large_cfg.QUANT.OVERRIDES
    assert mixed_cfg.QUANT.OVERRIDES[:len(base)] == base


class Widening(nn.Module):
    """Layers sized like ResNet-18's layer1-2: where a K=256 codebook of 18-dim centroids costs more than the codes."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(128, 128, 3, padding=1, bias=False)
        self.fc = nn.Linear(128, 10, bias=False)
        self.c4 = nn.Conv2d(128, 128, 1, bias=False)

    def forward(self, x):
        x = self.c3(self.c2(self.c1(x)))
        return self.fc(x.mean((2, 3))), self.c4(x)


def _halving(mode, **kwargs):
    model = Widening()
    order = execution_order(model, lambda m: m(torch.zeros(1, 64, 4, 4)))
    rules = QuantRules(**{"block_size_kxk": 18, "block_size_1x1": 4, "block_size_linear": 4, "halve_blocks": mode,
                          **kwargs})
    plan = build_plan(model, order, rules)
    return {p.name: (p.block_size, p.n_centroids, p.halved) for p in plan}, model_size(swap_in_skeleton(model, plan))


def test_halve_blocks_free_and_within_size_against_hand_counted_bytes():
    # bytes = sub-vectors * log2(K) / 8 + K * d * 2 (d -> d/2):
    # c1 (64 x 576): 2048 + 9216 = 11264 -> 4096 + 4608 = 8704 (-2560); c2 (128 x 576): 13312 -> 12800 (-512);
    # c3 (128 x 1152): 17408 -> 20992 (+3584); fc (10 x 128, 320 sub-vectors, K clamped to 64): 240 + 512 = 752
    # -> 640 sub-vectors, K 128: 560 + 512 = 1072 (+320); c4 (128 x 128): 4096 + 2048 = 6144 -> 9216 (+3072).
    off, off_size = _halving("off")
    assert off == {"c1": (18, 256, False), "c2": (18, 256, False), "c3": (18, 256, False), "fc": (4, 64, False),
                   "c4": (4, 256, False)}
    assert off_size.compressed_bytes == 11264 + 13312 + 17408 + 752 + 6144
    free, free_size = _halving("free")
    assert {n for n, (_, _, h) in free.items() if h} == {"c1", "c2"}
    assert free_size.compressed_bytes == off_size.compressed_bytes - 2560 - 512
    # within_size: the 3072 saved go in execution order: c3 (+3584) does not fit, fc (+320, K 64 -> 128) does,
    # then c4 (+3072) no longer fits.
    within, within_size = _halving("within_size")
    assert within == {"c1": (9, 256, True), "c2": (9, 256, True), "c3": (18, 256, False), "fc": (2, 128, True),
                      "c4": (4, 256, False)}
    assert within_size.compressed_bytes == off_size.compressed_bytes - 3072 + 320
    # a BLOCK_SIZE override is the user's choice: never halved (c2 at 18 frees only 2560, which c4 cannot use either)
    fixed, _ = _halving("within_size", overrides=[["c2", "BLOCK_SIZE", 18]])
    assert fixed["c2"] == (18, 256, False) and fixed["fc"] == (2, 128, True) and not fixed["c4"][2]
    # odd d stays: at d=9 the 3x3 convs free nothing, so nothing is spent either
    odd, odd_size = _halving("within_size", block_size_kxk=9)
    _, odd_off_size = _halving("off", block_size_kxk=9)
    assert not any(h for _, _, h in odd.values())
    assert odd_size.compressed_bytes == odd_off_size.compressed_bytes
    with pytest.raises(PlanError, match="QUANT.HALVE_BLOCKS='all'; allowed: off, free, within_size"):
        _halving("all")


def test_halve_blocks_within_size_on_resnet18_large_blocks():
    """On ResNet-18 at the large-blocks rules, "within_size" halves layer1 and the start of layer2 (the mixed
    demo's allocation, chosen by the rule) and never costs more than the rules' plan."""
    large = load_config("configs/ImageNet/resnet18_large_blocks.yaml", ["MODEL.WEIGHTS", ""])
    _, _, large_size = _plan_and_size(large)
    within = load_config("configs/ImageNet/resnet18_large_blocks.yaml",
                         ["MODEL.WEIGHTS", "", "QUANT.HALVE_BLOCKS", "within_size"])
    _, plan, size = _plan_and_size(within)
    halved = [p.name for p in plan if p.halved]
    assert halved == [f"layer1.{b}.conv{c}" for b in (0, 1) for c in (1, 2)] + [
        "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv1"]
    # saved: 4 x 2560 + 512; spent: 3584 + 1024 + 3584; layer2.1.conv2 (+3584) does not fit in the 2560 left
    assert size.compressed_bytes == large_size.compressed_bytes - 10752 + 8192
    with pytest.raises(ValueError, match="QUANT.HALVE_BLOCKS='on'; allowed: 'off', 'free', 'within_size'"):
        load_config("configs/ImageNet/resnet18_large_blocks.yaml", ["QUANT.HALVE_BLOCKS", "on"])


def test_any_torchvision_classifier_by_name_and_unknown_names():
    from bgd_det.modeling import get_arch

    cfg = load_config("", ["MODEL.ARCH", "mobilenet_v3_small", "MODEL.NUM_CLASSES", 7])
    model = build_model(cfg).eval()
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    order = execution_order(model, lambda m: m(torch.zeros(1, 3, 64, 64)))
    assert order[0] == "features.0.0" and order[-1] == "classifier.3"
    try:  # the default rules: the first layer by execution order stays fp32, whatever its name
        plan = build_plan(model, order, QuantRules.from_cfg(cfg.QUANT))
    except PlanError as e:
        assert not any("features.0.0" in err for err in e.errors) and "QUANT.SKIP pattern" not in str(e)
    else:
        assert plan[0].name == order[1]
    with pytest.raises(KeyError, match=r"unknown MODEL.ARCH 'mobilenet_v9'.*near matches: \['mobilenet_v2'"):
        get_arch("mobilenet_v9")


class _MixedNet(nn.Module):
    """A conv, a Conv1d, attention and a Linear used through ``.weight``: weights no forward hook of the plan sees."""

    def __init__(self):
        super().__init__()
        self.conv, self.c1d = nn.Conv2d(3, 8, 3), nn.Conv1d(8, 8, 3)
        self.attn, self.proj, self.fc = nn.MultiheadAttention(8, 2), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        t = self.c1d(self.conv(x).mean(-1)).permute(2, 0, 1)  # L, N, 8
        t = self.attn(t, t, t)[0] @ self.proj.weight.t()
        return self.fc(t.mean(0))


def test_weights_left_in_fp32_are_listed_with_reasons_and_can_be_refused():
    from bgd_det.engine.report import format_report
    from bgd_det.quantization.plan import check_unquantized
    from bgd_det.quantization.size import model_size

    model = _MixedNet().eval()
    order = execution_order(model, lambda m: m(torch.zeros(1, 3, 12, 12)))
    assert order == ["conv", "c1d", "fc"]
    plan = build_plan(model, order, QuantRules(skip=("conv",), n_centroids=4, min_subvectors_per_centroid=1))
    assert [(layer.name, layer.block_size) for layer in plan] == [("c1d", 4), ("fc", 4)]
    found = {u.name: (u.numel, u.reason) for u in unquantized_weights(model, order, plan)}
    assert found == {"conv.weight": (216, "skipped by rule"),
                     "attn.in_proj_weight": (192, "unsupported type MultiheadAttention"),
                     "attn.out_proj.weight": (64, "not called as a module (used through .weight)"),
                     "proj.weight": (64, "not called as a module (used through .weight)")}
    unq = unquantized_weights(model, order, plan)
    total = sum(p.numel() for p in model.parameters())
    check_unquantized(unq, total, 1.0)
    with pytest.raises(ValueError, match=r"% of the model's parameters are weights left in fp32, above "
                                         r"QUANT.MAX_UNQUANTIZED 0.5: conv.weight \(216, skipped by rule\)"):
        check_unquantized(unq, total, 0.5)
    with pytest.raises(ValueError, match=r"QUANT.MAX_UNQUANTIZED=2.0; allowed: a fraction in \[0, 1\]"):
        check_unquantized(unq, total, 2.0)
    text = format_report(model_size(model), unquantized=unq)
    assert "## Weights left in fp32" in text and "| attn.in_proj_weight" in text and "not called as a module" in text


class _OddNet(nn.Module):
    """A 5x5 depthwise conv (rows of 25) and a 1x1 conv with 6 input channels (rows of 6)."""

    def __init__(self):
        super().__init__()
        self.dw, self.pw = nn.Conv2d(4, 4, 5, groups=4), nn.Conv2d(4, 6, 1)
        self.fc = nn.Conv2d(6, 16, 1)

    def forward(self, x):
        return self.fc(self.pw(self.dw(x)))


@pytest.mark.parametrize("rule, expected", [("divisor", [("dw", 5), ("pw", 4), ("fc", 3)]),
                                            ("skip", [("pw", 4)])])
def test_indivisible_block_sizes_fall_back_to_a_divisor_or_fp32(rule, expected):
    model = _OddNet()
    order = execution_order(model, lambda m: m(torch.zeros(1, 4, 9, 9)))
    rules = dict(block_size_kxk=9, block_size_1x1=4, n_centroids=4, min_subvectors_per_centroid=1)
    with pytest.raises(ValueError, match=r"2 errors in the quantization plan:\n.*'dw' does not divide its row length 25"):
        build_plan(model, order, QuantRules(**rules))
    plan = build_plan(model, order, QuantRules(**rules, indivisible=rule))
    assert [(layer.name, layer.block_size) for layer in plan] == expected
    if rule == "skip":
        assert {u.name: u.reason for u in unquantized_weights(model, order, plan)} == {
            "dw.weight": "skipped by rule", "fc.weight": "skipped by rule"}
    with pytest.raises(ValueError, match=r"QUANT.INDIVISIBLE='largest'; allowed: error, divisor, skip"):
        build_plan(model, order, QuantRules(**rules, indivisible="largest"))
