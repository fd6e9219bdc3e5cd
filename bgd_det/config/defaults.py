"""All config keys and their defaults (fvcore ``CfgNode``; ``_BASE_`` inheritance; strict keys)."""
from __future__ import annotations

import importlib
from typing import Sequence

import yaml
from fvcore.common.config import CfgNode as _CfgNode

from ..data.register import register_from_config
from .checks import check_config

__all__ = ["CfgNode", "get_cfg", "load_config"]


class CfgNode(_CfgNode):
    """fvcore CfgNode whose merge errors are one line naming the bad key."""

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        try:
            loaded = self.load_yaml_with_base(cfg_filename, allow_unsafe=allow_unsafe)  # reads each file once
        except (TypeError, AttributeError):  # fvcore indexes a file that holds no mapping
            loaded = None
        except FileNotFoundError as e:
            missing = e.filename or cfg_filename
            where = "" if missing == cfg_filename else f" (the _BASE_ of {cfg_filename})"
            raise FileNotFoundError(f"config file not found: {missing}{where}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"config file {cfg_filename} is not valid YAML: {' '.join(str(e).split())}") from None
        except KeyError as e:
            raise KeyError(f"{cfg_filename}: {e.args[0]} (see bgd_det/config/defaults.py for allowed keys)") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {cfg_filename} is empty or not a mapping of KEY: value (or its _BASE_ is)")
        try:
            self.merge_from_other_cfg(type(self)(loaded))
        except KeyError as e:
            raise KeyError(f"{cfg_filename}: {e.args[0]} (see bgd_det/config/defaults.py for allowed keys)") from None

    def merge_from_list(self, cfg_list: list) -> None:
        options = [str(v) for v in cfg_list if str(v).startswith("--")]
        if options:  # argparse hands everything after the first KEY to the overrides
            raise ValueError(f"command-line option {options[0]!r} after the KEY VALUE overrides; put options "
                             f"first, e.g. tools/quantize_net.py --config X.yaml {options[0]} KEY VALUE")
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
# Python modules imported when the config loads (e.g. ["my_pkg.nets"]), so that the architectures and datasets they
# register are usable by name without a wrapper script.
_C.MODEL.IMPORT = []
_C.MODEL.NUM_CLASSES = 1000
# "cpu", "cuda", "cuda:1" ...
_C.MODEL.DEVICE = "cpu"

_C.QUANT = CfgNode()
_C.QUANT.N_CENTROIDS = 256
# K of a layer is clamped to the largest power of two <= n_subvectors / MIN_SUBVECTORS_PER_CENTROID.
_C.QUANT.MIN_SUBVECTORS_PER_CENTROID = 4
# That rule's comparison: "le" (K <= n_subvectors / MIN_SUBVECTORS_PER_CENTROID: the paper's text and PQF) or "lt"
# (K < it: the paper's released code; ResNet-50 layer1.0.conv1 at d=8 gets K=64 instead of 128).
_C.QUANT.K_CLAMP = "le"
_C.QUANT.BLOCK_SIZE = CfgNode()
_C.QUANT.BLOCK_SIZE.CONV_KXK = 9
_C.QUANT.BLOCK_SIZE.CONV_1X1 = 4
_C.QUANT.BLOCK_SIZE.LINEAR = 4
_C.QUANT.BLOCK_SIZE.CONV_TRANSPOSE = 4
# Conv1d, any kernel: C_in * k is a multiple of 4 whenever C_in is (9, the 3x3 rule, rarely divides C_in * 3).
_C.QUANT.BLOCK_SIZE.CONV1D = 4
# A layer whose row length the block size does not divide (5x5 depthwise at d=9, an SE fc2 of 110 columns at d=4):
# "error" (the plan refuses, listing the divisors), "divisor" (the largest divisor >= 2 below d), "skip" (fp32).
_C.QUANT.INDIVISIBLE = "error"
# Halve the block size of layers where the finer d pays for itself (a K=256 codebook of long centroids costs more than
# the codes in small layers, e.g. ResNet layer1): "off"; "free" (every layer whose bytes do not grow at d/2);
# "within_size" ("free", then the bytes it saved spent halving further layers in execution order, earliest first:
# the model is never larger than with "off"). Odd d and d set by a BLOCK_SIZE override are kept. docs/scoreboard.md.
_C.QUANT.HALVE_BLOCKS = "off"
# Glob patterns of modules kept in fp32.
_C.QUANT.SKIP = []
# Keep the first quantizable layer in execution order in fp32 (the paper's rule for ResNet's conv1: its 3 input
# channels give few, short rows, whose codebook would cost more than it saves), whatever it is called.
_C.QUANT.SKIP_FIRST = True
# [[glob pattern, KEY, value], ...] with KEY in BLOCK_SIZE, N_CENTROIDS, SKIP, REFINE.DAMPING,
# REFINE.DAMPING_PER_COLUMN, REFINE.ROUNDS (the last three replace the QUANT.REFINE value for the matching layers);
# later entries win.
_C.QUANT.OVERRIDES = []
_C.QUANT.EM_ITERS = 100
# "shared": one Gram matrix E[x x^T] of the input sub-vectors per layer (the paper); "centered": the same with
# every block's mean input removed (sum of covariances; the mean's share of the error is a per-channel shift
# that QUANT.BN_CORRECTION removes); "identity": plain k-means on the weights.
_C.QUANT.METRIC = "shared"
# Output-space refinement after the EM (bgd_det/quantization/refine.py): alternate exact coordinate descent on
# the codes and a conjugate-gradient codebook solve on the layer's output error under the full input second
# moments (D x D, D = C_in*kh*kw), captured from the student and the teacher on the same images.
_C.QUANT.REFINE = CfgNode()
_C.QUANT.REFINE.ROUNDS = 0  # 0 = off
# "teacher": match the teacher's output on the teacher's inputs (absorbs the drift of earlier compressed layers);
# "weights": match the layer's own dense output on the student's inputs.
_C.QUANT.REFINE.TARGET = "teacher"
# Ridge towards the dense weights, relative to the mean input energy (keeps the solve well posed when a layer
# has more columns than captured rows).
_C.QUANT.REFINE.DAMPING = 0.01
# Extra damping where the captured rows are few for the layer's width: the ridge becomes
# DAMPING + DAMPING_PER_COLUMN * D / n_rows (the refinement otherwise fits the calibration images' sampling noise:
# measured on the demo, the deep layers' held-out output error grew to 1.6x their calibration error).
_C.QUANT.REFINE.DAMPING_PER_COLUMN = 0.0
# Metric of that ridge (all have the trace of the input's second moment H): "identity" (mean input energy on every
# column), "diagonal" (each column's own energy), "channel" (H's kh x kw blocks, one per input channel: the
# cross-channel correlations, the worst estimated from few rows, are left out of the prior).
_C.QUANT.REFINE.DAMPING_METRIC = "identity"
_C.QUANT.REFINE.CG_ITERS = 10
# Weight each output channel's error by (gamma / sqrt(running_var + eps))^2 of the teacher's BatchNorm that follows
# the layer, i.e. measure the error after that BatchNorm.
_C.QUANT.REFINE.BN_WEIGHTED = False
# The last conv of a residual branch (bgd_det/quantization/residual.py) also matches the drift of the student's skip
# path: its target becomes the teacher's output plus (skip_t - skip_s) / (BatchNorm gain).
_C.QUANT.REFINE.RESIDUAL = False
# With RESIDUAL: quantize each block's skip path (downsample) before its branch end, so the branch end also absorbs
# the compressed skip path's error (bgd_det/quantization/residual.py: skip_path_first). False = execution order
# (ResNet-50 worse with it: docs/scoreboard.md, "The skip path before the branch end").
_C.QUANT.REFINE.SKIP_PATH_FIRST = False
# Channels whose gain is below this fraction of the layer's median |gain| get a damped compensation
# (a / (a^2 + (floor * median)^2) instead of 1 / a): a ResNet-50 bn3 gain of 2e-6 made one conv3 blow up
# (docs/detection_fidelity.md). 0 = the plain 1 / a.
_C.QUANT.REFINE.RESIDUAL_GAIN_FLOOR = 0.05
# Augmented passes for layers short of rows: when one plain pass over the capture images gives a layer fewer than
# MIN_ROWS_PER_COLUMN * D input rows (deep layers with few positions per image, the classifier with one), its
# moments also take AUGMENTED_VIEWS passes of random-resized crops + flips of the same images (0 = never).
_C.QUANT.REFINE.AUGMENTED_VIEWS = 0
_C.QUANT.REFINE.MIN_ROWS_PER_COLUMN = 20
# Activation capture: images forwarded per layer, and input rows (im2col positions) kept per image.
_C.QUANT.CAPTURE_IMAGES = 128
# Capture images are random-resized crops + flips of the calibration images (the paper's augmented training
# images) instead of centre crops.
_C.QUANT.CAPTURE_AUGMENT = False
# 0: the E-step's metric is one Gram from all capture images; n > 0 (the paper, with QUANT.METRIC "shared"): one
# Gram is kept per capture image and every EM iteration's E-step uses that of n images drawn afresh.
_C.QUANT.EM_RESAMPLE_IMAGES = 0
_C.QUANT.CAPTURE_ROWS_PER_IMAGE = 256
_C.QUANT.CAPTURE_BATCH_SIZE = 32
# Where a layer's calibration activations come from (bgd_det/engine/streaming.py): "streaming" keeps the student's
# and the teacher's inputs of the current stage (bgd_det/modeling/stages.py) for every capture image and view and
# runs only that stage (cost linear in depth); "recompute" (reference) runs the network from its input for every
# capture. Architectures without stages use the recompute path (one log line). Both draw the capture images and
# the augmented views once per run and give the same codes with a float32 cache.
_C.QUANT.ENGINE = "streaming"
_C.QUANT.STREAM = CfgNode()
# Memory for the stage inputs in MiB (0: half of the memory available when the run starts).
_C.QUANT.STREAM.BUDGET_MB = 0.0
# Storage of the cached stage inputs: "float32" (exact) or "float16" (half the memory).
_C.QUANT.STREAM.DTYPE = "float32"
# Past the budget, keep stage inputs in memory-mapped files (in a temporary folder under STREAM.SPILL_DIR, or the
# system's temporary folder when it is ""); False, or a full disk: the recompute path from that stage on.
_C.QUANT.STREAM.SPILL = True
_C.QUANT.STREAM.SPILL_DIR = ""
# After each layer, re-estimate the running statistics of the BatchNorm fed by it so the student's output
# distribution matches the teacher's: "mean_var", "mean" or "none".
_C.QUANT.BN_CORRECTION = "mean_var"
# Where BN_CORRECTION is on, a layer that feeds no BatchNorm but has a bias (FPN, RPN and R-CNN heads, classifiers)
# gets empirical bias correction: its bias absorbs the mean shift of its output against the teacher's.
_C.QUANT.BIAS_CORRECTION = True
# Stop before anything runs when the weights the plan leaves in fp32 (skipped by rule, parameters of types it cannot
# quantize such as Conv3d or Swin's position-bias tables) exceed this fraction of the model's parameters (1.0 = no
# limit). They are listed in the log and the report either way.
_C.QUANT.MAX_UNQUANTIZED = 1.0

_C.FINETUNE = CfgNode()
_C.FINETUNE.BATCH_SIZE = 32
_C.FINETUNE.TEMPERATURE = 1.0
# Layer-wise distillation of the current layer's centroids (KL to the teacher's logits), constant LR.
_C.FINETUNE.LAYER_ITERS = 0
_C.FINETUNE.LAYER_LR = 1e-4
# Global finetuning of all centroids (+ BatchNorm, see FINETUNE.BN): GLOBAL_ITERS steps, or, when GLOBAL_EPOCHS > 0,
# ceil(GLOBAL_EPOCHS * images in DATASETS.CALIB / BATCH_SIZE) steps.
_C.FINETUNE.GLOBAL_ITERS = 0
_C.FINETUNE.GLOBAL_EPOCHS = 0.0
_C.FINETUNE.GLOBAL_LR = 1e-4
# BatchNorm during global finetuning: "affine" (weight/bias trained, running statistics kept), "frozen" (no update),
# "stats" (train mode: batch statistics, running statistics updated; weight/bias fixed, as the paper's code),
# "train" (train mode and weight/bias trained).
_C.FINETUNE.BN = "affine"
# Optimizer of both stages: "adam" or "sgd" (MOMENTUM applies to SGD; WEIGHT_DECAY to both).
_C.FINETUNE.OPTIMIZER = "adam"
_C.FINETUNE.MOMENTUM = 0.9
_C.FINETUNE.WEIGHT_DECAY = 0.0
# A centroid's gradient: "sum" over the sub-vectors decoded from it (autograd's), or "mean" over them (the paper).
_C.FINETUNE.CENTROID_GRAD = "sum"
# Global finetuning's LR schedule: "constant", "step" (times LR_GAMMA at each fraction of the run in LR_MILESTONES),
# "cosine" (to 0 at the last step).
_C.FINETUNE.LR_SCHEDULE = "constant"
_C.FINETUNE.LR_MILESTONES = []
_C.FINETUNE.LR_GAMMA = 0.1
# Global finetuning saves its state (OUTPUT_DIR/finetune_state.pth) every CHECKPOINT_PERIOD steps (0 = never); a
# resumed run (tools/quantize_net.py --resume) continues from it to the same codebooks as an uninterrupted run.
_C.FINETUNE.CHECKPOINT_PERIOD = 0
# Evaluate the student on DATASETS.TEST every EVAL_PERIOD steps of global finetuning (and at its end; 0 = never).
_C.FINETUNE.EVAL_PERIOD = 0
# Feature distillation added to the task's loss: FEATURE_WEIGHT * sum over the modules FEATURE_LAYERS of
# ||student output - teacher output||^2 / ||teacher output||^2 (e.g. ["layer1", "layer2", "layer3", "layer4"]).
_C.FINETUNE.FEATURE_LAYERS = []
_C.FINETUNE.FEATURE_WEIGHT = 0.0
_C.FINETUNE.AUGMENT = True  # random-resized crops + flips for distillation batches
# Classification: mixup of distillation batches, one Beta(alpha, alpha) weight per image, seen identically by
# teacher and student (0 = off). Detection tasks refuse any value other than 0.
_C.FINETUNE.MIXUP_ALPHA = 0.0

_C.DATASETS = CfgNode()
# Registered dataset names (bgd_det.data.DatasetCatalog).
_C.DATASETS.CALIB = "imagenet_sample_even"
_C.DATASETS.TEST = "imagenet_sample_odd"
_C.DATASETS.TEST_MAX_IMAGES = 0  # 0 = all
# An image that cannot be decoded: "error" (stop, naming it) or "skip" (drop it from its batch, with a warning naming
# it and counting them; an evaluation then reports fewer n_images).
_C.DATASETS.BAD_IMAGES = "error"
# Datasets registered when the config loads: [name, "coco", annotation file, image folder] or [name, "imagefolder",
# folder] entries (ImageNet layouts, see bgd_det/data/imagenet.py); relative paths under $BGD_DATASETS.
_C.DATASETS.REGISTER = []

_C.DATALOADER = CfgNode()
# Worker processes per DataLoader; -1: automatic (half the CPU cores up to 8; none on <= 2 cores).
_C.DATALOADER.NUM_WORKERS = -1

_C.INPUT = CfgNode()
_C.INPUT.RESIZE = 256
_C.INPUT.CROP = 224

_C.TEST = CfgNode()
_C.TEST.BATCH_SIZE = 50
_C.TEST.EVAL_TEACHER = True
# Detection: the label-free fidelity figure (tools/eval_coco.py) takes the teacher's detections scoring at least this
# as the ground truth of the compressed model's box / mask AP ("box_AP_vs_teacher").
_C.TEST.AGREEMENT_SCORE = 0.5
# tools/eval_imagenet.py and tools/eval_coco.py: evaluate a compressed model as it is deployed on CPU, through the
# compiled bgd:: ops (bgd_det.inference.to_inference), and with BatchNorm folded into the codebook convs.
_C.TEST.COMPILED_OP = False
_C.TEST.FOLD_BN = False  # needs TEST.COMPILED_OP

# ---------------------------------------------------------------------------------------------------------
# Detection (Mask R-CNN / Faster R-CNN; bgd_det/tasks/detection.py, bgd_det/modeling/detection.py)
# ---------------------------------------------------------------------------------------------------------
# Shorter image side / longest side cap of the detector's own resize (torchvision GeneralizedRCNNTransform),
# used for calibration, distillation and evaluation alike.
_C.INPUT.MIN_SIZE_TEST = 800
_C.INPUT.MAX_SIZE_TEST = 1333

_C.DETECTION = CfgNode()
# torchvision's v1 detectors are trained with FrozenBatchNorm2d (affine + statistics as buffers); False builds
# them with nn.BatchNorm2d (for training a teacher from scratch). The v2 models always use BatchNorm2d.
_C.DETECTION.FROZEN_BN = True
# eps of FrozenBatchNorm2d: not stored in state dicts; torchvision's COCO_V1 Mask/Faster R-CNN weights need 0.0.
_C.DETECTION.FROZEN_BN_EPS = 1e-5
# Inference settings of the model (torchvision MaskRCNN kwargs).
_C.DETECTION.RPN_PRE_NMS_TOPK_TEST = 1000
_C.DETECTION.RPN_POST_NMS_TOPK_TEST = 1000
_C.DETECTION.SCORE_THRESH_TEST = 0.05
_C.DETECTION.DETECTIONS_PER_IMAGE = 100
# Finetuning loss: "distill" (label-free: teacher's RPN objectness/deltas, box class logits/deltas and mask
# logits on the teacher's proposals), "supervised" (standard Mask R-CNN losses on the annotations of
# DATASETS.CALIB), or "both" (their sum).
_C.DETECTION.LOSS = "distill"
# Top-scoring teacher proposals per image that the box head / mask head are distilled (and captured) on.
_C.DETECTION.DISTILL_BOX_PROPOSALS = 256
_C.DETECTION.DISTILL_MASK_PROPOSALS = 32
# Probability of a horizontal flip of calibration / distillation images when FINETUNE.AUGMENT.
_C.DETECTION.FLIP_PROB = 0.5

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
    for module in cfg.MODEL.IMPORT:  # before the datasets: a module may register some
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"MODEL.IMPORT {module!r} cannot be imported ({type(e).__name__}: {e}); is it on "
                             f"PYTHONPATH?") from None
    register_from_config(cfg.DATASETS.REGISTER)
    check_config(cfg)
    cfg.freeze()
    return cfg
