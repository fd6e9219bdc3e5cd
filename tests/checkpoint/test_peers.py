"""Importers of the peers' checkpoints (:mod:`bgd_det.checkpoint.peers`) and ``tools/convert_checkpoint.py``.

Synthetic BGD/PQF files (written here from known codes and codebooks) run everywhere; the real peer
checkpoints come from ``../shared/assets`` and those tests skip when it is absent.
"""


import pytest
import torch
import torchvision

import bgd_det
from bgd_det.checkpoint import (
    convert_checkpoint,
    dense_state_dict,
    import_bgd,
    import_peer,
    import_pqf,
    load_checkpoint_model,
    read_compressed,
)
from bgd_det.checkpoint.peers import bgd_codes, infer_resnet_arch
from bgd_det.config import get_cfg
from bgd_det.quantization.layers import PQConv2d, PQLinear
from bgd_det.quantization.pq import pq_decode
from bgd_det.quantization.size import model_size
from bgd_det.utils.cli import run_tool
from conftest import REPO

REPO = REPO


# ------------------------------------------------------------------------------------------------
# Synthetic checkpoints in the peers' layouts


def _layout(module):
    """(d, K) of a synthetic layer: 3x3 -> d=9, 1x1 / Linear -> d=4; small K for speed."""
    if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3):
        return 9, 8
    return 4, 300 if isinstance(module, torch.nn.Linear) else 16  # fc: K > 256 -> int16 codes


def _synthetic(fmt: str, seed: int = 0):
    """A resnet18 checkpoint in BGD or PQF layout, and the dense torchvision model it stands for.

    The reference is decoded as the upstream projects decode (BGD: ``W.reshape(C_out, -1).T`` cut
    into ``n_blocks`` row blocks laid side by side; PQF: rows of ``codes_matrix`` concatenated), not
    with bgd_det code.
    """
    g = torch.Generator().manual_seed(seed)
    ref = torchvision.models.resnet18(num_classes=1000).eval()
    obj = {}
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = (torch.rand(m.num_features, generator=g) + 0.5).half().float()
            m.bias.data = (torch.randn(m.num_features, generator=g) * 0.1).half().float()
            if fmt == "bgd":
                obj[name] = {"weight": m.weight.data.half(), "bias": m.bias.data.half()}
            else:
                obj[f"{name}.weight"], obj[f"{name}.bias"] = (
                    m.weight.data.clone(),
                    m.bias.data.clone(),
                )
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and name != "conv1":
            d, k = _layout(m)
            c_out, cols = m.weight.shape[0], m.weight[0].numel()
            n_blocks = cols // d
            centroids = (torch.randn(k, d, generator=g) * 0.05).half()
            codes = torch.randint(0, k, (c_out, n_blocks), generator=g)  # codes[o, b]
            dtype = torch.uint8 if k <= 256 else torch.int16
            if fmt == "bgd":
                # assignments[b * C_out + o] = codes[o, b]
                o, b = torch.meshgrid(torch.arange(c_out), torch.arange(n_blocks), indexing="ij")
                assignments = torch.empty(c_out * n_blocks, dtype=torch.long)
                assignments[(b * c_out + o).reshape(-1)] = codes.reshape(-1)
                obj[name] = {
                    "centroids": centroids,
                    "assignments": assignments.to(dtype),
                    "n_blocks": n_blocks,
                    "is_conv": isinstance(m, torch.nn.Conv2d),
                    "k": m.weight.shape[-1],
                }
                # upstream decode: [d, n_blocks*C_out] -> chunks stacked -> [cols, C_out] -> .T
                unrolled = centroids.float()[assignments].t()
                w = torch.cat(unrolled.chunk(n_blocks, dim=1), dim=0).t()
            else:
                obj[f"{name}.codes_matrix"], obj[f"{name}.codebook"] = codes.to(dtype), centroids
                w = centroids.float()[codes.reshape(-1)].reshape(c_out, -1)
            m.weight.data = w.reshape(m.weight.shape).contiguous()
    conv1 = (torch.randn(64, 3, 7, 7, generator=g) * 0.1).half()
    ref.conv1.weight.data = conv1.float()
    ref.fc.bias.data = torch.randn(1000, generator=g) * 0.01
    if fmt == "bgd":
        obj["conv1"], obj["fc_bias"] = {"weight": conv1}, {"bias": ref.fc.bias.data.clone()}
    else:
        obj["conv1.weight"], obj["fc.bias"] = conv1.float(), ref.fc.bias.data.clone()
    return obj, ref


@pytest.fixture(scope="module")
def synthetic_bgd(tmp_path_factory):
    obj, ref = _synthetic("bgd")
    path = tmp_path_factory.mktemp("bgd") / "resnet18_synthetic.pth"
    torch.save(obj, path)
    return path, obj, ref


def test_bgd_layout_tiny_known_weights():
    """index = block * C_out + out_channel, decoded against a hand-written loop over (o, c, i, j)"""
    c_out, c_in, k, d = 4, 2, 3, 6  # 3 blocks per row straddling the two 3x3 kernels; 3 != C_out
    n_blocks = c_in * k * k // d
    codes = [[0, 5, 3], [1, 6, 2], [2, 4, 0], [6, 6, 1]]  # codes[o][b]
    centroids = torch.arange(7 * d, dtype=torch.float32).reshape(7, d)
    assignments = torch.zeros(n_blocks * c_out, dtype=torch.uint8)
    for o in range(c_out):
        for b in range(n_blocks):
            assignments[b * c_out + o] = codes[o][b]
    got = bgd_codes(assignments, n_blocks)
    assert got.tolist() == codes
    weight = pq_decode(got, centroids, (c_out, c_in, k, k))
    for o in range(c_out):
        for c in range(c_in):
            for i in range(k):
                for j in range(k):
                    f = c * k * k + i * k + j  # position in the row of W.reshape(C_out, -1)
                    assert weight[o, c, i, j] == centroids[codes[o][f // d], f % d]


def test_bgd_codes_rejects_truncated_assignments():
    with pytest.raises(ValueError, match="not a multiple of n_blocks"):
        bgd_codes(torch.zeros(7, dtype=torch.uint8), 2)


@pytest.mark.parametrize("fmt", ["bgd", "pqf"])
def test_synthetic_import_matches_upstream_decode(fmt, synthetic_bgd, tmp_path):
    if fmt == "bgd":
        path, obj, ref = synthetic_bgd
    else:
        obj, ref = _synthetic("pqf", seed=1)
        path = tmp_path / "pqf.pth"
        torch.save(obj, path)
    model, ckpt = import_peer(str(path))
    assert ckpt["arch"] == "resnet18" and ckpt["num_classes"] == 1000
    assert isinstance(model.layer2[0].conv2, PQConv2d)
    assert isinstance(model.fc, PQLinear) and model.fc.codes.dtype == torch.int16
    assert ckpt["layers"]["layer1.0.conv1"] == {"block_size": 9, "n_centroids": 8}
    dense = dense_state_dict(model)
    for key, value in ref.state_dict().items():
        assert torch.equal(dense[key], value), key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)


def test_round_trip_synthetic(synthetic_bgd, tmp_path):
    path, _, _ = synthetic_bgd
    out = tmp_path / "converted.pth"
    model = convert_checkpoint(str(path), "bgd", str(out))
    assert read_compressed(str(out))["extra"]["imported_from"]["format"] == "bgd"
    loaded = bgd_det.load_compressed(str(out))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_corrupt_files_give_one_line_errors(synthetic_bgd, tmp_path, capsys):
    path, obj, _ = synthetic_bgd
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        import_bgd(str(truncated))
    assert "\n" not in str(err.value)

    missing = {k: v for k, v in obj.items() if k != "layer4.1.conv2"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="layer4.1.conv2") as err:
        import_bgd(str(tmp_path / "missing.pth"))
    assert "\n" not in str(err.value)

    wrong = dict(obj, **{"layer1.0.conv1": dict(obj["layer1.0.conv1"], n_blocks=32)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="layer1.0.conv1"):
        import_bgd(str(tmp_path / "wrong.pth"))

    with pytest.raises(ValueError, match="not PQF"):
        import_pqf(str(path))

    with pytest.raises(SystemExit) as exit_:
        run_tool(_convert_tool().main, ["--from", "bgd", str(truncated), str(tmp_path / "out.pth")])
    message = capsys.readouterr().err
    assert exit_.value.code == 2 and message.startswith("error:") and "truncated" in message
    assert message.count("\n") == 1 and not (tmp_path / "out.pth").exists()


def test_convert_refuses_to_overwrite_its_input_and_checkpoints_of_another_arch(synthetic_bgd, tmp_path, capsys):
    path, _, _ = synthetic_bgd
    before = path.read_bytes()
    with pytest.raises(SystemExit):
        run_tool(_convert_tool().main, ["--from", "bgd", str(path), str(path)])
    assert "is the input file" in capsys.readouterr().err and path.read_bytes() == before
    # A config naming another architecture than the file holds (eval_imagenet --config R50 --checkpoint R18
    # evaluated the R18 without a word); the default MODEL.ARCH is taken as unset.
    out = tmp_path / "r18.pth"
    convert_checkpoint(str(path), "bgd", str(out))
    r50 = get_cfg()
    r50.MODEL.ARCH = "resnet50"
    for f in (path, out):
        with pytest.raises(ValueError, match=f"{f} holds a resnet18 but MODEL.ARCH is resnet50"):
            load_checkpoint_model(str(f), cfg=r50)
    assert load_checkpoint_model(str(out), cfg=get_cfg())[1] == "bgd_det"


def _convert_tool():
    """``tools/convert_checkpoint.py`` as a module (its ``main(argv)`` is the command line)."""
    from conftest import load_tool

    return load_tool("convert_checkpoint")


def test_infer_resnet_arch():
    r50 = [n for n, _ in torchvision.models.resnet50().named_modules()]
    assert infer_resnet_arch(r50) == "resnet50"
    with pytest.raises(ValueError, match="match no torchvision ResNet"):
        infer_resnet_arch(["layer1.0.conv1", "layer2.0.conv1"])


# ------------------------------------------------------------------------------------------------
# The real peer checkpoints


@pytest.mark.parametrize(
    "rel, arch, mib",
    [
        ("peers/bgd/resnet18_small_blocks.pth", "resnet18", 1.54),
        ("peers/bgd/resnet18_large_blocks.pth", "resnet18", 1.03),
        ("peers/bgd/resnet50_large_blocks.pth", "resnet50", 3.18),
    ],
)
def test_bgd_sizes_and_round_trip(assets_dir, tmp_path, rel, arch, mib):
    out = tmp_path / "model.pth"
    model = convert_checkpoint(str(assets_dir / rel), "bgd", str(out))
    assert read_compressed(str(out))["arch"] == arch
    assert model_size(model).compressed_mib == pytest.approx(mib, abs=0.01)
    loaded = bgd_det.load_compressed(str(out))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_imported_peers_classify_real_images(assets_dir, monkeypatch):
    """A handful of odd-class images: BatchNorm handled right (upstream's 0.1%-after-reload bug)."""
    from bgd_det.config import get_cfg
    from bgd_det.tasks.classification import ClassificationTask

    monkeypatch.setenv("BGD_DATASETS", str(assets_dir))
    cfg = get_cfg()
    cfg.DATASETS.TEST, cfg.DATASETS.TEST_MAX_IMAGES, cfg.TEST.BATCH_SIZE = (
        "imagenet_sample_odd",
        8,
        8,
    )
    model, _ = import_bgd(str(assets_dir / "peers/bgd/resnet18_small_blocks.pth"))
    metrics = ClassificationTask(cfg).evaluate(model)
    assert metrics["n_images"] == 8 and metrics["top5"] >= 50.0, metrics


def test_pqf_resnet18_dense_export_equals_teacher(assets_dir, tmp_path, capsys):
    """``--dense`` of PQF's resnet18.pth is, bit for bit, the dense teacher upstream decoded."""
    from bgd_det.modeling import read_state_dict

    out = tmp_path / "r18_dense.pth"
    _convert_tool().main(
        ["--from", "pqf", "--dense", str(assets_dir / "peers/pqf/resnet18.pth"), str(out)]
    )
    assert "dense state dict" in capsys.readouterr().out
    dense = read_state_dict(str(out))
    teacher = read_state_dict(str(assets_dir / "teachers/resnet18_pqf_small_dense.pth"))
    assert set(dense) == set(teacher)
    for key, value in teacher.items():
        assert torch.equal(dense[key], value.to(dense[key].dtype)), key
    torchvision.models.resnet18().load_state_dict(dense, strict=True)
