"""All config keys and their defaults (fvcore ``CfgNode``; ``_BASE_`` inheritance; strict keys)."""
from __future__ import annotations

from typing import Sequence

from fvcore.common.config import CfgNode as _CfgNode

__all__ = ["CfgNode", "get_cfg", "load_config"]


class CfgNode(_CfgNode):
    """fvcore CfgNode whose merge errors are one line naming the bad key."""

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        try:
            super().merge_from_file(cfg_filename, allow_unsafe=allow_unsafe)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config file not found: {cfg_filename}") from e
        except KeyError as e:
            raise KeyError(f"{cfg_filename}: {e.args[0]} (see bgd_det/config/defaults.py for allowed keys)") from None

    def merge_from_list(self, cfg_list: list) -> None:
        if len(cfg_list) % 2:
            raise ValueError(f"command-line overrides must be KEY VALUE pairs, got {cfg_list}")
        try:
            super().merge_from_list(cfg_list)
        except (KeyError, AssertionError) as e:
            raise KeyError(f"command-line override: {e.args[0]}") from None


_C = CfgNode()
_C.MODEL = CfgNode()
# Registered architecture name (see bgd_det.modeling.ARCH_REGISTRY), e.g. "resnet18", "resnet50".
_C.MODEL.ARCH = "resnet18"
# Teacher weights: a torchvision weights enum ("ResNet18_Weights.IMAGENET1K_V1", or "DEFAULT"), a local
# state-dict path, or "" for random initialisation.
_C.MODEL.WEIGHTS = ""
_C.MODEL.NUM_CLASSES = 1000
# "cpu", "cuda", "cuda:1" ...
_C.MODEL.DEVICE = "cpu"

_C.QUANT = CfgNode()
_C.QUANT.N_CENTROIDS = 256
# K of a layer is clamped to the largest power of two <= n_subvectors / MIN_SUBVECTORS_PER_CENTROID.
_C.QUANT.MIN_SUBVECTORS_PER_CENTROID = 4
_C.QUANT.BLOCK_SIZE = CfgNode()
_C.QUANT.BLOCK_SIZE.CONV_KXK = 9
_C.QUANT.BLOCK_SIZE.CONV_1X1 = 4
_C.QUANT.BLOCK_SIZE.LINEAR = 4
_C.QUANT.BLOCK_SIZE.CONV_TRANSPOSE = 4
# Glob patterns of modules kept in fp32.
_C.QUANT.SKIP = ["conv1"]
# [[glob pattern, KEY, value], ...] with KEY in BLOCK_SIZE, N_CENTROIDS, SKIP; later entries win.
_C.QUANT.OVERRIDES = []
_C.QUANT.EM_ITERS = 100
# "shared": one Gram matrix per layer (the paper); "identity": plain k-means on weights (ablation).
_C.QUANT.METRIC = "shared"
# Activation capture: images forwarded per layer, and input rows (im2col positions) kept per image.
_C.QUANT.CAPTURE_IMAGES = 128
_C.QUANT.CAPTURE_ROWS_PER_IMAGE = 256
_C.QUANT.CAPTURE_BATCH_SIZE = 32

_C.FINETUNE = CfgNode()
_C.FINETUNE.BATCH_SIZE = 32
_C.FINETUNE.TEMPERATURE = 1.0
# Layer-wise distillation of the current layer's centroids (KL to the teacher's logits).
_C.FINETUNE.LAYER_ITERS = 0
_C.FINETUNE.LAYER_LR = 1e-4
# Global finetuning of all centroids (+ BatchNorm affine when FINETUNE.BN is "affine").
_C.FINETUNE.GLOBAL_ITERS = 0
_C.FINETUNE.GLOBAL_LR = 1e-4
_C.FINETUNE.BN = "affine"  # "affine": train BN weight/bias, keep running stats; "frozen": no BN update
_C.FINETUNE.AUGMENT = True  # random-resized crops + flips for distillation batches

_C.DATASETS = CfgNode()
# Registered dataset names (bgd_det.data.DatasetCatalog).
_C.DATASETS.CALIB = "imagenet_sample_even"
_C.DATASETS.TEST = "imagenet_sample_odd"
_C.DATASETS.TEST_MAX_IMAGES = 0  # 0 = all

_C.DATALOADER = CfgNode()
_C.DATALOADER.NUM_WORKERS = 0

_C.INPUT = CfgNode()
_C.INPUT.RESIZE = 256
_C.INPUT.CROP = 224

_C.TEST = CfgNode()
_C.TEST.BATCH_SIZE = 50
_C.TEST.EVAL_TEACHER = True

_C.OUTPUT_DIR = "./output"
_C.SEED = 0


def get_cfg() -> CfgNode:
    """A fresh copy of the defaults."""
    return _C.clone()


def load_config(path: str = "", opts: Sequence[str] = ()) -> CfgNode:
    """Defaults, merged with the yaml at ``path`` (``_BASE_`` honoured), then ``KEY VALUE`` overrides."""
    cfg = get_cfg()
    if path:
        cfg.merge_from_file(path)
    if opts:
        cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg
