"""Quantization plan: which layers to quantize, in execution order, with which block size and K.

Every per-layer rule (type default block size, K, the clamp of K, skips, glob overrides) is decided here and
nowhere else. Execution order comes from running the model with hooks, never from ``state_dict()`` order.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Union

import torch
from torch import nn

from ..config.checks import HALVE_BLOCKS_RULES, INDIVISIBLE_RULES, K_CLAMP_RULES, check_max_unquantized
from ..utils.hooks import removed_on_exit
from .calls import linear_weight_calls
from .layers import PQ_LAYER_TYPES, QUANTIZABLE_TYPES
from .pq import divisors
from .residual import skip_path_first
from .size import pq_bytes

logger = logging.getLogger(__name__)

__all__ = ["LayerPlan", "QuantRules", "execution_order", "build_plan", "clamp_power", "OVERRIDE_KEYS",
           "K_CLAMP_RULES", "PlanError", "INDIVISIBLE_RULES", "Unquantized", "unquantized_weights", "check_unquantized"]

#: override keys that replace a QUANT.REFINE value for the matching layers (LayerPlan.damping, .damping_per_column,
#: .rounds), in LayerPlan's field order.
REFINE_OVERRIDE_KEYS = ("REFINE.DAMPING", "REFINE.DAMPING_PER_COLUMN", "REFINE.ROUNDS")
#: keys a ``[pattern, KEY, value]`` override may set.
OVERRIDE_KEYS = ("BLOCK_SIZE", "N_CENTROIDS", "SKIP") + REFINE_OVERRIDE_KEYS


@dataclass(frozen=True)
class LayerPlan:
    """One layer to quantize.

    Attributes:
        name: module name in the model; block_size: sub-vector size d; n_centroids: K (after clamping);
        n_subvectors: C_out * n_blocks; damping, damping_per_column, rounds: this layer's refinement ridge and rounds
        (QUANT.REFINE.DAMPING / DAMPING_PER_COLUMN / ROUNDS, or an override's value: resolved here, read nowhere else);
        halved: d is half the rules' value (QUANT.HALVE_BLOCKS).
    """

    name: str
    block_size: int
    n_centroids: int
    n_subvectors: int
    damping: float = 0.0
    damping_per_column: float = 0.0
    rounds: int = 0
    halved: bool = False

    def refine_damping(self, dim: int, n_rows: int) -> float:
        """Ridge of the refinement: ``damping + damping_per_column * dim / n_rows`` (dim input columns, n_rows
        captured rows)."""
        return self.damping + self.damping_per_column * dim / n_rows


def _is_override_entry(entry: Any) -> bool:
    """Whether a QUANT.OVERRIDES entry has the form ``[pattern, KEY, value]`` (its contents unchecked)."""
    return isinstance(entry, (list, tuple)) and len(entry) == 3


@dataclass
class QuantRules:
    """Per-type defaults and per-module overrides (from ``cfg.QUANT``).

    Attributes:
        block_size_kxk: d for convs with kernel > 1x1; block_size_1x1: d for 1x1 convs;
        block_size_linear: d for Linear; block_size_transpose: d for ConvTranspose2d; block_size_conv1d: d for Conv1d;
        n_centroids: default K; min_subvectors_per_centroid, k_clamp: K is clamped to the largest power of two
            <= n_subvectors / this (k_clamp "le": the paper's "min(K, C_out*m/4)", rounded down to a power of two
            so codes take an integral number of bits), or < it ("lt": the paper's released code);
        skip: glob patterns of modules left in fp32; skip_first: the first module in execution order is left in
        fp32 too; skip_path_first: each block's skip path before its branch end (:func:`.residual.skip_path_first`);
        overrides: ``[pattern, KEY, value]`` triples; indivisible: one of :data:`INDIVISIBLE_RULES`; halve_blocks:
        one of :data:`HALVE_BLOCKS_RULES` (:func:`_halve_blocks`);
        refine_damping, refine_damping_per_column, refine_rounds: QUANT.REFINE's values (a REFINE.* override replaces
        them per layer).
    """

    block_size_kxk: int = 9
    block_size_1x1: int = 4
    block_size_linear: int = 4
    block_size_transpose: int = 4
    block_size_conv1d: int = 4
    n_centroids: int = 256
    min_subvectors_per_centroid: int = 4
    k_clamp: str = "le"
    skip_first: bool = False
    skip_path_first: bool = False
    skip: Sequence[str] = ()
    overrides: Sequence[Sequence[Any]] = ()
    indivisible: str = "error"
    halve_blocks: str = "off"
    refine_damping: float = 0.01
    refine_damping_per_column: float = 0.0
    refine_rounds: int = 0

    @classmethod
    def from_cfg(cls, qcfg) -> "QuantRules":
        return cls(
            block_size_kxk=qcfg.BLOCK_SIZE.CONV_KXK,
            block_size_1x1=qcfg.BLOCK_SIZE.CONV_1X1,
            block_size_linear=qcfg.BLOCK_SIZE.LINEAR,
            block_size_transpose=qcfg.BLOCK_SIZE.CONV_TRANSPOSE,
            block_size_conv1d=qcfg.BLOCK_SIZE.CONV1D,
            n_centroids=qcfg.N_CENTROIDS,
            min_subvectors_per_centroid=qcfg.MIN_SUBVECTORS_PER_CENTROID,
            k_clamp=qcfg.K_CLAMP,
            skip_first=qcfg.SKIP_FIRST,
            skip_path_first=qcfg.REFINE.SKIP_PATH_FIRST,
            skip=list(qcfg.SKIP),
            overrides=[list(o) if isinstance(o, (list, tuple)) else o for o in qcfg.OVERRIDES],
            indivisible=qcfg.INDIVISIBLE,
            halve_blocks=qcfg.HALVE_BLOCKS,
            refine_damping=qcfg.REFINE.DAMPING,
            refine_damping_per_column=qcfg.REFINE.DAMPING_PER_COLUMN,
            refine_rounds=qcfg.REFINE.ROUNDS,
        )

    def override_values(self, key: str) -> List[Any]:
        """The values the ``overrides`` entries give ``key``, in order (whatever layers they match).

        Malformed entries are left out here; :func:`build_plan` rejects them with its own error.
        """
        return [o[2] for o in self.overrides if _is_override_entry(o) and o[1] == key]

    def clamp_k(self, k: int, n_subvectors: int) -> int:
        """K of a layer of ``n_subvectors``: ``k`` clamped by :func:`clamp_power` (below 2: no codebook fits)."""
        return min(k, clamp_power(n_subvectors, self.min_subvectors_per_centroid, self.k_clamp))

    def default_block_size(self, module: nn.Module) -> int:
        if isinstance(module, nn.ConvTranspose2d):
            return self.block_size_transpose
        if isinstance(module, nn.Conv1d):
            return self.block_size_conv1d
        if isinstance(module, nn.Conv2d):
            return self.block_size_1x1 if tuple(module.kernel_size) == (1, 1) else self.block_size_kxk
        return self.block_size_linear


def execution_order(model: nn.Module, run: Callable[[nn.Module], Any],
                    types: Iterable[type] = tuple(QUANTIZABLE_TYPES) + PQ_LAYER_TYPES) -> List[str]:
    """Names of the modules of ``types`` in the order their forward first runs, or, for a Linear used through
    ``.weight``, the first ``F.linear`` call on its weight (:mod:`bgd_det.quantization.calls`).

    Args:
        model: the model; run: calls the model on an example input (e.g. ``lambda m: m(x)``).
    """
    order: List[str] = []
    modules = {name: m for name, m in model.named_modules() if isinstance(m, tuple(types))}

    def seen(name: str, *_args) -> None:
        if name not in order:
            order.append(name)

    with removed_on_exit() as handles:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(lambda _m, _i, name=name: seen(name)))
        with torch.no_grad(), linear_weight_calls(modules, seen):
            run(model)
    return order


def _pattern_errors(patterns: Iterable[str], names: Sequence[str], what: str) -> List[str]:
    errors = []
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            near = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            errors.append(f"{what} pattern {pattern!r} matches no quantizable module; near matches: {near or 'none'}")
    return errors


class PlanError(ValueError):
    """Every rule error of a plan at once (one line each; a single error is its own one-line message)."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        text = self.errors[0] if len(self.errors) == 1 else (
            f"{len(self.errors)} errors in the quantization plan:\n" + "\n".join(f"  - {e}" for e in self.errors))
        super().__init__(text)


def build_plan(model: nn.Module, order: Sequence[str], rules: QuantRules) -> List[LayerPlan]:
    """Apply the rules to the modules in ``order``.

    Returns:
        The layers to quantize, in execution order (skipped modules left out; with ``rules.skip_path_first``,
        each block's skip path before its branch end), block sizes halved by ``rules.halve_blocks``.

    Raises:
        PlanError: every rule error at once (patterns that match nothing, block sizes that do not divide a layer's
            row length, bad K or refinement values).
    """
    modules = dict(model.named_modules())
    if rules.skip_path_first:
        order = skip_path_first(model, order)
    errors = _pattern_errors(rules.skip, order, "QUANT.SKIP")
    overrides = []
    for entry in rules.overrides:
        if not _is_override_entry(entry):
            errors.append(f"QUANT.OVERRIDES entry {entry!r} must be [pattern, KEY, value]")
        elif entry[1] not in OVERRIDE_KEYS:
            errors.append(f"QUANT.OVERRIDES key {entry[1]!r} unknown; allowed: {list(OVERRIDE_KEYS)}")
        else:
            overrides.append(entry)
    errors += _pattern_errors([o[0] for o in overrides], order, "QUANT.OVERRIDES")
    if rules.indivisible not in INDIVISIBLE_RULES:
        errors.append(f"QUANT.INDIVISIBLE={rules.indivisible!r}; allowed: {', '.join(INDIVISIBLE_RULES)}")
    if rules.halve_blocks not in HALVE_BLOCKS_RULES:
        errors.append(f"QUANT.HALVE_BLOCKS={rules.halve_blocks!r}; allowed: {', '.join(HALVE_BLOCKS_RULES)}")

    plan: List[LayerPlan] = []
    requested_k: Dict[str, int] = {}  # K before the clamp
    fixed_d: Set[str] = set()  # d set by a BLOCK_SIZE override: never halved
    for name in order:
        module = modules[name]
        setting: Dict[str, Any] = {
            "BLOCK_SIZE": rules.default_block_size(module),
            "N_CENTROIDS": rules.n_centroids,
            "SKIP": (rules.skip_first and name == order[0]) or any(fnmatch.fnmatchcase(name, p) for p in rules.skip),
            **dict(zip(REFINE_OVERRIDE_KEYS, (rules.refine_damping, rules.refine_damping_per_column,
                                              rules.refine_rounds))),
        }
        for pattern, key, value in overrides:  # later overrides win
            if fnmatch.fnmatchcase(name, pattern):
                setting[key] = value
                if key == "BLOCK_SIZE":
                    fixed_d.add(name)
        if setting["SKIP"]:
            continue
        d, k = int(setting["BLOCK_SIZE"]), int(setting["N_CENTROIDS"])
        shape = _weight_shape(module)
        cols = math.prod(shape[1:])
        if d >= 1 and cols % d != 0 and rules.indivisible != "error":
            d = max([q for q in divisors(cols, d) if q >= 2] or [0]) if rules.indivisible == "divisor" else 0
            logger.info("%s: block size %s does not divide the row length %d: %s (QUANT.INDIVISIBLE %s)", name,
                        setting["BLOCK_SIZE"], cols, f"d={d}" if d else "left in fp32", rules.indivisible)
            if not d:
                continue
        if d < 1 or cols % d != 0:
            errors.append(f"block size {d} for {name!r} does not divide its row length {cols} (weight "
                          f"{tuple(shape)}); allowed: a divisor of {cols} ({', '.join(map(str, divisors(cols, 32)))}"
                          f"{', ...' if cols > 32 else ''}), set with QUANT.OVERRIDES [[{name!r}, 'BLOCK_SIZE', d]]"
                          f" or skip it in QUANT.SKIP")
            continue
        if k < 2 or k & (k - 1):
            errors.append(f"N_CENTROIDS={k} for {name!r} must be a power of two >= 2")
            continue
        n_sub = shape[0] * cols // d
        clamped = rules.clamp_k(k, n_sub)
        if clamped < 2:
            errors.append(f"{name!r} has only {n_sub} sub-vectors of size {d}; skip it in QUANT.SKIP")
            continue
        if clamped != k:
            logger.info("%s: K clamped from %d to %d (%d sub-vectors)", name, k, clamped, n_sub)
        try:
            refine = [_refine_value(name, setting, key) for key in REFINE_OVERRIDE_KEYS]
        except ValueError as e:
            errors.append(str(e))
            continue
        plan.append(LayerPlan(name, d, clamped, n_sub, *refine))
        requested_k[name] = k
    if errors:
        raise PlanError(errors)
    if rules.halve_blocks == "off":
        return plan
    return _halve_blocks(plan, rules, requested_k, fixed_d)


def _halved(layer: LayerPlan, n_centroids: int, rules: QuantRules) -> Optional[LayerPlan]:
    """``layer`` at d/2, K = ``n_centroids`` clamped at its doubled sub-vector count; None for an odd d."""
    if layer.block_size % 2:
        return None
    n_sub = 2 * layer.n_subvectors
    return dataclasses.replace(layer, block_size=layer.block_size // 2, n_centroids=rules.clamp_k(n_centroids, n_sub),
                               n_subvectors=n_sub, halved=True)


def _bytes(layer: LayerPlan) -> float:
    return pq_bytes(layer.n_subvectors, layer.n_centroids, layer.block_size)


def _halve_blocks(plan: Sequence[LayerPlan], rules: QuantRules, requested_k: Dict[str, int],
                  fixed_d: Set[str]) -> List[LayerPlan]:
    """QUANT.HALVE_BLOCKS: halve d in every layer whose bytes do not grow at d/2 ("free"); with "within_size",
    then spend the bytes that saved halving more layers in execution order (each one that still fits), so the
    model is never larger than ``plan``. Odd d and the layers in ``fixed_d`` (a BLOCK_SIZE override) are kept.

    Args:
        plan: the rules' plan, in execution order; requested_k: each layer's K before the clamp.
    """
    options = {}
    for layer in plan:
        half = None if layer.name in fixed_d else _halved(layer, requested_k[layer.name], rules)
        if half is not None:
            options[layer.name] = (half, _bytes(half) - _bytes(layer))
    chosen = [name for name, (_, delta) in options.items() if delta <= 0]
    budget = -sum(options[name][1] for name in chosen)
    if rules.halve_blocks == "within_size":
        for name, (_, delta) in options.items():
            if name not in chosen and delta <= budget:
                chosen.append(name)
                budget -= delta
    change = sum(options[name][1] for name in chosen)
    logger.info("QUANT.HALVE_BLOCKS %s: d halved in %d of %d layers (%s), %+.0f bytes", rules.halve_blocks,
                len(chosen), len(plan), ", ".join(chosen) or "none", change)
    return [options[layer.name][0] if layer.name in chosen else layer for layer in plan]


@dataclass(frozen=True)
class Unquantized:
    """A weight (a parameter of >= 2 dims) that stays fp32, and why: "skipped by rule", "not called as a module
    (used through .weight)", or "unsupported type <T>". Biases and normalisation parameters (1-D) are fp32 by
    design and not listed."""

    name: str
    numel: int
    reason: str


def unquantized_weights(model: nn.Module, order: Sequence[str], plan: Sequence[LayerPlan]) -> List[Unquantized]:
    """Every weight of the dense ``model`` that ``plan`` leaves in fp32, largest first (``order``: the modules the
    example forward called, :func:`execution_order`)."""
    planned, called = {layer.name for layer in plan}, set(order)
    out = []
    for mname, module in model.named_modules():
        if mname in planned or isinstance(module, PQ_LAYER_TYPES):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() < 2:
                continue
            if isinstance(module, tuple(QUANTIZABLE_TYPES)) and pname == "weight":
                reason = "skipped by rule" if mname in called else "not called as a module (used through .weight)"
            else:
                reason = f"unsupported type {type(module).__name__}"
            out.append(Unquantized(f"{mname}.{pname}" if mname else pname, p.numel(), reason))
    return sorted(out, key=lambda u: -u.numel)


def check_unquantized(unquantized: Sequence[Unquantized], total_params: int, max_fraction: float) -> None:
    """Raise when the fp32 weights are more than ``max_fraction`` of the model's parameters (QUANT.MAX_UNQUANTIZED;
    1.0 = never)."""
    check_max_unquantized(max_fraction)
    share = sum(u.numel for u in unquantized) / max(1, total_params)
    if share > max_fraction:
        top = ", ".join(f"{u.name} ({u.numel}, {u.reason})" for u in unquantized[:5])
        raise ValueError(f"{100 * share:.1f}% of the model's parameters are weights left in fp32, above "
                         f"QUANT.MAX_UNQUANTIZED {max_fraction}: {top}{', ...' if len(unquantized) > 5 else ''}")


def clamp_power(n_sub: int, per_centroid: int, rule: str = "le") -> int:
    """The largest power of two K with ``K <= n_sub / per_centroid`` (rule "le": the paper's text and PQF) or
    ``K < n_sub / per_centroid`` ("lt": the paper's released code); e.g. 512 sub-vectors, 4 per centroid: 128 / 64."""
    if rule not in K_CLAMP_RULES:
        raise ValueError(f"QUANT.K_CLAMP={rule!r}; allowed: {', '.join(K_CLAMP_RULES)}")
    per_centroid = max(1, per_centroid)
    cap = n_sub // per_centroid
    if cap < 1:
        return 0
    power = 1 << (cap.bit_length() - 1)  # largest power of two <= cap, hence <= n_sub / per_centroid
    if rule == "lt" and power * per_centroid >= n_sub:
        power //= 2
    return power


def _refine_value(name: str, setting: Dict[str, Any], key: str) -> Union[int, float]:
    """Layer ``name``'s REFINE.* value (QUANT.REFINE's or an override's), checked: an integer >= 0 for ROUNDS, a
    number >= 0 else."""
    value = setting[key]
    integral = key == "REFINE.ROUNDS"
    if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)) or value < 0:
        allowed = "an integer >= 0" if integral else "a number >= 0"
        raise ValueError(f"QUANT.{key}={value!r} for {name!r}; allowed: {allowed} (QUANT.REFINE or QUANT.OVERRIDES)")
    return int(value) if integral else float(value)


def _weight_shape(module: nn.Module) -> torch.Size:
    if isinstance(module, PQ_LAYER_TYPES):
        return torch.Size(module.weight_shape)
    return module.weight.shape
