"""Where a layer's calibration activations come from: the streaming frontier cache or the recompute reference.

Both sources give the quantizer the same two passes over the calibration images, drawn **once per run** (the same
images, in the same order, for every layer): the plain pass (``QUANT.CAPTURE_IMAGES`` centre crops) and the
augmented views (``QUANT.REFINE.AUGMENTED_VIEWS`` passes of random-resized crops + flips, seeded once).

- :class:`RecomputeSource` (``QUANT.ENGINE recompute``, the reference): every capture runs the whole network
  prefix on freshly loaded images, so a job's cost grows with depth squared.
- :class:`StreamingSource` (``QUANT.ENGINE streaming``): the model is cut into sequential stages
  (:mod:`bgd_det.modeling.stages`); the student's and the teacher's inputs of the current stage are kept for every
  image and view (:class:`FrontierCache`) and a capture runs only that stage. When the quantizer moves past a
  stage, the cache is advanced through the now-compressed stage. The views are materialised at the first stage
  that asks for them, by one pass of the finished prefix, and advanced from there on.

With an fp32 cache the two sources feed the capture hooks the same tensors, so they give the same codes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..config.checks import CACHE_DTYPE_NAMES, ENGINES
from ..modeling.stages import Stage, stage_of_layer
from ..tasks.base import Task
from ..utils.modes import eval_mode

logger = logging.getLogger(__name__)

__all__ = ["ENGINES", "CACHE_DTYPES", "CaptureSource", "RecomputeSource", "StreamingSource", "FrontierCache",
           "PairedInput", "build_capture_source", "cache_budget_bytes", "OverBudget", "tree_map", "tree_leaves",
           "tree_equal"]

CACHE_DTYPES = {name: getattr(torch, name) for name in CACHE_DTYPE_NAMES}  # QUANT.STREAM.DTYPE -> dtype

Forward = Callable[[nn.Module, Any], Any]


def _seeded(make: Callable[[], Iterable[Any]], seed: int) -> Iterator[Any]:
    """Iterate ``make()`` with the global torch RNG seeded to ``seed`` (random crops and flips of the views),
    leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield from make()


class CaptureSource:
    """The calibration data of the layer being quantized: ``(batches, forward)`` pairs for the capture functions
    of :mod:`bgd_det.quantization.capture` and :func:`~bgd_det.quantization.bn_correction.channel_stats`."""

    def begin_layer(self, name: str) -> None:
        """Called before layer ``name`` is captured; layers come in execution order."""

    def plain(self) -> Tuple[Iterable[Any], Forward]:
        raise NotImplementedError

    def views(self) -> Tuple[Iterable[Any], Forward]:
        raise NotImplementedError

    def close(self) -> None:
        """Release cached activations (and spill files)."""


@dataclass(frozen=True)
class PassSpec:
    """How the task draws one pass: images, batch size, augmentation, order seed and transform seed."""

    n_images: int
    batch_size: int
    augment: bool
    seed: int

    def batches(self, task: Task) -> Iterator[Any]:
        return _seeded(lambda: task.calib_batches(n_images=self.n_images, batch_size=self.batch_size,
                                                  augment=self.augment, seed=self.seed), self.seed)


class RecomputeSource(CaptureSource):
    """Reference source: every capture loads the images again and runs the models from their input (through
    ``task.paired_forward(teacher)``)."""

    def __init__(self, task: Task, teacher: nn.Module, plain: PassSpec, views: PassSpec) -> None:
        self.task, self._plain, self._views = task, plain, views
        self._forward = task.paired_forward(teacher)

    def plain(self) -> Tuple[Iterable[Any], Forward]:
        return self._plain.batches(self.task), self._forward

    def views(self) -> Tuple[Iterable[Any], Forward]:
        return self._views.batches(self.task), self._forward


def cache_budget_bytes(budget_mb: float) -> int:
    """``QUANT.STREAM.BUDGET_MB`` in bytes; 0 means half of the memory available now."""
    if budget_mb > 0:
        return int(budget_mb * 2 ** 20)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 * 2 ** 30
    return available // 2


class OverBudget(RuntimeError):
    """The frontier cache does not fit the memory budget and spilling to disk is off (or the disk is full)."""


@dataclass
class PairedInput:
    """The student's and the teacher's input of the current stage for one batch (the same object while they are
    equal, e.g. before the first compressed layer)."""

    student: Tensor
    teacher: Tensor


def tree_map(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (dicts, lists and tuples are walked; other leaves such
    as image sizes are kept)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, tree_map(fn, v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_map(fn, v) for v in obj)
    return obj


def tree_leaves(obj: Any) -> List[Tensor]:
    """The tensors of ``obj`` in :func:`tree_map` order."""
    out: List[Tensor] = []
    tree_map(out.append, obj)
    return out


def tree_equal(a: Any, b: Any) -> bool:
    """Whether two stage states have the same structure, the same non-tensor leaves and equal tensors."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b)
                and all(tree_equal(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)) and all(tree_equal(x, y) for x, y in zip(a, b))
    return a == b


class _Ledger:
    """Byte accounting of every cache of one run against the budget; past it, memory-mapped spill files."""

    def __init__(self, budget: int, spill_dir: Optional[str]) -> None:
        self.budget, self.spill_dir = budget, spill_dir
        self.in_memory = 0
        self._bytes: dict = {}  # id(stored tensor) -> (bytes, on disk)
        self._counter = 0

    def store(self, t: Tensor) -> Tuple[Tensor, Optional[str]]:
        """Account ``t`` (contiguous): returns it, or its memory-mapped copy and the file behind it."""
        n = t.numel() * t.element_size()
        if self.in_memory + n <= self.budget:
            self.in_memory += n
            self._bytes[id(t)] = (n, False)
            return t, None
        if self.spill_dir is None:
            raise OverBudget(f"the stage inputs need more than the cache budget of {self.budget / 2**20:.0f} MiB "
                             f"(QUANT.STREAM.BUDGET_MB) and QUANT.STREAM.SPILL is off")
        os.makedirs(self.spill_dir, exist_ok=True)
        if shutil.disk_usage(self.spill_dir).free < n + 2 ** 28:
            raise OverBudget(f"no room to spill {n / 2**20:.0f} MiB of stage inputs to {self.spill_dir}")
        self._counter += 1
        path = os.path.join(self.spill_dir, f"frontier_{self._counter}.bin")
        t.reshape(-1).view(torch.uint8).numpy().tofile(path)
        mapped = torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        self._bytes[id(mapped)] = (n, True)
        return mapped, path

    def forget(self, t: Tensor) -> None:
        n, on_disk = self._bytes.pop(id(t), (0, False))
        if not on_disk:
            self.in_memory -= n

    def usage(self, tensors: Iterable[Tensor]) -> Tuple[int, int]:
        """(bytes in memory, bytes on disk) of ``tensors`` (each counted once)."""
        mem = disk = 0
        for t in {id(t): t for t in tensors}.values():
            n, on_disk = self._bytes.get(id(t), (0, False))
            disk, mem = (disk + n, mem) if on_disk else (disk, mem + n)
        return mem, disk


class FrontierCache:
    """Stage inputs of one pass (a list of :class:`PairedInput`, one per batch; each side a tensor or a nest of
    dicts / lists of tensors), activations (floating tensors of 4 or more dims) stored in ``dtype`` and handed out
    in the models' dtype; the byte budget is shared with the run's other caches (:class:`_Ledger`)."""

    def __init__(self, name: str, *, dtype: torch.dtype, ledger: _Ledger) -> None:
        self.name, self.dtype, self.ledger = name, dtype, ledger
        self.entries: List[PairedInput] = []
        self._files: dict = {}  # id(stored tensor) -> spill file
        self._narrowed: dict = {}  # id(stored tensor) -> the dtype it had before storage

    def _store_leaf(self, t: Tensor) -> Tensor:
        t = t.detach()
        narrow = t.is_floating_point() and t.dim() >= 4 and t.dtype != self.dtype
        before = t.dtype
        stored, path = self.ledger.store((t.to(self.dtype) if narrow else t).contiguous())
        if path is not None:
            self._files[id(stored)] = path
        if narrow:
            self._narrowed[id(stored)] = before
        return stored

    def _drop(self, state: Any) -> None:
        for t in tree_leaves(state):
            self.ledger.forget(t)
            self._narrowed.pop(id(t), None)
            path = self._files.pop(id(t), None)
            if path is not None:
                with contextlib.suppress(OSError):
                    os.remove(path)

    def append(self, student: Any, teacher: Any) -> None:
        """Store one batch's stage inputs (once when the student's equal the teacher's)."""
        s = tree_map(self._store_leaf, student)
        t = s if teacher is student or tree_equal(student, teacher) else tree_map(self._store_leaf, teacher)
        self.entries.append(PairedInput(s, t))

    def _widen(self, e: PairedInput) -> PairedInput:
        def widen(t: Tensor) -> Tensor:
            before = self._narrowed.get(id(t))
            return t if before is None else t.to(before)

        s = tree_map(widen, e.student)
        return PairedInput(s, s if e.teacher is e.student else tree_map(widen, e.teacher))

    def items(self) -> Iterator[PairedInput]:
        """The entries in the models' dtype (fp16 storage is widened back)."""
        for e in self.entries:
            yield self._widen(e)

    def advance(self, stage: Stage, student: nn.Module, teacher: nn.Module) -> None:
        """Replace every entry by ``stage``'s outputs, one batch at a time (an entry is dropped as soon as its
        successor is stored, so the cache never holds two stages' worth)."""
        old, self.entries = self.entries, []
        for e in old:
            x = self._widen(e)
            self._drop_entry(e)
            self.append(*_run_stage(stage, student, teacher, x.student, x.teacher))

    def nbytes(self) -> Tuple[int, int]:
        """(bytes in memory, bytes spilled to disk)."""
        return self.ledger.usage(t for e in self.entries for t in tree_leaves([e.student, e.teacher]))

    def _drop_entry(self, e: PairedInput) -> None:
        self._drop(e.student)
        if e.teacher is not e.student:
            self._drop(e.teacher)

    def clear(self) -> None:
        for e in self.entries:
            self._drop_entry(e)
        self.entries = []


def _run_stage(stage: Stage, student: nn.Module, teacher: nn.Module, xs: Any, xt: Any) -> Tuple[Any, Any]:
    """Both models' outputs of ``stage`` (the student's paired with the teacher's by ``stage.pair``)."""
    ys, yt = stage.run(student, xs), stage.run(teacher, xt)
    return (ys if stage.pair is None else stage.pair(ys, yt)), yt


class StreamingSource(CaptureSource):
    """Frontier-cache source: captures run only the stage that holds the layer (see the module docstring).

    When a cache outgrows the budget and cannot spill (:class:`OverBudget`), the source logs why and serves the
    rest of the run by recomputation.
    """

    def __init__(self, task: Task, student: nn.Module, teacher: nn.Module, stages: Sequence[Stage],
                 plain: PassSpec, views: PassSpec, *, dtype: torch.dtype, budget: int,
                 spill_dir: Optional[str]) -> None:
        self.task, self.student, self.teacher, self.stages = task, student, teacher, list(stages)
        self._views_spec, self.dtype = views, dtype
        self._recompute = RecomputeSource(task, teacher, plain, views)
        self._fallback = False
        self.ledger = _Ledger(budget, spill_dir)
        self.index = 0  # the stage whose inputs the caches hold
        self.view_cache: Optional[FrontierCache] = None
        self.plain_cache = self._fill("plain", plain, upto=0)

    # -- filling and advancing ---------------------------------------------------------------------
    def _fill(self, name: str, spec: PassSpec, *, upto: int) -> FrontierCache:
        """A cache of ``spec``'s images run through stages ``[0, upto)`` of both models."""
        cache = FrontierCache(name, dtype=self.dtype, ledger=self.ledger)
        with eval_mode(self.student, self.teacher), torch.no_grad():
            for batch in spec.batches(self.task):
                xs = xt = self.task.model_input(batch)
                for stage in self.stages[:upto]:
                    xs, xt = _run_stage(stage, self.student, self.teacher, xs, xt)
                cache.append(xs, xt)
        return cache

    def _caches(self) -> List[FrontierCache]:
        return [c for c in (self.plain_cache, self.view_cache) if c is not None]

    def _advance(self) -> None:
        stage, t0 = self.stages[self.index], time.perf_counter()
        with eval_mode(self.student, self.teacher), torch.no_grad():
            for cache in self._caches():
                cache.advance(stage, self.student, self.teacher)
        self.index += 1
        logger.info("stage %s done; cache advanced to %s in %.1fs: %s", stage.name, self.stages[self.index].name
                    if self.index < len(self.stages) else "the end", time.perf_counter() - t0, self.describe())

    def describe(self) -> str:
        """Memory / disk use of the caches, for the log."""
        parts = []
        for cache in self._caches():
            mem, disk = cache.nbytes()
            parts.append(f"{cache.name} {len(cache.entries)} batches, {mem / 2**20:.0f} MiB in memory"
                         + (f" + {disk / 2**20:.0f} MiB on disk" if disk else ""))
        return "; ".join(parts) + f" ({str(self.dtype).replace('torch.', '')})"

    def _fall_back(self, error: OverBudget) -> None:
        logger.warning("frontier cache dropped at stage %s (%s): recompute path from here on",
                       self.stages[min(self.index, len(self.stages) - 1)].name, error)
        self.close()
        self._fallback = True

    # -- CaptureSource -----------------------------------------------------------------------------
    def begin_layer(self, name: str) -> None:
        if self._fallback:
            return
        target = stage_of_layer(self.stages, name)
        if target < self.index:
            raise RuntimeError(f"layer {name!r} runs in stage {self.stages[target].name!r}, which the frontier "
                               f"cache has already passed (layers must come in execution order)")
        try:
            while self.index < target:
                self._advance()
        except OverBudget as e:
            self._fall_back(e)

    def _forward(self, model: nn.Module, batch: PairedInput) -> Any:
        return self.stages[self.index].run(model, batch.teacher if model is self.teacher else batch.student)

    def plain(self) -> Tuple[Iterable[Any], Forward]:
        if self._fallback:
            return self._recompute.plain()
        return self.plain_cache.items(), self._forward

    def views(self) -> Tuple[Iterable[Any], Forward]:
        if not self._fallback and self.view_cache is None:
            t0 = time.perf_counter()
            try:
                self.view_cache = self._fill("views", self._views_spec, upto=self.index)
            except OverBudget as e:
                self._fall_back(e)
            else:
                logger.info("augmented views cached at stage %s in %.1fs: %s", self.stages[self.index].name,
                            time.perf_counter() - t0, self.describe())
        if self._fallback:
            return self._recompute.views()
        return self.view_cache.items(), self._forward

    def close(self) -> None:
        for cache in self._caches():
            cache.clear()
        self.view_cache = None
        self.plain_cache = None
        if self.ledger.spill_dir is not None:
            shutil.rmtree(self.ledger.spill_dir, ignore_errors=True)


def _check_stages(stages: Sequence[Stage], plan_names: Sequence[str]) -> Optional[str]:
    """Why ``stages`` cannot serve this plan (None: they can): every layer in one stage, stages in plan order."""
    last = -1
    for name in plan_names:
        try:
            index = stage_of_layer(stages, name)
        except ValueError as e:
            return str(e)
        if index < last:
            return f"layer {name!r} runs in stage {stages[index].name!r}, before the previous layer's stage"
        last = index
    return None


def _stages_reproduce(stages: Sequence[Stage], task: Task, model: nn.Module, batch: Any) -> Optional[str]:
    """Why the stages composed do not give the model's own output on ``batch`` (None: they do)."""
    with eval_mode(model), torch.no_grad():
        y = task.forward(model, batch)
        x = task.model_input(batch)
        for stage in stages:
            x = stage.run(model, x)
    xs, ys = tree_leaves(x), tree_leaves(y)
    if len(xs) != len(ys) or any(a.shape != b.shape for a, b in zip(xs, ys)):
        return (f"the stages give {len(xs)} tensors {[tuple(a.shape) for a in xs][:4]}, the model's forward "
                f"{len(ys)} {[tuple(b.shape) for b in ys][:4]}")
    err = max((float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))
               for a, b in zip(xs, ys) if b.numel()), default=0.0)
    return None if err <= 1e-4 else f"the stages' output differs from the model's forward by {err:.2e} (relative)"


def build_capture_source(cfg, task: Task, student: nn.Module, teacher: nn.Module, plan_names: Sequence[str], *,
                         plain: PassSpec, views: PassSpec, spill_dir: Optional[str]) -> CaptureSource:
    """The source ``cfg.QUANT.ENGINE`` asks for; the recompute path (one log line saying why) when the
    architecture declares no stages, they do not fit the plan, or the task cannot feed a stage."""
    scfg = cfg.QUANT.STREAM
    if cfg.QUANT.ENGINE == "recompute":
        logger.info("capture engine: recompute (reference): every capture runs the network from its input")
        return RecomputeSource(task, teacher, plain, views)
    stages = task.stages(teacher)
    why = None
    if stages is None:
        why = (f"MODEL.ARCH {cfg.MODEL.ARCH!r} declares no stages (its builder has no 'stages' attribute) and "
               f"task {type(task).__name__} defines none")
    elif type(task).model_input is Task.model_input:
        why = f"task {type(task).__name__} does not say what the first stage's input is (Task.model_input)"
    else:
        why = _check_stages(stages, plan_names)
        if why is None:
            first = next(iter(plain.batches(task)), None)
            if first is not None:
                why = _stages_reproduce(stages, task, teacher, first)
    if why is not None:
        logger.info("capture engine: recompute path, because %s", why)
        return RecomputeSource(task, teacher, plain, views)
    budget = cache_budget_bytes(scfg.BUDGET_MB)
    dtype = CACHE_DTYPES[scfg.DTYPE]
    if scfg.SPILL:  # a folder of this run's own: removed when the source closes
        spill_dir = tempfile.mkdtemp(prefix="frontier_", dir=spill_dir or None)
    try:
        source = StreamingSource(task, student, teacher, stages, plain, views, dtype=dtype, budget=budget,
                                 spill_dir=spill_dir if scfg.SPILL else None)
    except OverBudget as e:
        logger.info("capture engine: recompute path, because %s", e)
        return RecomputeSource(task, teacher, plain, views)
    logger.info("capture engine: streaming over %d stages, cache budget %.0f MiB (%s); %s", len(stages),
                budget / 2 ** 20, scfg.DTYPE, source.describe())
    return source
