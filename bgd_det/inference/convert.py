"""A compressed model in its inference form: :func:`to_inference` swaps every training-time codebook layer
(:mod:`bgd_det.quantization.layers`) for its inference layer (:mod:`bgd_det.inference.layers`), folding the
BatchNorms that directly follow codebook convs when asked; :func:`for_evaluation` applies the ``cfg.TEST`` policy.

``bgd_det.checkpoint.load_compressed(path, inference=True)`` builds the inference model straight from a compressed
checkpoint, the architecture on the ``meta`` device, so that its dense weights are never allocated.
"""
from __future__ import annotations

import logging

from torch import nn

from ..config.checks import check_eval_options
from ..ops import ops_available
from ..quantization.layers import PQConv1d, PQConv2d, PQConvTranspose2d, PQLinear
from ..quantization.swap import set_module
from .fold_bn import foldable_pairs
from .layers import PQConv1dInfer, PQConv2dInfer, PQConvTranspose2dInfer, PQLinearInfer

logger = logging.getLogger(__name__)

__all__ = ["to_inference", "for_evaluation"]


def to_inference(model: nn.Module, *, fold_bn: bool = False) -> nn.Module:
    """Replace every codebook layer of ``model`` (in place) by its inference layer; set eval mode.

    Args:
        model: a model holding :data:`PQ_LAYER_TYPES` layers (e.g. from ``load_compressed``).
        fold_bn: fold each BatchNorm that directly follows a :class:`PQConv2d` into it (eval
        statistics).

    Returns:
        The converted model (the same object, unless ``model`` itself is a codebook layer).
    """
    model.eval()
    ops_available()  # build / log once now rather than at the first forward
    pairs = foldable_pairs(model) if fold_bn else []
    bn_of = dict(pairs)
    n_conv = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, PQConv2d):
            n_conv += 1
            bn = model.get_submodule(bn_of[name]) if name in bn_of else None
            new: nn.Module = PQConv2dInfer.from_pq(module, bn=bn)
        elif isinstance(module, PQConv1d):
            new = PQConv1dInfer.from_pq(module)
        elif isinstance(module, PQLinear):
            new = PQLinearInfer.from_pq(module)
        elif isinstance(module, PQConvTranspose2d):
            new = PQConvTranspose2dInfer.from_pq(module)
        else:
            continue
        if not name:
            return new.eval()
        set_module(model, name, new)
    for _, bn in pairs:
        set_module(model, bn, nn.Identity())
    if fold_bn:
        logger.info("folded %d BatchNorms into %d codebook convs", len(pairs), n_conv)
    return model


def for_evaluation(model: nn.Module, test_cfg) -> nn.Module:
    """``model`` as ``cfg.TEST`` asks to evaluate it.

    Itself, or (``TEST.COMPILED_OP``) its inference form through the compiled ops, with BatchNorm
    folded when ``TEST.FOLD_BN``. Converts in place: compute sizes before.
    """
    check_eval_options(test_cfg)
    return to_inference(model, fold_bn=test_cfg.FOLD_BN) if test_cfg.COMPILED_OP else model
