"""Deployment form of a compressed model: inference codebook layers (:mod:`.layers`), BatchNorm folding
(:mod:`.fold_bn`) and the conversion (:mod:`.convert`). The ops they call live in :mod:`bgd_det.ops`."""
from .convert import for_evaluation, to_inference
from .fold_bn import conv_bn_pairs, foldable_pairs
from .layers import (INFER_LAYER_TYPES, PQConv1dInfer, PQConv2dInfer, PQConvTranspose2dInfer, PQLinearInfer,
                     inference_bytes, max_scratch_bytes, padding_plan)

__all__ = ["to_inference", "for_evaluation", "conv_bn_pairs", "foldable_pairs", "INFER_LAYER_TYPES", "PQConv2dInfer",
           "PQConv1dInfer", "PQLinearInfer", "PQConvTranspose2dInfer", "inference_bytes", "max_scratch_bytes",
           "padding_plan"]
