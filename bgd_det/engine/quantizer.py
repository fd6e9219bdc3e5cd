"""The compression pipeline: plan -> per layer (fit: capture + EM + refinement -> install: swap + BatchNorm
correction -> layer-wise distillation) -> global finetuning -> compressed checkpoint.

Calibration activations come from a :class:`~bgd_det.engine.streaming.CaptureSource` (the streaming frontier cache,
or the recompute reference). Per-layer progress is saved atomically after each layer, so ``resume=True`` continues
after the last finished layer. The capture images and views are drawn once per run from ``cfg.SEED``; every layer's
other randomness is seeded from ``(cfg.SEED, layer index)``: an interrupted and resumed run gives the same codes as
an uninterrupted one.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
import resource
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoint import check_finite, compressed_state, load_compressed_into, round_codebooks_to_fp16
from ..config.checks import check_config
from ..quantization.bn_correction import (bn_scale_shift, channel_stats, correct_batchnorm, correct_bias,
                                         following_batchnorms, output_channel_mean)
from ..quantization.capture import (capture_gram, capture_gram_pool, capture_second_moments, has_input_metric,
                                    metric_uses_inputs)
from ..quantization.plan import (LayerPlan, QuantRules, build_plan, check_unquantized, execution_order,
                                 unquantized_weights)
from ..quantization.pq import PQResult, em_quantize, em_quantize_resampled
from ..quantization.refine import output_objective, refine_pq, residual_ridge
from ..quantization.residual import residual_branch_end
from ..quantization.swap import make_pq_layer, set_module
from ..tasks.base import Task
from ..utils import comm
from ..utils.file_io import atomic_save
from .distributed import Collectives
from .finetune import FinetuneCheckpoint, OptimSpec, bn_affine_params, codebook_params, distill, feature_modules
from .streaming import CaptureSource, PassSpec, RecomputeSource, build_capture_source

logger = logging.getLogger(__name__)

__all__ = ["LayerRecord", "QuantizationResult", "Quantizer", "QuantizerHook", "PROGRESS_FILE"]

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
    output_error: float = float("nan")  # squared, relative, damping left out (nan: not refined)
    capture_seconds: float = 0.0  # of ``seconds``: capturing Gram / moments / BatchNorm statistics


@dataclass
class QuantizationResult:
    student: nn.Module
    plan: List[LayerPlan]
    records: List[LayerRecord] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)


FINETUNE_STATE_FILE = "finetune_state.pth"


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class QuantizerHook:
    """Called by :meth:`Quantizer.run` around every layer and at the end (detectron2's ``HookBase`` pattern).

    Override any of the three; each gets the quantizer, so it can read ``cfg`` and ``output_dir``.
    """

    def before_layer(self, quantizer: "Quantizer", index: int, layer: LayerPlan) -> None:
        """Before layer ``index`` is fitted (layers already done in a resumed run are not announced)."""

    def after_layer(self, quantizer: "Quantizer", index: int, record: LayerRecord) -> None:
        """After layer ``index`` is installed, distilled and its progress saved."""

    def after_run(self, quantizer: "Quantizer", result: QuantizationResult) -> None:
        """After global finetuning, before the result is returned."""


class Quantizer:
    """Compress ``teacher`` per ``cfg`` on ``task``'s calibration data.

    Args:
        cfg: frozen config; teacher: uncompressed model (not modified); task: data/forward/loss/eval.
        output_dir: where progress and checkpoints go ("" = nowhere).
        collectives: the process group (:class:`~bgd_det.engine.distributed.Collectives`; default: one process).
        hooks: :class:`QuantizerHook` objects called around every layer.
    """

    def __init__(self, cfg, teacher: nn.Module, task: Task, *, output_dir: str = "",
                 collectives: Optional[Collectives] = None, hooks: Sequence[QuantizerHook] = ()) -> None:
        self.cfg, self.teacher, self.task = cfg, teacher.eval(), task
        self.output_dir = output_dir
        self.comm = collectives if collectives is not None else Collectives()
        self.hooks = list(hooks)
        check_config(cfg)  # configs built in code: a bad value fails here, before any layer is quantized
        feature_modules(self.teacher, cfg.FINETUNE.FEATURE_LAYERS)  # likewise a name that is not in the model
        # Every plan error at once, and the weights the plan leaves in fp32, before the teacher's evaluation; the
        # student of run() is a copy of this teacher, so this is its plan too.
        self.order = execution_order(self.teacher, self.task.example_forward)
        self.plan = build_plan(self.teacher, self.order, QuantRules.from_cfg(cfg.QUANT))
        self.unquantized = unquantized_weights(self.teacher, self.order, self.plan)
        check_unquantized(self.unquantized, sum(p.numel() for p in self.teacher.parameters()),
                          cfg.QUANT.MAX_UNQUANTIZED)
        for reason in sorted({u.reason for u in self.unquantized}):
            names = [u.name for u in self.unquantized if u.reason == reason]
            log = logger.info if reason == "skipped by rule" else logger.warning
            log("%d weight(s) stay fp32, %s: %s%s", len(names), reason, ", ".join(names[:8]),
                ", ..." if len(names) > 8 else "")
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        # {layer: BatchNorm fed by its output}, from one traced forward of the teacher
        self.bn_pairs: Dict[str, str] = following_batchnorms(self.teacher, self.task.example_forward)
        q = cfg.QUANT
        capture_seed = cfg.SEED * 100003 + 90001  # once per run: the same images and views for every layer
        self.plain_pass = PassSpec(q.CAPTURE_IMAGES, q.CAPTURE_BATCH_SIZE, q.CAPTURE_AUGMENT, capture_seed)
        self.views_pass = PassSpec(q.CAPTURE_IMAGES * q.REFINE.AUGMENTED_VIEWS, q.CAPTURE_BATCH_SIZE, True,
                                   capture_seed + 1)

    @property
    def _reduce(self):
        """The statistics' reduction for the capture functions (None in one process: no rounding at all)."""
        return self.comm.sum if self.comm.world_size > 1 else None

    # -- planning ---------------------------------------------------------------------------------------
    def make_plan(self, model: nn.Module) -> List[LayerPlan]:
        """The plan of ``model`` (the teacher's is ``self.plan``) under this run's QUANT rules."""
        return build_plan(model, execution_order(model, self.task.example_forward), QuantRules.from_cfg(self.cfg.QUANT))

    def capture_source(self, student: nn.Module, layers: Sequence[str]) -> CaptureSource:
        """The source of calibration activations for quantizing ``layers`` (in order) into ``student``."""
        spill = self.cfg.QUANT.STREAM.SPILL_DIR or None
        return build_capture_source(self.cfg, self.task, student, self.teacher, layers, plain=self.plain_pass,
                                    views=self.views_pass, spill_dir=spill)

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
        state["fingerprint"] = self.fingerprint()
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
        saved = state.get("fingerprint")
        if saved is None:
            logger.warning("%s records no fingerprint (an older version): its settings cannot be checked", path)
        else:
            now = self.fingerprint()
            changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            if changed:
                first = ", ".join(f"{k} {saved.get(k, '-')} -> {now.get(k, '-')}" for k in changed[:4])
                raise ValueError(f"{path} was written by a run with other settings ({first}"
                                 f"{', ...' if len(changed) > 4 else ''}); --resume continues only the same run: "
                                 f"restore them, or start over with --overwrite / another OUTPUT_DIR")
        load_compressed_into(student, state, source=path)
        records = [LayerRecord(**r) for r in state["records"]]
        logger.info("resumed after %d/%d layers from %s", len(records), len(plan), path)
        return records

    #: settings that do not change the result (how activations are cached, when state is saved or validated).
    FINGERPRINT_EXEMPT = ("QUANT.ENGINE", "QUANT.STREAM.", "FINETUNE.CHECKPOINT_PERIOD", "FINETUNE.EVAL_PERIOD")
    #: FINETUNE keys that only global finetuning reads (a finished layer stage may be finetuned otherwise).
    GLOBAL_ONLY = ("FINETUNE.GLOBAL_", "FINETUNE.LR_", "FINETUNE.BN")
    #: FINETUNE keys that the layer stage reads only when it distills (FINETUNE.LAYER_ITERS > 0).
    LAYER_DISTILL = ("FINETUNE.BATCH_SIZE", "FINETUNE.TEMPERATURE", "FINETUNE.OPTIMIZER", "FINETUNE.MOMENTUM",
                     "FINETUNE.WEIGHT_DECAY", "FINETUNE.CENTROID_GRAD", "FINETUNE.FEATURE_", "FINETUNE.AUGMENT",
                     "FINETUNE.MIXUP_ALPHA")

    def fingerprint(self, *, layers_only: bool = True) -> Dict[str, str]:
        """What determines this run's result, for ``--resume`` to compare: the teacher (its file's SHA-256, or the
        weights name), the architecture, the calibration split, the seed, the input size, and every QUANT / FINETUNE
        value except :attr:`FINGERPRINT_EXEMPT`; with ``layers_only`` (the layer stage's progress file) without the
        keys only global finetuning reads, and without those of layer-wise distillation when it is off."""
        exempt = self.FINGERPRINT_EXEMPT
        if layers_only:
            exempt += self.GLOBAL_ONLY + (self.LAYER_DISTILL if self.cfg.FINETUNE.LAYER_ITERS == 0 else ())
        cfg = self.cfg
        weights = cfg.MODEL.WEIGHTS
        if weights and os.path.isfile(weights):
            digest = hashlib.sha256()
            with open(weights, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
            weights = f"sha256:{digest.hexdigest()[:16]}"
        out = {"MODEL.ARCH": cfg.MODEL.ARCH, "MODEL.WEIGHTS": weights, "MODEL.NUM_CLASSES": str(cfg.MODEL.NUM_CLASSES),
               "DATASETS.CALIB": cfg.DATASETS.CALIB, "SEED": str(cfg.SEED)}

        def walk(prefix: str, node) -> None:
            for key, value in node.items():
                name = f"{prefix}.{key}"
                if hasattr(value, "items"):
                    walk(name, value)
                elif not any(name.startswith(e) for e in exempt):
                    out[name] = repr(value)

        for section in ("INPUT", "QUANT", "FINETUNE"):
            walk(section, cfg[section])
        return out

    # -- per layer --------------------------------------------------------------------------------------
    def quantize_layer(self, student: nn.Module, layer: LayerPlan, index: int,
                       source: Optional[CaptureSource] = None) -> LayerRecord:
        """Fit, install and distill one layer; ``source`` defaults to the recompute path."""
        source = source if source is not None else RecomputeSource(self.task, self.teacher, self.plain_pass,
                                                                         self.views_pass)
        start = time.perf_counter()
        seed = self.cfg.SEED * 100003 + index
        _seed_all(seed)
        source.begin_layer(layer.name)
        result, output_error, capture_s = self.fit(student, layer, source, seed)
        pq, rel_error, bn_s = self.install(student, layer, result, source, seed)
        losses = self.distill_layer(student, layer, pq, seed)
        record = LayerRecord(layer.name, layer.block_size, layer.n_centroids, layer.n_subvectors,
                             objective=result.objective, rel_error=rel_error,
                             distill_loss=losses[-1] if losses else float("nan"),
                             seconds=time.perf_counter() - start, output_error=output_error,
                             capture_seconds=capture_s + bn_s)
        logger.info("[%d] %s d=%d K=%d: rel. weight error %.4f%s (%.1fs, %.1fs capturing)", index, layer.name,
                    layer.block_size, layer.n_centroids, record.rel_error,
                    f", distill loss {record.distill_loss:.4f}" if losses else "", record.seconds,
                    record.capture_seconds)
        return record

    def fit(self, student: nn.Module, layer: LayerPlan, source: CaptureSource,
            seed: int) -> Tuple[PQResult, float, float]:
        """Codes and codebook of ``layer``: Gram capture + EM, then the optional output-space refinement.

        Returns:
            (the result, rank 0's on every rank; its refined output error or nan; seconds spent capturing).
        """
        cfg = self.cfg
        module = student.get_submodule(layer.name)
        gram, t0 = None, time.perf_counter()
        weight = module.weight.detach()
        resample = cfg.QUANT.EM_RESAMPLE_IMAGES
        if resample and has_input_metric(module):  # the paper's E-step (one process: rank 0's codes are kept)
            batches, forward = source.plain()
            grams, counts = capture_gram_pool(student, layer.name, batches, forward, block_size=layer.block_size,
                                              rows_per_image=cfg.QUANT.CAPTURE_ROWS_PER_IMAGE, seed=seed)
            capture_s = time.perf_counter() - t0
            result = em_quantize_resampled(weight, grams, counts, block_size=layer.block_size,
                                           n_centroids=layer.n_centroids, sample=min(resample, len(counts)),
                                           n_iter=cfg.QUANT.EM_ITERS, seed=seed)
        else:
            if metric_uses_inputs(cfg.QUANT.METRIC) and has_input_metric(module):
                batches, forward = source.plain()
                acc = capture_gram(student, layer.name, batches, forward, block_size=layer.block_size,
                                   rows_per_image=cfg.QUANT.CAPTURE_ROWS_PER_IMAGE, seed=seed, reduce=self._reduce)
                gram = acc.result(centered=cfg.QUANT.METRIC == "centered")
            capture_s = time.perf_counter() - t0
            result = em_quantize(weight, gram, block_size=layer.block_size, n_centroids=layer.n_centroids,
                                 n_iter=cfg.QUANT.EM_ITERS, seed=seed)
        output_error = float("nan")
        rounds = layer.rounds
        if rounds > 0 and has_input_metric(module):
            refined, seconds = self.refine(student, layer, weight, result, source, seed, rounds)
            capture_s += seconds
            if refined is not None:
                result, output_error = refined, refined.objective
        return self.comm.broadcast_result(result), output_error, capture_s

    def install(self, student: nn.Module, layer: LayerPlan, result: PQResult, source: CaptureSource,
                seed: int) -> Tuple[nn.Module, float, float]:
        """Swap the codebook layer into ``student`` and correct the BatchNorm it feeds.

        Returns:
            (the codebook layer, its relative weight error, seconds spent capturing BatchNorm statistics).
        """
        module = student.get_submodule(layer.name)
        weight = module.weight.detach()
        pq = make_pq_layer(module, layer)
        pq.set_quantization(result.codes, result.codebook)
        set_module(student, layer.name, pq)
        with torch.no_grad():
            err = (pq.decoded_weight() - weight).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-12)
        t0 = time.perf_counter()
        self.correct_bn(student, layer.name, source)
        return pq, float(err), time.perf_counter() - t0

    def distill_layer(self, student: nn.Module, layer: LayerPlan, pq: nn.Module, seed: int) -> List[float]:
        """Layer-wise distillation of ``pq``'s centroids on the task's loss (the whole network runs: the paper's
        loss is on the logits)."""
        cfg = self.cfg.FINETUNE
        optim = dataclasses.replace(OptimSpec.from_cfg(cfg, cfg.LAYER_LR), schedule="constant")
        return distill(student, self.teacher, self.task, [pq.codebook], iters=cfg.LAYER_ITERS, optim=optim,
                       batch_size=cfg.BATCH_SIZE, augment=cfg.AUGMENT, seed=seed, desc=f"distill {layer.name}",
                       wrap=self.comm.wrap, feature_layers=cfg.FEATURE_LAYERS, feature_weight=cfg.FEATURE_WEIGHT)

    def refine(self, student: nn.Module, layer: LayerPlan, weight: torch.Tensor, result: PQResult,
               source: CaptureSource, seed: int, rounds: int) -> Tuple[Optional[PQResult], float]:
        """Output-space refinement of the EM's codes and codebook (QUANT.REFINE; see quantization/refine.py), at
        most ``rounds`` sweep + solve rounds.

        The moments are centered when a corrected BatchNorm follows the layer (it restores the output mean);
        with QUANT.REFINE.BN_WEIGHTED, each output channel's error is weighted by the square of the scale the
        teacher's following BatchNorm applies to it (the error is measured after that BatchNorm); with
        QUANT.REFINE.RESIDUAL, the last conv of a residual branch also absorbs the drift of the skip path.

        Returns:
            (the refined result, or None to keep the EM result when fewer rows than weight columns were captured;
            seconds spent capturing).
        """
        cfg, name = self.cfg.QUANT, layer.name
        views = cfg.REFINE.AUGMENTED_VIEWS  # the values were checked on construction (check_config)
        bn_name = self.bn_pairs.get(name)
        skip = residual_branch_end(self.teacher, name) if cfg.REFINE.RESIDUAL and bn_name else None

        def capture(data, pass_seed: int):
            batches, forward = data
            return capture_second_moments(student, self.teacher, name, batches, forward,
                                          rows_per_image=cfg.CAPTURE_ROWS_PER_IMAGE, seed=pass_seed,
                                          reduce=self._reduce, skip=skip,
                                          project=weight if cfg.REFINE.TARGET == "teacher" else None)

        t0 = time.perf_counter()
        moments = capture(source.plain(), seed)
        dim = moments.ss.shape[1]
        if views and moments.n_rows < cfg.REFINE.MIN_ROWS_PER_COLUMN * dim:
            plain_rows = moments.n_rows
            moments = moments.merged(capture(source.views(), seed + 1))
            logger.info("%s: %d rows from the plain pass < %d x %d columns: %d augmented passes -> %d rows", name,
                        plain_rows, cfg.REFINE.MIN_ROWS_PER_COLUMN, dim, views, moments.n_rows)
        capture_s = time.perf_counter() - t0
        if moments.n_rows < dim:
            logger.info("%s: %d captured rows < %d weight columns: refinement would fit noise; keeping the EM "
                        "result (raise QUANT.CAPTURE_IMAGES to refine it)", name, moments.n_rows, dim)
            return None, capture_s
        if cfg.BN_CORRECTION != "none" and bn_name:
            moments = moments.centered()
        affine = bn_scale_shift(self.teacher.get_submodule(bn_name)) if bn_name else None
        gain = None
        if affine is not None:
            gain = affine[0].double()
            gain = torch.where(gain.abs() < 1e-6, torch.full_like(gain, 1e-6), gain)
        row_weight = gain ** 2 if cfg.REFINE.BN_WEIGHTED and gain is not None else None
        damping = layer.refine_damping(dim, moments.n_rows)
        objective = output_objective(weight, moments, damping=damping, target=cfg.REFINE.TARGET,
                                     row_weight=row_weight, residual_gain=gain, metric=cfg.REFINE.DAMPING_METRIC,
                                     residual_ridge=residual_ridge(gain, cfg.REFINE.RESIDUAL_GAIN_FLOOR))
        refined = refine_pq(objective, result.codes, result.codebook, rounds=rounds, cg_iters=cfg.REFINE.CG_ITERS,
                            label=f"{name} ({moments.n_rows} captured rows, damping {damping:.3g})")
        return refined, capture_s

    def correct_bn(self, student: nn.Module, name: str, source: CaptureSource) -> None:
        """Re-estimate the running statistics of the BatchNorm fed by layer ``name`` (QUANT.BN_CORRECTION); a
        layer that feeds none but has a bias gets bias correction instead (QUANT.BIAS_CORRECTION)."""
        mode = self.cfg.QUANT.BN_CORRECTION  # one of BN_CORRECTION_MODES (check_config)
        bn_name = self.bn_pairs.get(name)
        if mode == "none":
            return
        if bn_name is None:
            layer = student.get_submodule(name)
            if self.cfg.QUANT.BIAS_CORRECTION and getattr(layer, "bias", None) is not None:
                means = [self._pooled(output_channel_mean(model, name, *source.plain()))
                         for model in (student, self.teacher)]
                correct_bias(layer, means[0], means[1])
            return
        stats = []
        for model in (student, self.teacher):
            mean, var = channel_stats(model, bn_name, *source.plain())
            if self.comm.world_size > 1:  # pool the first two moments of the ranks' (equal) shares
                second = self._pooled(var + mean * mean)
                mean = self._pooled(mean)
                var = (second - mean * mean).clamp_min(0)
            stats.append((mean, var))
        correct_batchnorm(student.get_submodule(bn_name), stats[0], stats[1], variance=mode == "mean_var")

    def _pooled(self, mean: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of per-rank means of equal shares (itself in one process)."""
        if self.comm.world_size == 1:
            return mean
        return self.comm.sum(mean) / self.comm.sum(torch.ones((), dtype=torch.float64))

    def global_iters(self) -> int:
        """Steps of global finetuning: FINETUNE.GLOBAL_EPOCHS of the calibration set when set, else GLOBAL_ITERS."""
        f = self.cfg.FINETUNE
        if f.GLOBAL_EPOCHS > 0:
            return math.ceil(f.GLOBAL_EPOCHS * self.task.calib_size() / f.BATCH_SIZE)
        return f.GLOBAL_ITERS

    def finetune(self, student: nn.Module, *, seed: int, resume: bool = False) -> List[float]:
        """Global finetuning of every codebook (and BatchNorm per FINETUNE.BN); with FINETUNE.CHECKPOINT_PERIOD its
        state is saved periodically and, with ``resume``, a saved state is continued."""
        f = self.cfg.FINETUNE
        params = codebook_params(student)
        if f.BN in ("affine", "train"):
            params += bn_affine_params(student)
        path = os.path.join(self.output_dir, FINETUNE_STATE_FILE) if self.output_dir else ""
        checkpoint = FinetuneCheckpoint(path, f.CHECKPOINT_PERIOD, write=comm.is_main_process(),
                                        fingerprint=self.fingerprint(layers_only=False))
        if not resume:
            checkpoint.remove()  # a state left by an earlier, interrupted run is not continued without --resume
        validate = (f.EVAL_PERIOD, self.task.evaluate) if f.EVAL_PERIOD > 0 else None
        _seed_all(seed)
        return distill(student, self.teacher, self.task, params, iters=self.global_iters(),
                       optim=OptimSpec.from_cfg(f, f.GLOBAL_LR), batch_size=f.BATCH_SIZE, augment=f.AUGMENT,
                       seed=seed, desc="global finetune", wrap=self.comm.wrap, feature_layers=f.FEATURE_LAYERS,
                       feature_weight=f.FEATURE_WEIGHT, bn_stats=f.BN in ("stats", "train"), checkpoint=checkpoint,
                       validate=validate)

    # -- whole pipeline ---------------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> QuantizationResult:
        """Quantize every planned layer in execution order, then finetune globally.

        Args:
            resume: continue from ``OUTPUT_DIR/progress.pth`` when present.
        """
        cfg = self.cfg
        student = copy.deepcopy(self.teacher)
        plan = list(self.plan)
        logger.info("plan: %d layers to quantize (execution order)", len(plan))
        records = self._load_progress(student, plan) if resume else []
        timings = {"layers": 0.0}
        t0 = time.perf_counter()
        todo = [(i, layer) for i, layer in enumerate(plan) if i >= len(records)]
        if todo:
            source = self.capture_source(student, [layer.name for _, layer in todo])
            try:
                for index, layer in todo:
                    for hook in self.hooks:
                        hook.before_layer(self, index, layer)
                    records.append(self.quantize_layer(student, layer, index, source))
                    check_finite(student, f"after layer {layer.name!r}")
                    self._save_progress(student, plan, records)
                    for hook in self.hooks:
                        hook.after_layer(self, index, records[-1])
            finally:
                source.close()
        timings["layers"] = time.perf_counter() - t0
        timings["layers_capturing"] = sum(r.capture_seconds for r in records[len(plan) - len(todo):])
        timings["peak_rss_mib"] = _peak_rss_mib()

        t0 = time.perf_counter()
        self.finetune(student, seed=cfg.SEED * 100003 + len(plan), resume=resume)
        timings["global_finetune"] = time.perf_counter() - t0
        check_finite(student, "after global finetuning")
        round_codebooks_to_fp16(student)
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
        logger.info("layers: %.1fs (%.1fs capturing), global finetuning %.1fs; peak RSS %.0f MiB after the layers",
                    timings["layers"], timings["layers_capturing"], timings["global_finetune"],
                    timings["peak_rss_mib"])
        result = QuantizationResult(student, plan, records, timings)
        for hook in self.hooks:
            hook.after_run(self, result)
        return result
