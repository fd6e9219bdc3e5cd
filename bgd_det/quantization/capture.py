"""Activation capture: Gram matrices of a layer's input sub-vectors, accumulated by hooks.

For a layer with weight rows cut into sub-vectors of size d, every output position contributes, for every block
b, one input sub-vector ``x_b`` (Tensor[d]); the quantization error of sub-vector ``(o, b)`` on the output is
``x_b . (w - c)``. The shared metric is ``G = sum over positions and blocks of x_b x_b^T`` (Tensor[d, d]).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config.checks import METRICS, check_choice
from ..utils.modes import eval_mode
from .calls import linear_weight_calls

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "metric_uses_inputs", "input_rows", "has_input_metric", "GramAccumulator", "capture_gram_pool", "for_each_input",
           "for_each_output", "capture_gram", "StopForward", "group_rows", "SecondMoments", "capture_second_moments"]


class StopForward(Exception):
    """Raised by a capture hook to skip the rest of the forward once the layer's input is seen."""


#: QUANT.METRIC values: the E-step's distance under the input Gram ("shared"), under the Gram of mean-removed
#: inputs ("centered"), or plain k-means on the weights ("identity").
def metric_uses_inputs(metric: str) -> bool:
    """Whether QUANT.METRIC ``metric`` needs the layers' input Gram matrices; raises on an unknown value."""
    check_choice("QUANT.METRIC", metric, METRICS)
    return metric != "identity"


def has_input_metric(module: nn.Module) -> bool:
    """Whether the activation-aware metric applies. ConvTranspose2d is quantized with the identity metric:
    its weight rows are input channels, so a shared Gram over output taps is a multiple of the identity for
    non-overlapping kernels (the stride-2, 2x2 mask predictor)."""
    return isinstance(module, (nn.Conv2d, nn.Conv1d, nn.Linear))


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows the layer multiplies its flattened weight rows with.

    Args:
        module: Conv2d / Conv1d / Linear (dense or codebook layer).
        x: the layer's input (Conv2d: Tensor[B, C_in, H, W]; Conv1d: Tensor[B, C_in, L]; Linear: Tensor[..., in]).

    Returns:
        Tensor[N, cols] with ``cols = C_in/groups * kh * kw`` (Conv1d: ``C_in/groups * k``; Linear: ``in``); for
        grouped convs every group contributes its own rows.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = (0,) * len(kernel)
        elif isinstance(module.padding, str):  # "same" / "valid"
            padding = tuple(0 if module.padding == "valid" else (d * (k - 1)) // 2 for d, k in zip(dilation, kernel))
        else:
            padding = module.padding
        if isinstance(module, nn.Conv1d):  # a conv over a 1 x L image with a 1 x k kernel
            x = x.unsqueeze(2)
            kernel, stride, dilation, padding = (1, *kernel), (1, *stride), (1, *dilation), (0, *padding)
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        b, ck, length = cols.shape
        g = module.groups
        return cols.reshape(b, g, ck // g, length).permute(0, 1, 3, 2).reshape(-1, ck // g)
    raise TypeError(f"no input-row rule for {type(module).__name__}")


@dataclass
class GramAccumulator:
    """Streaming ``G = sum x_b x_b^T`` over sub-vectors of size ``block_size``; optionally keeps sampled rows.

    Attributes:
        gram (Tensor[d, d] float64), n_rows (sub-vectors seen), samples (Tensor[S, cols] or None).
    """

    block_size: int
    keep_rows: int = 0
    rows_per_call: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self.gram: Optional[Tensor] = None
        self.block_sums: Optional[Tensor] = None
        self.n_rows = 0
        self.n_positions = 0
        self.samples: list = []
        self._gen = torch.Generator().manual_seed(self.seed)

    def add(self, rows: Tensor) -> None:
        """Accumulate rows Tensor[N, cols] (cols divisible by block_size)."""
        if self.rows_per_call and rows.shape[0] > self.rows_per_call:
            pick = torch.randperm(rows.shape[0], generator=self._gen)[: self.rows_per_call].to(rows.device)
            rows = rows[pick]
        z = rows.reshape(-1, self.block_size).double()
        g = z.T @ z
        sums = rows.double().sum(0).reshape(-1, self.block_size)  # Tensor[n_blocks, d]
        self.gram = g if self.gram is None else self.gram + g
        self.block_sums = sums if self.block_sums is None else self.block_sums + sums
        self.n_rows += z.shape[0]
        self.n_positions += rows.shape[0]
        kept = sum(s.shape[0] for s in self.samples)
        if kept < self.keep_rows:
            self.samples.append(rows[: self.keep_rows - kept].detach().float().cpu())

    def result(self, *, centered: bool = False) -> Tensor:
        """Mean Gram Tensor[d, d] float32 (mean, so its scale does not depend on the number of images).

        Args:
            centered: subtract every block's own mean input first (``sum_b Cov(x_b)``): the error along the
                mean input only shifts each output channel's mean, which BatchNorm correction removes.
        """
        if self.gram is None:
            raise RuntimeError("no activations were captured (did the layer run during the forward?)")
        gram = self.gram
        if centered:
            gram = gram - self.block_sums.T @ self.block_sums / max(self.n_positions, 1)
        return (gram / max(self.n_rows, 1)).float()


def for_each_input(model: nn.Module, name: str, batches: Iterable[Any],
                   forward: Callable[[nn.Module, Any], Any], fn: Callable[[nn.Module, Tensor], None]) -> None:
    """Call ``fn(module, input)`` with the input of submodule ``name`` for every batch (eval mode, no grad).

    Each forward stops right after the module's input is seen: the rest of the network is not run. The hook is
    removed and the training mode restored whatever happens.
    """
    def hook(mod: nn.Module, args: tuple) -> None:
        fn(mod, args[0].detach())
        raise StopForward

    module = model.get_submodule(name)
    calls = linear_weight_calls({name: module}, lambda _n, x, _out: hook(module, (x,)))
    _run_stopped(model, module.register_forward_pre_hook(hook), batches, forward, calls)


def for_each_output(model: nn.Module, name: str, batches: Iterable[Any],
                    forward: Callable[[nn.Module, Any], Any], fn: Callable[[nn.Module, Tensor], None]) -> None:
    """Call ``fn(module, output)`` with the output of submodule ``name`` for every batch; as
    :func:`for_each_input`, each forward stops right after it."""
    def hook(mod: nn.Module, _args: tuple, out: Tensor) -> None:
        fn(mod, out.detach())
        raise StopForward

    module = model.get_submodule(name)
    calls = linear_weight_calls({name: module}, lambda _n, _x, out: hook(module, (), out))
    _run_stopped(model, module.register_forward_hook(hook), batches, forward, calls)


def _run_stopped(model: nn.Module, handle, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
                 calls: ContextManager = contextlib.nullcontext()) -> None:
    """``forward(model, batch)`` for every batch in eval mode without grad (inside ``calls``: the ``F.linear`` calls
    of a Linear used through ``.weight``), a :class:`StopForward` ending each; ``handle`` (the hook) is removed and
    the training mode restored whatever happens."""
    try:
        with eval_mode(model), torch.no_grad(), calls:
            for batch in batches:
                try:
                    forward(model, batch)
                except StopForward:
                    pass
    finally:
        handle.remove()


def capture_gram(model: nn.Module, name: str, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
                 *, block_size: int, rows_per_image: int = 0, keep_rows: int = 0, seed: int = 0,
                 reduce: Optional[Callable[[Tensor], Tensor]] = None) -> GramAccumulator:
    """Run ``forward(model, batch)`` over ``batches`` and accumulate the Gram matrix of layer ``name``'s input.

    The forward stops right after the layer's input is captured (the rest of the network is not run).

    Args:
        rows_per_image: random input positions kept per forward call and image (0 = all).
        keep_rows: raw input rows Tensor[S, cols] to keep for inspection/benchmarks.
        reduce: applied to the summed Gram before ``result()`` (e.g. a distributed all-reduce).
    """
    acc = GramAccumulator(block_size, keep_rows=keep_rows, seed=seed)

    def add(mod: nn.Module, x: Tensor) -> None:
        rows = input_rows(mod, x)
        n_images = x.shape[0] if x.dim() == 4 else 1
        acc.rows_per_call = rows_per_image * n_images if rows_per_image else 0
        acc.add(rows)

    for_each_input(model, name, batches, forward, add)
    if reduce is not None and acc.gram is not None:
        acc.gram = reduce(acc.gram)
        acc.block_sums = reduce(acc.block_sums)
        acc.n_rows = int(reduce(torch.tensor(float(acc.n_rows), dtype=torch.float64)))
        acc.n_positions = int(reduce(torch.tensor(float(acc.n_positions), dtype=torch.float64)))
    return acc


def capture_gram_pool(model: nn.Module, name: str, batches: Iterable[Any],
                      forward: Callable[[nn.Module, Any], Any], *, block_size: int, rows_per_image: int = 0,
                      seed: int = 0) -> Tuple[Tensor, Tensor]:
    """One Gram per input item of layer ``name`` (an image for a conv, a row for a Linear), for the E-step that
    resamples its metric every iteration (:func:`bgd_det.quantization.pq.em_quantize_resampled`).

    Args:
        rows_per_image: random input positions kept per item (0 = all).

    Returns:
        (Tensor[n_items, d, d] float64 sums ``x x^T`` over the item's sub-vectors, Tensor[n_items] their counts).
    """
    grams: List[Tensor] = []
    counts: List[int] = []
    gen = torch.Generator().manual_seed(seed)

    def add(mod: nn.Module, x: Tensor) -> None:
        items = x.shape[0] if x.dim() == 4 else 1
        rows = input_rows(mod, x)
        rows = rows.reshape(items, -1, rows.shape[1]) if x.dim() == 4 else rows.unsqueeze(1)
        for item in rows:  # Tensor[positions, cols]
            if rows_per_image and item.shape[0] > rows_per_image:
                item = item[torch.randperm(item.shape[0], generator=gen)[:rows_per_image].to(item.device)]
            z = item.reshape(-1, block_size).double()
            grams.append((z.T @ z).cpu())
            counts.append(z.shape[0])

    for_each_input(model, name, batches, forward, add)
    if not grams:
        raise RuntimeError("no activations were captured (did the layer run during the forward?)")
    return torch.stack(grams), torch.tensor(counts, dtype=torch.float64)


def group_rows(module: nn.Module, x: Tensor) -> Tensor:
    """:func:`input_rows` split by group: Tensor[groups, N, cols] (Linear: one group)."""
    rows = input_rows(module, x)
    g = module.groups if isinstance(module, (nn.Conv2d, nn.Conv1d)) else 1
    if g == 1:
        return rows.unsqueeze(0)
    n_images = x.shape[0]
    return rows.reshape(n_images, g, -1, rows.shape[1]).transpose(0, 1).reshape(g, -1, rows.shape[1])


@dataclass
class SecondMoments:
    """Second moments of a layer's input rows in the student (s) and the teacher (t), same positions.

    Captured with a projection ``W`` (the layer's dense weight, Tensor[g, m, D]), the teacher's side is kept only
    through ``W x_t`` (all the output-space objective needs: ``m * D`` per row instead of ``2 * D * D``), and
    ``st`` / ``tt`` / ``td`` are None; without one, the full matrices are kept.

    Attributes:
        ss (Tensor[g, D, D] float64): ``E[x_s x_s^T]`` per group, ``D = C_in/groups * kh * kw``.
        st, tt (Tensor[g, D, D] float64 or None): ``E[x_s x_t^T]``, ``E[x_t x_t^T]``.
        mean_s, mean_t (Tensor[g, D] float64): mean rows. n_rows: rows per group.
        sd, td (Tensor[g, D, m] float64 or None): ``E[x_s r^T]``, ``E[x_t r^T]`` with ``r = skip_t - skip_s``
            (Tensor[m], ``m = C_out / g``) at the layer's output positions, when a skip path was captured.
        dd (Tensor[g, m] float64 or None): ``E[r * r]``; mean_d (Tensor[g, m] or None): ``E[r]``.
        cross_w (Tensor[g, m, D] or None): ``E[(W x_t) x_s^T]`` (``W st^T``); energy_w (Tensor[g, m] or None):
            ``E[(W x_t)^2]`` per output channel; mean_w (Tensor[g, m] or None): ``E[W x_t]``; td_w (Tensor[g, m] or
            None): ``E[(W x_t) * r]`` per channel, with a skip path.
    """

    ss: Tensor
    st: Optional[Tensor]
    tt: Optional[Tensor]
    mean_s: Tensor
    mean_t: Tensor
    n_rows: int
    sd: Optional[Tensor] = None
    td: Optional[Tensor] = None
    dd: Optional[Tensor] = None
    mean_d: Optional[Tensor] = None
    cross_w: Optional[Tensor] = None
    energy_w: Optional[Tensor] = None
    mean_w: Optional[Tensor] = None
    td_w: Optional[Tensor] = None

    _FIELDS = ("ss", "st", "tt", "mean_s", "mean_t", "sd", "td", "dd", "mean_d", "cross_w", "energy_w", "mean_w",
               "td_w")

    @property
    def projected(self) -> bool:
        """Whether the teacher's side was kept through a projection ``W`` only."""
        return self.cross_w is not None

    def merged(self, other: "SecondMoments") -> "SecondMoments":
        """The moments of both captures' rows together (row-count weighted means of every statistic)."""
        if (self.sd is None) != (other.sd is None):
            raise ValueError("cannot merge second moments with and without a captured skip path")
        if self.projected != other.projected:
            raise ValueError("cannot merge second moments captured with and without a projection")
        n = self.n_rows + other.n_rows
        a, b = self.n_rows / n, other.n_rows / n
        mixed = {k: None if getattr(self, k) is None else a * getattr(self, k) + b * getattr(other, k)
                 for k in self._FIELDS}
        return SecondMoments(n_rows=n, **mixed)

    def centered(self) -> "SecondMoments":
        """The same with the mean rows removed (covariances): only the per-channel output mean is lost, which
        the BatchNorm statistics correction restores."""
        ms, mt = self.mean_s.unsqueeze(2), self.mean_t.unsqueeze(2)
        out = SecondMoments(self.ss - ms @ ms.transpose(1, 2), None, None, torch.zeros_like(self.mean_s),
                            torch.zeros_like(self.mean_t), self.n_rows)
        if self.projected:
            mw = self.mean_w
            out.cross_w = self.cross_w - mw.unsqueeze(2) * self.mean_s.unsqueeze(1)
            out.energy_w, out.mean_w = self.energy_w - mw ** 2, torch.zeros_like(mw)
        else:
            out.st, out.tt = self.st - ms @ mt.transpose(1, 2), self.tt - mt @ mt.transpose(1, 2)
        if self.sd is not None:
            md = self.mean_d.unsqueeze(1)  # Tensor[g, 1, m]
            out.sd = self.sd - ms @ md
            if self.projected:
                out.td_w = self.td_w - self.mean_w * self.mean_d
            else:
                out.td = self.td - mt @ md
            out.dd, out.mean_d = self.dd - self.mean_d ** 2, torch.zeros_like(self.mean_d)
        return out


def capture_second_moments(student: nn.Module, teacher: nn.Module, name: str, batches: Iterable[Any],
                           forward: Callable[[nn.Module, Any], Any], *, rows_per_image: int = 0, seed: int = 0,
                           reduce: Optional[Callable[[Tensor], Tensor]] = None,
                           skip: Optional[Tuple[str, Callable[[nn.Module, Tensor], Tensor]]] = None,
                           project: Optional[Tensor] = None) -> SecondMoments:
    """Second moments of layer ``name``'s input rows in ``student`` and ``teacher`` on the same batches.

    Both models see every batch; the same random positions (``rows_per_image`` per image, 0 = all) are kept
    from both, so ``st`` pairs the student's input with the teacher's input at the same place.

    Args:
        reduce: applied to every summed statistic (e.g. a distributed all-reduce).
        skip: ``(block name, skip_fn)`` (see :mod:`.residual`): also capture the moments of the difference of
            the skip tensors ``skip_fn(block, block input)`` (teacher minus student) at the layer's output
            positions (a Conv2d with groups=1 whose output has the skip tensor's shape).
        project (Tensor[C_out, ...] or None): the layer's dense weight ``W``: keep the teacher's side only as
            ``W x_t`` (see :class:`SecondMoments`), about ``2 D / m`` times fewer multiply-adds than ``st`` + ``tt``.
    """
    gen = torch.Generator().manual_seed(seed)
    sums: dict = {}
    seen: dict = {}

    def grab(key: str):
        def fn(mod: nn.Module, x: Tensor) -> None:  # a module called several times per forward (the RPN head
            seen.setdefault(key, []).append(group_rows(mod, x))  # once per FPN level) gives every call's rows
            seen["images"] = x.shape[0] if x.dim() == 4 else 1
        return fn

    def grab_skip(key: str, block: nn.Module, fn: Callable[[nn.Module, Tensor], Tensor]):
        def hook(_m: nn.Module, args: tuple) -> None:
            with torch.no_grad():
                out = fn(block, args[0])
            seen["skip_" + key] = out.flatten(2).transpose(1, 2).reshape(1, -1, out.shape[1])
        return hook

    for batch in batches:
        for key, model in (("t", teacher), ("s", student)):
            handle = None
            if skip is not None:
                block = model.get_submodule(skip[0])
                handle = block.register_forward_pre_hook(grab_skip(key, block, skip[1]))
            try:
                for_each_input(model, name, [batch], forward, grab(key))
            finally:
                if handle is not None:
                    handle.remove()
        if "s" not in seen or "t" not in seen:
            raise RuntimeError(f"layer {name!r} did not run during the forward")
        xs, xt = torch.cat(seen.pop("s"), 1), torch.cat(seen.pop("t"), 1)
        if xs.shape != xt.shape:
            raise RuntimeError(f"layer {name!r}: student input rows {tuple(xs.shape)} != teacher's {tuple(xt.shape)}")
        r = None
        if skip is not None:
            r = seen.pop("skip_t") - seen.pop("skip_s")
            if r.shape[:2] != xs.shape[:2]:
                raise RuntimeError(f"layer {name!r}: skip tensor of {skip[0]!r} gives {r.shape[1]} positions, "
                                   f"the layer {xs.shape[1]}")
        n_images = seen.pop("images")
        if rows_per_image and xs.shape[1] > rows_per_image * n_images:
            pick = torch.randperm(xs.shape[1], generator=gen)[: rows_per_image * n_images].to(xs.device)
            xs, xt = xs[:, pick], xt[:, pick]
            r = r[:, pick] if r is not None else None
        stats = {"ss": xs.transpose(1, 2) @ xs, "sum_s": xs.sum(1), "sum_t": xt.sum(1)}
        if project is None:
            stats.update(st=xs.transpose(1, 2) @ xt, tt=xt.transpose(1, 2) @ xt)
        else:
            yt = xt @ project.reshape(xs.shape[0], -1, xs.shape[2]).to(xt).transpose(1, 2)  # Tensor[g, N, m]
            stats.update(cross_w=yt.transpose(1, 2) @ xs, energy_w=(yt * yt).sum(1), sum_w=yt.sum(1))
        if r is not None:
            stats.update(sd=xs.transpose(1, 2) @ r, dd=(r * r).sum(1), sum_d=r.sum(1))
            if project is None:
                stats["td"] = xt.transpose(1, 2) @ r
            else:
                stats["td_w"] = (yt * r).sum(1)
        for key, value in stats.items():
            value = value.double()
            sums[key] = value if key not in sums else sums[key] + value
        sums["n"] = sums.get("n", 0.0) + float(xs.shape[1])
    if not sums:
        raise RuntimeError("no activations were captured (empty calibration batches?)")
    n = torch.tensor(sums["n"], dtype=torch.float64)
    if reduce is not None:
        sums = {k: reduce(v) for k, v in sums.items() if k != "n"}
        n = reduce(n)
    n_rows = max(int(n), 1)
    means = {{"sum_s": "mean_s", "sum_t": "mean_t", "sum_w": "mean_w", "sum_d": "mean_d"}.get(k, k): v / n_rows
             for k, v in sums.items() if k != "n"}
    return SecondMoments(n_rows=n_rows, **{k: means.get(k) for k in SecondMoments._FIELDS})
