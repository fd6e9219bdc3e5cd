"""The compression pipeline: plan -> per layer (capture -> EM -> swap -> layer-wise distillation) ->
global finetuning -> compressed checkpoint.

Per-layer progress is saved atomically after each layer, so ``resume=True`` continues after the last finished
layer. Every layer's randomness is seeded from ``(cfg.SEED, layer index)``: an interrupted and resumed run gives
the same codes as an uninterrupted one.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..checkpoint import atomic_save, compressed_state, load_compressed_into, round_codebooks_to_fp16
from ..quantization.bn_correction import bn_scale_shift, channel_stats, correct_batchnorm, following_batchnorms
from ..quantization.capture import capture_gram, capture_second_moments, has_input_metric, metric_uses_inputs
from ..quantization.plan import LayerPlan, QuantRules, build_plan, execution_order
from ..quantization.pq import PQResult, em_quantize
from ..quantization.refine import check_damping_metric, check_refine_target, output_objective, refine_pq
from ..quantization.residual import residual_branch_end
from ..quantization.swap import make_pq_layer, set_module
from ..tasks.base import Task
from ..utils import comm
from .finetune import bn_affine_params, codebook_params, distill, feature_modules

logger = logging.getLogger(__name__)

__all__ = ["LayerRecord", "QuantizationResult", "Quantizer", "PROGRESS_FILE", "refine_damping", "refine_rounds"]

PROGRESS_FILE = "progress.pth"


@dataclass
class LayerRecord:
    """What happened to one layer (for the report)."""

    name: str
    block_size: int
    n_centroids: int
    n_subvectors: int
    objective: float = 0.0
    rel_error: float = 0.0
    distill_loss: float = float("nan")
    seconds: float = 0.0
    output_error: float = float("nan")  # relative output error after QUANT.REFINE (nan: not refined)


@dataclass
class QuantizationResult:
    student: nn.Module
    plan: List[LayerPlan]
    records: List[LayerRecord] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)


def refine_damping(refine_cfg, layer: LayerPlan, dim: int, n_rows: int) -> float:
    """Ridge of ``layer``'s refinement: ``DAMPING + DAMPING_PER_COLUMN * dim / n_rows``.

    ``refine_cfg`` is ``cfg.QUANT.REFINE``; a value the plan's overrides set for the layer replaces it.
    """
    base = refine_cfg.DAMPING if layer.damping is None else layer.damping
    per_column = refine_cfg.DAMPING_PER_COLUMN if layer.damping_per_column is None else layer.damping_per_column
    return base + per_column * dim / n_rows


def _check_rounds(rounds) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"QUANT.REFINE.ROUNDS={rounds!r}; allowed: an integer >= 0")
    return rounds


def refine_rounds(refine_cfg, layer: LayerPlan) -> int:
    """Sweep + solve rounds of ``layer``'s refinement: QUANT.REFINE.ROUNDS unless an override sets it (0: off)."""
    return _check_rounds(refine_cfg.ROUNDS if layer.rounds is None else layer.rounds)


BN_CORRECTION_MODES = ("mean_var", "mean", "none")
FINETUNE_BN_MODES = ("affine", "frozen")


def _check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}; allowed: {', '.join(map(repr, allowed))}")


def check_quantizer_cfg(cfg) -> None:
    """Raise a one-line error on a bad QUANT / FINETUNE value (the Quantizer calls it on construction, before the
    teacher's evaluation and any layer's work)."""
    q = cfg.QUANT
    metric_uses_inputs(q.METRIC)
    _check_rounds(q.REFINE.ROUNDS)
    check_refine_target(q.REFINE.TARGET)
    check_damping_metric(q.REFINE.DAMPING_METRIC)
    if q.REFINE.AUGMENTED_VIEWS < 0:
        raise ValueError(f"QUANT.REFINE.AUGMENTED_VIEWS={q.REFINE.AUGMENTED_VIEWS}; allowed: an integer >= 0")
    if q.REFINE.DAMPING < 0 or q.REFINE.DAMPING_PER_COLUMN < 0:
        raise ValueError(f"QUANT.REFINE.DAMPING={q.REFINE.DAMPING}, DAMPING_PER_COLUMN="
                         f"{q.REFINE.DAMPING_PER_COLUMN}; allowed: numbers >= 0")
    _check_choice("QUANT.BN_CORRECTION", q.BN_CORRECTION, BN_CORRECTION_MODES)
    _check_choice("FINETUNE.BN", cfg.FINETUNE.BN, FINETUNE_BN_MODES)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)


class Quantizer:
    """Compress ``teacher`` per ``cfg`` on ``task``'s calibration data.

    Args:
        cfg: frozen config; teacher: uncompressed model (not modified); task: data/forward/loss/eval.
        output_dir: where progress and checkpoints go ("" = nowhere).
        gram_reduce: optional reduction of Gram matrices across processes (distributed capture).
        wrap: optional ``fn(student) -> module`` for distributed finetuning.
    """

    def __init__(self, cfg, teacher: nn.Module, task: Task, *, output_dir: str = "",
                 gram_reduce: Optional[Callable] = None, wrap: Optional[Callable] = None,
                 broadcast: Optional[Callable] = None) -> None:
        self.cfg, self.teacher, self.task = cfg, teacher.eval(), task
        self.output_dir = output_dir
        self.gram_reduce, self.wrap, self.broadcast = gram_reduce, wrap, broadcast
        self._bn_pairs: Dict[str, str] = {}
        check_quantizer_cfg(cfg)  # a bad value fails here, before any layer is quantized
        feature_modules(self.teacher, cfg.FINETUNE.FEATURE_LAYERS)  # likewise a name that is not in the model
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    # -- planning ---------------------------------------------------------------------------------------
    def make_plan(self, model: nn.Module) -> List[LayerPlan]:
        order = execution_order(model, self.task.example_forward)
        return build_plan(model, order, QuantRules.from_cfg(self.cfg.QUANT))

    # -- progress ---------------------------------------------------------------------------------------
    def _progress_path(self) -> str:
        return os.path.join(self.output_dir, PROGRESS_FILE) if self.output_dir else ""

    def _save_progress(self, student: nn.Module, plan: List[LayerPlan], records: List[LayerRecord]) -> None:
        path = self._progress_path()
        if not path or not comm.is_main_process():
            return
        state = compressed_state(student, arch=self.cfg.MODEL.ARCH, num_classes=self.cfg.MODEL.NUM_CLASSES,
                                 codebook_dtype=torch.float32)
        state["plan"] = [asdict(p) for p in plan]
        state["records"] = [asdict(r) for r in records]
        atomic_save(state, path)

    def _load_progress(self, student: nn.Module, plan: List[LayerPlan]) -> List[LayerRecord]:
        path = self._progress_path()
        if not path or not os.path.isfile(path):
            logger.info("no progress file at %s: starting from the first layer", path)
            return []
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved_plan = [LayerPlan(**p) for p in state["plan"]]
        if saved_plan != plan:
            raise ValueError(f"{path} was written with a different plan (config changed?); "
                             f"remove it or use another OUTPUT_DIR to start over")
        load_compressed_into(student, state, source=path)
        records = [LayerRecord(**r) for r in state["records"]]
        logger.info("resumed after %d/%d layers from %s", len(records), len(plan), path)
        return records

    # -- per layer --------------------------------------------------------------------------------------
    def quantize_layer(self, student: nn.Module, layer: LayerPlan, index: int) -> LayerRecord:
        """Capture, EM, swap in the codebook layer, layer-wise distillation."""
        cfg, start = self.cfg, time.perf_counter()
        seed = cfg.SEED * 100003 + index
        _seed_all(seed)
        module = student.get_submodule(layer.name)
        gram = None
        if metric_uses_inputs(cfg.QUANT.METRIC) and has_input_metric(module):
            batches = self.task.calib_batches(n_images=cfg.QUANT.CAPTURE_IMAGES,
                                              batch_size=cfg.QUANT.CAPTURE_BATCH_SIZE, augment=False, seed=seed)
            acc = capture_gram(student, layer.name, batches, self.task.forward, block_size=layer.block_size,
                               rows_per_image=cfg.QUANT.CAPTURE_ROWS_PER_IMAGE, seed=seed,
                               reduce=self.gram_reduce)
            gram = acc.result(centered=cfg.QUANT.METRIC == "centered")
        weight = module.weight.detach()
        result = em_quantize(weight, gram, block_size=layer.block_size, n_centroids=layer.n_centroids,
                             n_iter=cfg.QUANT.EM_ITERS, seed=seed)
        output_error = float("nan")
        rounds = refine_rounds(cfg.QUANT.REFINE, layer)
        if rounds > 0 and has_input_metric(module):
            refined = self.refine(student, layer, weight, result, seed, rounds)
            if refined is not None:
                result, output_error = refined, refined.objective
        if self.broadcast is not None:
            result = self.broadcast(result)
        pq = make_pq_layer(module, layer)
        pq.set_quantization(result.codes, result.codebook)
        set_module(student, layer.name, pq)
        with torch.no_grad():
            err = (pq.decoded_weight() - weight).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-12)
        self.correct_bn(student, layer.name, seed)
        losses = distill(student, self.teacher, self.task, [pq.codebook], iters=cfg.FINETUNE.LAYER_ITERS,
                         lr=cfg.FINETUNE.LAYER_LR, batch_size=cfg.FINETUNE.BATCH_SIZE,
                         augment=cfg.FINETUNE.AUGMENT, seed=seed, desc=f"distill {layer.name}", wrap=self.wrap,
                         feature_layers=cfg.FINETUNE.FEATURE_LAYERS, feature_weight=cfg.FINETUNE.FEATURE_WEIGHT)
        record = LayerRecord(layer.name, layer.block_size, layer.n_centroids, layer.n_subvectors,
                             objective=result.objective, rel_error=float(err),
                             distill_loss=losses[-1] if losses else float("nan"),
                             seconds=time.perf_counter() - start, output_error=output_error)
        logger.info("[%d] %s d=%d K=%d: rel. weight error %.4f%s (%.1fs)", index, layer.name, layer.block_size,
                    layer.n_centroids, record.rel_error,
                    f", distill loss {record.distill_loss:.4f}" if losses else "", record.seconds)
        return record

    def refine(self, student: nn.Module, layer: LayerPlan, weight: torch.Tensor, result: PQResult,
               seed: int, rounds: int) -> Optional[PQResult]:
        """Output-space refinement of the EM's codes and codebook (QUANT.REFINE; see quantization/refine.py), at
        most ``rounds`` sweep + solve rounds.

        The moments are centered when a corrected BatchNorm follows the layer (it restores the output mean);
        with QUANT.REFINE.BN_WEIGHTED, each output channel's error is weighted by the square of the scale the
        teacher's following BatchNorm applies to it (the error is measured after that BatchNorm); with
        QUANT.REFINE.RESIDUAL, the last conv of a residual branch also absorbs the drift of the skip path.
        Returns None (keep the EM result) when fewer rows than weight columns were captured.
        """
        cfg, name = self.cfg.QUANT, layer.name
        views = cfg.REFINE.AUGMENTED_VIEWS  # the values were checked on construction (check_quantizer_cfg)
        bn_name = self._bn_pairs.get(name)
        skip = residual_branch_end(self.teacher, name) if cfg.REFINE.RESIDUAL and bn_name else None

        def capture(n_images: int, augment: bool, pass_seed: int):
            batches = self.task.calib_batches(n_images=n_images, batch_size=cfg.CAPTURE_BATCH_SIZE,
                                              augment=augment, seed=pass_seed)
            return capture_second_moments(student, self.teacher, name, batches, self.task.forward,
                                          rows_per_image=cfg.CAPTURE_ROWS_PER_IMAGE, seed=pass_seed,
                                          reduce=self.gram_reduce, skip=skip)

        moments = capture(cfg.CAPTURE_IMAGES, False, seed)
        dim = moments.ss.shape[1]
        if views and moments.n_rows < cfg.REFINE.MIN_ROWS_PER_COLUMN * dim:
            plain_rows = moments.n_rows
            moments = moments.merged(capture(cfg.CAPTURE_IMAGES * views, True, seed + 1))
            logger.info("%s: %d rows from the plain pass < %d x %d columns: %d augmented passes -> %d rows", name,
                        plain_rows, cfg.REFINE.MIN_ROWS_PER_COLUMN, dim, views, moments.n_rows)
        if moments.n_rows < dim:
            logger.info("%s: %d captured rows < %d weight columns: refinement would fit noise; keeping the EM "
                        "result (raise QUANT.CAPTURE_IMAGES to refine it)", name, moments.n_rows, dim)
            return None
        if cfg.BN_CORRECTION != "none" and bn_name:
            moments = moments.centered()
        affine = bn_scale_shift(self.teacher.get_submodule(bn_name)) if bn_name else None
        gain = None
        if affine is not None:
            gain = affine[0].double()
            gain = torch.where(gain.abs() < 1e-6, torch.full_like(gain, 1e-6), gain)
        row_weight = gain ** 2 if cfg.REFINE.BN_WEIGHTED and gain is not None else None
        damping = refine_damping(cfg.REFINE, layer, dim, moments.n_rows)
        objective = output_objective(weight, moments, damping=damping, target=cfg.REFINE.TARGET,
                                     row_weight=row_weight, residual_gain=gain, metric=cfg.REFINE.DAMPING_METRIC)
        return refine_pq(objective, result.codes, result.codebook, rounds=rounds,
                         cg_iters=cfg.REFINE.CG_ITERS,
                         label=f"{name} ({moments.n_rows} captured rows, damping {damping:.3g})")

    def correct_bn(self, student: nn.Module, name: str, seed: int) -> None:
        """Re-estimate the running statistics of the BatchNorm fed by layer ``name`` (QUANT.BN_CORRECTION)."""
        mode = self.cfg.QUANT.BN_CORRECTION  # one of BN_CORRECTION_MODES (check_quantizer_cfg)
        bn_name = self._bn_pairs.get(name)
        if mode == "none" or bn_name is None:
            return
        stats = []
        for model in (student, self.teacher):
            batches = self.task.calib_batches(n_images=self.cfg.QUANT.CAPTURE_IMAGES,
                                              batch_size=self.cfg.QUANT.CAPTURE_BATCH_SIZE, augment=False,
                                              seed=seed)
            mean, var = channel_stats(model, bn_name, batches, self.task.forward)
            if self.gram_reduce is not None:  # pool the first two moments of the ranks' (equal) shares
                n = self.gram_reduce(torch.ones((), dtype=torch.float64))
                second = self.gram_reduce(var + mean * mean) / n
                mean = self.gram_reduce(mean) / n
                var = (second - mean * mean).clamp_min(0)
            stats.append((mean, var))
        correct_batchnorm(student.get_submodule(bn_name), stats[0], stats[1], variance=mode == "mean_var")

    # -- whole pipeline ---------------------------------------------------------------------------------
    def run(self, *, resume: bool = False,
            on_layer_done: Optional[Callable[[int, LayerRecord], None]] = None) -> QuantizationResult:
        """Quantize every planned layer in execution order, then finetune globally.

        Args:
            resume: continue from ``OUTPUT_DIR/progress.pth`` when present.
            on_layer_done: called after each layer's progress is saved (index, record).
        """
        cfg = self.cfg
        student = copy.deepcopy(self.teacher)
        plan = self.make_plan(student)
        self._bn_pairs = following_batchnorms(self.teacher, self.task.example_forward)
        logger.info("plan: %d layers to quantize (execution order)", len(plan))
        records = self._load_progress(student, plan) if resume else []
        timings = {"layers": 0.0}
        t0 = time.perf_counter()
        for index, layer in enumerate(plan):
            if index < len(records):
                continue
            records.append(self.quantize_layer(student, layer, index))
            self._save_progress(student, plan, records)
            if on_layer_done is not None:
                on_layer_done(index, records[-1])
        timings["layers"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        params = codebook_params(student)
        if cfg.FINETUNE.BN == "affine":  # else "frozen" (check_quantizer_cfg)
            params += bn_affine_params(student)
        _seed_all(cfg.SEED * 100003 + len(plan))
        distill(student, self.teacher, self.task, params, iters=cfg.FINETUNE.GLOBAL_ITERS,
                lr=cfg.FINETUNE.GLOBAL_LR, batch_size=cfg.FINETUNE.BATCH_SIZE, augment=cfg.FINETUNE.AUGMENT,
                seed=cfg.SEED * 100003 + len(plan), desc="global finetune", wrap=self.wrap,
                feature_layers=cfg.FINETUNE.FEATURE_LAYERS, feature_weight=cfg.FINETUNE.FEATURE_WEIGHT)
        timings["global_finetune"] = time.perf_counter() - t0
        round_codebooks_to_fp16(student)
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
        return QuantizationResult(student, plan, records, timings)
