"""Allowed config values, declared once, and :func:`check_config`, which :func:`~bgd_det.config.load_config` runs
when a config loads (and the Quantizer again, for configs built in code), before any model is built.

The modules that use a value import its allowed set from here; functions that take such a value as an argument
check it with the same helpers. Per-layer rules (block sizes, K, overrides) are the plan's
(:mod:`bgd_det.quantization.plan`): they need the model. Rules that depend on the process count are
:mod:`bgd_det.engine.distributed`'s.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["METRICS", "BN_CORRECTION_MODES", "FINETUNE_BN_MODES", "K_CLAMP_RULES", "INDIVISIBLE_RULES",
           "HALVE_BLOCKS_RULES", "ENGINES", "CACHE_DTYPE_NAMES", "OPTIMIZERS", "CENTROID_GRADS", "LR_SCHEDULES",
           "DAMPING_METRICS", "REFINE_TARGETS", "DETECTION_LOSSES", "BAD_IMAGE_POLICIES", "check_config",
           "check_choice", "check_rounds", "check_damping_metric", "check_refine_target", "check_gain_floor",
           "check_max_unquantized", "check_optim", "check_eval_options"]

#: QUANT.METRIC: the E-step's Gram ("shared": the paper's E[x x^T]; "centered": without each block's mean input;
#: "identity": plain k-means on the weights).
METRICS = ("shared", "centered", "identity")
#: QUANT.BN_CORRECTION
BN_CORRECTION_MODES = ("mean_var", "mean", "none")
#: FINETUNE.BN: what global finetuning does with BatchNorm.
FINETUNE_BN_MODES = ("affine", "frozen", "stats", "train")
#: QUANT.K_CLAMP: K <= (the paper's text, PQF) or < (the paper's released code) n_subvectors / MIN_SUBVECTORS.
K_CLAMP_RULES = ("le", "lt")
#: QUANT.INDIVISIBLE: a block size that does not divide a layer's row length: refuse the plan, use the largest
#: divisor >= 2 below it, or leave the layer fp32.
INDIVISIBLE_RULES = ("error", "divisor", "skip")
#: QUANT.HALVE_BLOCKS: keep the rules' block sizes, halve them where that costs no bytes, or also spend what that
#: saved halving further layers in execution order.
HALVE_BLOCKS_RULES = ("off", "free", "within_size")
#: QUANT.ENGINE
ENGINES = ("streaming", "recompute")
#: QUANT.STREAM.DTYPE
CACHE_DTYPE_NAMES = ("float32", "float16")
#: FINETUNE.OPTIMIZER, CENTROID_GRAD, LR_SCHEDULE
OPTIMIZERS = ("adam", "sgd")
CENTROID_GRADS = ("sum", "mean")
LR_SCHEDULES = ("constant", "step", "cosine")
#: QUANT.REFINE.DAMPING_METRIC
DAMPING_METRICS = ("identity", "diagonal", "channel")
#: QUANT.REFINE.TARGET: the teacher's outputs, or the layer's own outputs on the student's inputs.
REFINE_TARGETS = ("teacher", "weights")
#: DETECTION.LOSS
DETECTION_LOSSES = ("distill", "supervised", "both")
#: DATASETS.BAD_IMAGES: an image that cannot be decoded stops the run, or is skipped (logged).
BAD_IMAGE_POLICIES = ("error", "skip")


def check_choice(key: str, value: Any, allowed: Sequence[str], *, quote: bool = True) -> None:
    """One-line ValueError unless ``value`` is one of ``allowed`` (named ``key`` in the message)."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r}; allowed: {', '.join(map(repr, allowed) if quote else allowed)}")


def check_rounds(rounds: Any) -> int:
    """QUANT.REFINE.ROUNDS: an integer >= 0."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"QUANT.REFINE.ROUNDS={rounds!r}; allowed: an integer >= 0")
    return rounds


def check_damping_metric(kind: str) -> None:
    check_choice("QUANT.REFINE.DAMPING_METRIC", kind, DAMPING_METRICS)


def check_refine_target(target: str) -> None:
    check_choice("QUANT.REFINE.TARGET", target, REFINE_TARGETS)


def check_gain_floor(floor: float) -> None:
    """QUANT.REFINE.RESIDUAL_GAIN_FLOOR: a finite number >= 0."""
    if not (floor >= 0 and math.isfinite(floor)):
        raise ValueError(f"QUANT.REFINE.RESIDUAL_GAIN_FLOOR={floor!r}; allowed: a finite number >= 0")


def check_max_unquantized(fraction: float) -> None:
    """QUANT.MAX_UNQUANTIZED: a fraction in [0, 1]."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"QUANT.MAX_UNQUANTIZED={fraction}; allowed: a fraction in [0, 1] (1 = no limit)")


def check_optim(*, optimizer: str, centroid_grad: str, schedule: str, milestones: Sequence[float], lr: float,
                momentum: float, weight_decay: float, gamma: float) -> None:
    """One finetuning stage's optimiser settings (FINETUNE.*, with its LAYER_LR or GLOBAL_LR)."""
    for key, value, allowed in (("OPTIMIZER", optimizer, OPTIMIZERS), ("CENTROID_GRAD", centroid_grad, CENTROID_GRADS),
                                ("LR_SCHEDULE", schedule, LR_SCHEDULES)):
        check_choice(f"FINETUNE.{key}", value, allowed, quote=False)
    if any(not 0 < m < 1 for m in milestones) or list(milestones) != sorted(milestones):
        raise ValueError(f"FINETUNE.LR_MILESTONES={list(milestones)}; allowed: increasing fractions of the "
                         f"run, each in (0, 1)")
    if not (lr > 0 and momentum >= 0 and weight_decay >= 0 and 0 < gamma <= 1):
        raise ValueError(f"FINETUNE learning rate {lr}, MOMENTUM {momentum}, WEIGHT_DECAY {weight_decay}, LR_GAMMA "
                         f"{gamma}; allowed: lr > 0, momentum >= 0, weight decay >= 0, 0 < gamma <= 1")


def check_eval_options(test_cfg) -> None:
    """``cfg.TEST``: BatchNorm folding needs the inference layers."""
    if test_cfg.FOLD_BN and not test_cfg.COMPILED_OP:
        raise ValueError("TEST.FOLD_BN=True needs TEST.COMPILED_OP=True (training layers keep their BatchNorms)")


def _check_quant(q) -> None:
    check_choice("QUANT.METRIC", q.METRIC, METRICS)
    check_rounds(q.REFINE.ROUNDS)
    check_refine_target(q.REFINE.TARGET)
    check_damping_metric(q.REFINE.DAMPING_METRIC)
    check_gain_floor(q.REFINE.RESIDUAL_GAIN_FLOOR)
    if q.REFINE.SKIP_PATH_FIRST and not q.REFINE.RESIDUAL:
        raise ValueError("QUANT.REFINE.SKIP_PATH_FIRST=True with QUANT.REFINE.RESIDUAL=False; allowed: "
                         "SKIP_PATH_FIRST only with RESIDUAL (it orders layers for the residual target)")
    if q.REFINE.AUGMENTED_VIEWS < 0:
        raise ValueError(f"QUANT.REFINE.AUGMENTED_VIEWS={q.REFINE.AUGMENTED_VIEWS}; allowed: an integer >= 0")
    if q.REFINE.DAMPING < 0 or q.REFINE.DAMPING_PER_COLUMN < 0:
        raise ValueError(f"QUANT.REFINE.DAMPING={q.REFINE.DAMPING}, DAMPING_PER_COLUMN="
                         f"{q.REFINE.DAMPING_PER_COLUMN}; allowed: numbers >= 0")
    check_choice("QUANT.BN_CORRECTION", q.BN_CORRECTION, BN_CORRECTION_MODES)
    check_choice("QUANT.K_CLAMP", q.K_CLAMP, K_CLAMP_RULES)
    check_choice("QUANT.INDIVISIBLE", q.INDIVISIBLE, INDIVISIBLE_RULES, quote=False)
    check_choice("QUANT.HALVE_BLOCKS", q.HALVE_BLOCKS, HALVE_BLOCKS_RULES)
    if q.EM_RESAMPLE_IMAGES < 0 or (q.EM_RESAMPLE_IMAGES and q.METRIC != "shared"):
        raise ValueError(f"QUANT.EM_RESAMPLE_IMAGES={q.EM_RESAMPLE_IMAGES} with QUANT.METRIC={q.METRIC!r}; allowed: "
                         f"0, or an integer > 0 with the 'shared' metric")
    check_choice("QUANT.ENGINE", q.ENGINE, ENGINES)
    check_choice("QUANT.STREAM.DTYPE", q.STREAM.DTYPE, CACHE_DTYPE_NAMES)
    if q.STREAM.BUDGET_MB < 0:
        raise ValueError(f"QUANT.STREAM.BUDGET_MB={q.STREAM.BUDGET_MB}; allowed: a number >= 0 (0 = automatic)")
    check_max_unquantized(q.MAX_UNQUANTIZED)


def _check_finetune(f) -> None:
    check_choice("FINETUNE.BN", f.BN, FINETUNE_BN_MODES)
    for lr in (f.LAYER_LR, f.GLOBAL_LR):
        check_optim(optimizer=f.OPTIMIZER, centroid_grad=f.CENTROID_GRAD, schedule=f.LR_SCHEDULE,
                    milestones=tuple(float(m) for m in f.LR_MILESTONES), lr=lr, momentum=f.MOMENTUM,
                    weight_decay=f.WEIGHT_DECAY, gamma=f.LR_GAMMA)
    if not f.TEMPERATURE > 0:
        raise ValueError(f"FINETUNE.TEMPERATURE={f.TEMPERATURE}; allowed: a number > 0 (the softmax divides by it)")
    for key in ("LAYER_ITERS", "GLOBAL_ITERS", "GLOBAL_EPOCHS", "CHECKPOINT_PERIOD", "EVAL_PERIOD"):
        if getattr(f, key) < 0:
            raise ValueError(f"FINETUNE.{key}={getattr(f, key)}; allowed: a number >= 0")
    if not f.MIXUP_ALPHA >= 0:
        raise ValueError(f"FINETUNE.MIXUP_ALPHA={f.MIXUP_ALPHA}; allowed: a number >= 0 (0 = no mixup)")


def check_config(cfg) -> None:
    """Raise a one-line ValueError on the first config value outside its allowed set or range."""
    _check_quant(cfg.QUANT)
    _check_finetune(cfg.FINETUNE)
    check_eval_options(cfg.TEST)
    check_choice("DATASETS.BAD_IMAGES", cfg.DATASETS.BAD_IMAGES, BAD_IMAGE_POLICIES, quote=False)
    check_choice("DETECTION.LOSS", cfg.DETECTION.LOSS, DETECTION_LOSSES)
