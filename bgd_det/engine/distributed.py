"""What makes the :class:`~bgd_det.engine.quantizer.Quantizer` distributed, in one place: :class:`Collectives`.

Every rank runs the same pipeline on its shard of the calibration stream (``Task.calib_batches`` and the test
loader shard by rank). The engine talks to the process group only through a :class:`Collectives` object; in one
process every method is an identity, so the engine has no ``if distributed`` branches. Over several processes
(:class:`ProcessGroupCollectives`):

- ``sum``: the float64 Gram / second-moment sums and their row counts are summed over ranks, so every rank's EM
  sees the statistics of the union of the shards, i.e. of the one-process data (up to float64 summation order);
- ``broadcast_result``: rank 0's codes and codebook overwrite the other ranks' after EM, so ranks can never diverge
  (not even by a near-tie resolved differently on different hardware);
- ``wrap``: :class:`~torch.nn.parallel.DistributedDataParallel` around the student for layer-wise and global
  finetuning: gradients of the trainable parameters (codebooks, BatchNorm affine) are averaged, which equals the
  one-process gradient of the concatenated batch since every rank's loss is a mean over an equal share of it.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..quantization.capture import metric_uses_inputs
from ..quantization.plan import QuantRules
from ..quantization.pq import PQResult
from ..utils import comm

logger = logging.getLogger(__name__)

__all__ = ["Collectives", "ProcessGroupCollectives", "build_collectives", "check_distributed_config",
           "reduce_gram", "broadcast_pq_result", "ddp_wrap", "sync_module_states"]


def reduce_gram(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (Gram Tensor[d, d] float64, or the row count as a float64 scalar)."""
    return comm.all_reduce_sum(t)


def broadcast_pq_result(result: PQResult, src: int = 0) -> PQResult:
    """Rank ``src``'s codes (Tensor[C_out, n_blocks]), codebook (Tensor[K, d]) and objective on every rank.

    Every rank must hold a result of the same shapes and dtypes (same plan), which the pipeline guarantees.
    """
    codes = comm.broadcast_tensor(result.codes.contiguous(), src)
    codebook = comm.broadcast_tensor(result.codebook.contiguous(), src)
    objective = comm.broadcast_tensor(torch.tensor([result.objective], dtype=torch.float64), src)
    return PQResult(codes=codes, codebook=codebook, objective=float(objective))


def ddp_wrap(student: nn.Module) -> nn.Module:
    """``DistributedDataParallel`` over the student's parameters that require grad.

    - The student is in eval mode and its buffers (BatchNorm statistics, codes) are equal on all ranks and never
      change during finetuning: no buffer broadcast before every forward. Rank 0's parameters and buffers are
      copied to all ranks once per wrap (:func:`sync_module_states`), so every finetuning phase starts from
      identical states.
    - ``static_graph=True``: the set of parameters that take part in the loss is the same every step. It also
      covers a trainable codebook that a task's distillation loss never reaches (e.g. a head the loss does not
      use), which ``find_unused_parameters=False`` would turn into an error at the second step, without the
      per-step graph traversal of ``find_unused_parameters=True``.
    - A CPU student reduces over a gloo group even when the default group is nccl.
    """
    param = next((p for p in student.parameters() if p.requires_grad), None)
    if param is None:
        return student
    sync_module_states(student)
    on_gpu = param.device.type == "cuda"
    return DistributedDataParallel(student, device_ids=[param.device.index] if on_gpu else None,
                                   process_group=None if on_gpu else comm.get_cpu_group(), init_sync=False,
                                   forward_sync_buffers=False, static_graph=True)


def sync_module_states(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank, in place.

    Replaces DDP's own start-up broadcast, which gloo refuses for int16 codes (codebooks with K > 256).
    """
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            comm.broadcast_tensor(t.data, src)


def _refines_any_layer(qcfg) -> bool:
    """Whether QUANT.REFINE.ROUNDS or a per-layer override of it may turn the refinement on for some layer.

    Malformed override values count as "may" here; the plan rejects them with its own one-line error.
    """
    rounds = QuantRules.from_cfg(qcfg).override_values("REFINE.ROUNDS")
    return qcfg.REFINE.ROUNDS > 0 or any(not isinstance(r, (int, float)) or r > 0 for r in rounds)


def check_distributed_config(cfg) -> None:
    """Reject settings under which ranks would run different numbers of collectives (and hang until the timeout).

    - ``FINETUNE.BATCH_SIZE`` must be a multiple of the world size: each rank takes ``BATCH_SIZE // world`` images
      per step from its shard; otherwise ranks get different step counts.
    - ``QUANT.CAPTURE_IMAGES`` must be at least the world size: a rank without images would skip the Gram
      (or, with QUANT.REFINE.ROUNDS > 0 globally or in any override, the second-moment) reduction.
    """
    world = comm.get_world_size()
    if world == 1:
        return
    finetunes = cfg.FINETUNE.LAYER_ITERS > 0 or cfg.FINETUNE.GLOBAL_ITERS > 0
    if finetunes and cfg.FINETUNE.BATCH_SIZE % world:
        raise ValueError(f"FINETUNE.BATCH_SIZE={cfg.FINETUNE.BATCH_SIZE} is not a multiple of the {world} "
                         f"processes; allowed: multiples of {world}")
    captures = metric_uses_inputs(cfg.QUANT.METRIC) or _refines_any_layer(cfg.QUANT)
    if captures and cfg.QUANT.CAPTURE_IMAGES < world:
        raise ValueError(f"QUANT.CAPTURE_IMAGES={cfg.QUANT.CAPTURE_IMAGES} is smaller than the {world} "
                         f"processes; every process needs at least one image")
    if cfg.QUANT.CAPTURE_IMAGES % world:
        logger.warning("QUANT.CAPTURE_IMAGES=%d is not a multiple of the %d processes: BatchNorm correction pools "
                       "the processes' statistics as equal shares, which they are then not quite",
                       cfg.QUANT.CAPTURE_IMAGES, world)
    if cfg.QUANT.CAPTURE_BATCH_SIZE % world:
        logger.warning("QUANT.CAPTURE_BATCH_SIZE=%d is not a multiple of the %d processes: per-process batches of "
                       "%d images", cfg.QUANT.CAPTURE_BATCH_SIZE, world, max(1, cfg.QUANT.CAPTURE_BATCH_SIZE // world))


class Collectives:
    """The engine's view of its process group. This base class is one process: every method is an identity."""

    world_size = 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the ranks (float64 statistics and counts)."""
        return t

    def broadcast_result(self, result: PQResult) -> PQResult:
        """Rank 0's EM result on every rank."""
        return result

    def wrap(self, student: nn.Module) -> nn.Module:
        """The module that finetuning runs (gradients averaged over the ranks)."""
        return student


class ProcessGroupCollectives(Collectives):
    """Collectives over the initialised default process group (gloo or nccl)."""

    def __init__(self) -> None:
        self.world_size = comm.get_world_size()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return reduce_gram(t)

    def broadcast_result(self, result: PQResult) -> PQResult:
        return broadcast_pq_result(result)

    def wrap(self, student: nn.Module) -> nn.Module:
        return ddp_wrap(student)


def build_collectives(cfg=None) -> Collectives:
    """:class:`Collectives` for the current process group (:class:`ProcessGroupCollectives` when the world size is
    > 1, after checking ``cfg`` with :func:`check_distributed_config` when given)."""
    if comm.get_world_size() == 1:
        return Collectives()
    if cfg is not None:
        check_distributed_config(cfg)
    logger.info("distributed quantization over %d processes (rank %d)", comm.get_world_size(), comm.get_rank())
    return ProcessGroupCollectives()
