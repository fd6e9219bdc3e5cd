"""Shared fixtures: the offline assets folder, a tiny registered architecture, a tiny image dataset and the tools
as modules."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from bgd_det.checkpoint import round_codebooks_to_fp16, save_compressed
from bgd_det.modeling import ARCH_REGISTRY
from bgd_det.modeling.stages import Stage
from bgd_det.quantization.plan import QuantRules, build_plan, execution_order
from bgd_det.quantization.pq import code_dtype
from bgd_det.quantization.swap import pq_layers, swap_in_skeleton

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
TOOLS = REPO / "tools"


def _load_script(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(name: str):
    """``tools/<name>.py`` as a module (its ``main`` is the command line's)."""
    return _load_script(TOOLS / f"{name}.py", f"tool_{name}")


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module."""
    return _load_script(REPO / "benchmarks" / f"{name}.py", f"benchmark_{name}")


@pytest.fixture
def assets_dir() -> Path:
    """``../shared/assets``; tests using it skip when it is absent."""
    if not ASSETS.is_dir():
        pytest.skip(f"offline assets folder {ASSETS} is absent (real data/weights tests)")
    return ASSETS


class TinyNet(nn.Module):
    """A small ResNet-like classifier for fast engine tests (32x32 inputs, 10 classes)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)) + x)
        return self.fc(x.mean((2, 3)))


def tiny_net_stages(model):
    """TinyNet's sequential stages (the streaming engine runs one at a time)."""
    return [
        Stage("stem", ("conv1", "bn1"), lambda m, x: torch.relu(m.bn1(m.conv1(x)))),
        Stage("down", ("conv2", "bn2"), lambda m, x: torch.relu(m.bn2(m.conv2(x)))),
        Stage("block", ("conv3", "bn3"), lambda m, x: torch.relu(m.bn3(m.conv3(x)) + x)),
        Stage("head", ("fc",), lambda m, x: m.fc(x.mean((2, 3)))),
    ]


if "tiny_net" not in ARCH_REGISTRY:
    @ARCH_REGISTRY.register()
    def tiny_net(cfg):
        """Tiny test architecture."""
        return TinyNet(cfg.MODEL.NUM_CLASSES)

    tiny_net.stages = tiny_net_stages


def write_tiny_images(datasets: Path) -> Path:
    """``datasets/imagenet-sample``: 20 random 40x40 images over 10 wnids (the same every time); returns it."""
    root = datasets / "imagenet-sample"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        arr = (rng.random((40, 40, 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(root / f"n{i % 10:08d}_img{i}.JPEG", format="PNG")
    return root


@pytest.fixture
def tiny_images(tmp_path, monkeypatch) -> Path:
    """:func:`write_tiny_images` under ``$BGD_DATASETS``."""
    monkeypatch.setenv("BGD_DATASETS", str(tmp_path / "datasets"))
    return write_tiny_images(tmp_path / "datasets")


#: command-line options of a seconds-long run of tiny_net on ``tiny_images``
TINY_OPTS = ["MODEL.ARCH", "tiny_net", "MODEL.NUM_CLASSES", 10, "MODEL.WEIGHTS", "", "INPUT.RESIZE", 36,
             "INPUT.CROP", 32, "QUANT.N_CENTROIDS", 16, "QUANT.EM_ITERS", 5, "QUANT.CAPTURE_IMAGES", 8,
             "QUANT.CAPTURE_BATCH_SIZE", 4, "QUANT.SKIP", "[]", "QUANT.SKIP_FIRST", False,
             "QUANT.BLOCK_SIZE.LINEAR", 4,
             "DATASETS.CALIB", "imagenet_sample_even", "DATASETS.TEST", "imagenet_sample_odd",
             "FINETUNE.BATCH_SIZE", 4, "TEST.BATCH_SIZE", 5]


def tiny_cfg(output_dir, *extra):
    from bgd_det.config import load_config

    opts = [*TINY_OPTS, "OUTPUT_DIR", str(output_dir), *extra]
    return load_config("", [str(o) for o in opts])


def write_tiny_composite(datasets: Path) -> None:
    """``datasets/composite/{train,test}`` as configs/COCO/composite_mask_rcnn_R_50_FPN.yaml registers them: two
    synthetic images each, of a square pasted on a plain background (categories 1, 3, 47, 84)."""
    from bgd_det.data.composite import Instance, make_composite

    background = datasets / "composite_background.png"
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(background)
    square = Instance(1, np.full((12, 12, 3), 200, np.uint8), np.ones((12, 12), bool), "square#1")
    categories = {1: "person", 3: "car", 47: "cup", 84: "book"}
    for split in ("train", "test"):
        make_composite([square], [str(background)], str(datasets / "composite" / split), categories=categories,
                       n_images=2, seed=0, size=64)


def random_pq(rows, cols, d, k, *, seed=0):
    """codes Tensor[rows, ceil(cols/d)] and codebook Tensor[k, d] (a partial last block when d does
    not divide cols)."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = -(-cols // d)
    codes = torch.randint(0, k, (rows, n_blocks), generator=g).to(code_dtype(k))
    return codes, torch.randn(k, d, generator=g)


def fill_random_pq(model, *, scale=1.0, seed_by_size=True):
    """Every codebook layer of ``model`` gets :func:`random_pq` codes and its codebook times ``scale`` (seeded by the
    layer's number of sub-vectors, or 0)."""
    for layer in pq_layers(model).values():
        codes, cb = random_pq(layer.codes.shape[0], layer.codes.shape[1] * layer.block_size, layer.block_size,
                              layer.n_centroids, seed=layer.codes.numel() if seed_by_size else 0)
        layer.set_quantization(codes, cb * scale)


def compressed_resnet18(seed=0):
    """A ResNet-18 (10 classes) with random codebook layers everywhere but conv1 (fc: K=1024, int16 codes), random
    BatchNorm statistics and fp16-rounded codebooks, in eval mode, and its input Tensor[2, 3, 64, 64]."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    plan = build_plan(
        model,
        execution_order(model, lambda m: m(x)),
        QuantRules(skip=["conv1"], overrides=[["fc", "N_CENTROIDS", 1024]]),
    )
    swap_in_skeleton(model, plan)
    fill_random_pq(model, scale=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    round_codebooks_to_fp16(model)
    return model.eval(), x


@pytest.fixture(scope="module")
def resnet18_checkpoint(tmp_path_factory):
    """:func:`compressed_resnet18` saved as a compressed checkpoint: (path, input, the training-time model's logits)."""
    model, x = compressed_resnet18()
    with torch.no_grad():
        want = model(x)
    path = str(tmp_path_factory.mktemp("ckpt") / "resnet18.pth")
    save_compressed(path, model, arch="resnet18", num_classes=10)
    return path, x, want


@pytest.fixture(scope="module")
def compiled_ops():
    """The compiled bgd ops, built (skip when BGD_NO_EXT disables them); the SIMD mode restored after the module."""
    from bgd_det import ops

    if os.environ.get("BGD_NO_EXT", "") not in ("", "0"):
        pytest.skip("BGD_NO_EXT is set: the compiled ops are disabled")
    assert ops.ops_available(), f"the bgd ops did not build: {ops.build_status()}"
    yield
    ops.simd_mode(1)
