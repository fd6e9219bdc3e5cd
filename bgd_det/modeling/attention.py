"""``nn.MultiheadAttention`` with its projections as ``nn.Linear`` modules called in the forward.

``nn.MultiheadAttention`` hands ``in_proj_weight`` (a bare parameter) and ``out_proj.weight`` to a functional
kernel, so no forward hook sees their inputs and no module swap reaches them: they would stay fp32. Built models get
:class:`ProjectedMultiheadAttention` instead (:func:`expose_attention_projections`, from ``build_model``): the same
arguments, outputs and state dict keys as before (``in_proj_weight`` / ``in_proj_bias`` load into ``in_proj``), with
``in_proj`` (E -> 3E) and ``out_proj`` called as modules, so the plan quantizes them as any Linear.
"""
from __future__ import annotations

import logging
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["ProjectedMultiheadAttention", "expose_attention_projections"]


def _additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A boolean mask (True = do not attend) as an additive float mask; a float mask as it is."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class ProjectedMultiheadAttention(nn.Module):
    """Multi-head attention as ``nn.MultiheadAttention`` computes it, the projections as modules.

    Attributes:
        in_proj (nn.Linear): E -> 3E (query, key, value rows in that order, as ``in_proj_weight``).
        out_proj (nn.Linear): E -> E.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not convertible(mha):
            raise ValueError("only MultiheadAttention with kdim == vdim == embed_dim, no bias_k / bias_v and no "
                             "add_zero_attn can be converted")
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        weight = mha.in_proj_weight
        self.in_proj = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=mha.in_proj_bias is not None,
                                 device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.in_proj.weight.copy_(weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
        self.out_proj = mha.out_proj
        self._register_load_state_dict_pre_hook(self._old_keys)

    @staticmethod
    def _old_keys(state, prefix, *_args) -> None:
        """``nn.MultiheadAttention``'s keys (torchvision weights) load into ``in_proj``."""
        for old, new in (("in_proj_weight", "in_proj.weight"), ("in_proj_bias", "in_proj.bias")):
            if prefix + old in state:
                state[prefix + new] = state.pop(prefix + old)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """Inputs Tensor[N, L, E] (batch_first) or Tensor[L, N, E], or unbatched Tensor[L, E]; masks as
        ``nn.MultiheadAttention`` takes them (``is_causal`` is only a hint there: ``attn_mask`` holds the mask).

        Returns:
            (Tensor like ``query``, attention weights Tensor[N, L, S] (averaged over heads) or Tensor[N, H, L, S],
            or None when not ``need_weights``).
        """
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        e = self.embed_dim
        if query is key and key is value:  # self-attention: one projection call
            q, k, v = self.in_proj(query).split(e, dim=-1)
        else:  # each input through the module (its hooks see all three), its third kept
            q, k, v = (self.in_proj(x)[..., i * e:(i + 1) * e] for i, x in enumerate((query, key, value)))
        n, length, source = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(n, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = self._mask(attn_mask, key_padding_mask, n, length, source, q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, e))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if weights is not None and unbatched:
            weights = weights.squeeze(0)
        return out, weights

    def _mask(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], n: int, length: int,
              source: int, dtype: torch.dtype) -> Optional[Tensor]:
        """One additive mask broadcastable to Tensor[N, H, L, S], or None."""
        attn = _additive(attn_mask, dtype)
        if attn is not None and attn.dim() == 3:  # Tensor[N * H, L, S]
            attn = attn.reshape(n, self.num_heads, length, source)
        pad = _additive(key_padding_mask, dtype)
        if pad is not None:
            pad = pad.reshape(n, 1, 1, source)
        if attn is None or pad is None:
            return attn if pad is None else pad
        return attn + pad


def convertible(mha: nn.MultiheadAttention) -> bool:
    """Whether :class:`ProjectedMultiheadAttention` reproduces ``mha`` (packed in-projection, no extra keys)."""
    return mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn


def expose_attention_projections(model: nn.Module) -> List[str]:
    """Replace every convertible ``nn.MultiheadAttention`` of ``model`` (in place) by a
    :class:`ProjectedMultiheadAttention` computing the same function; returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) and n and convertible(m)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ProjectedMultiheadAttention(getattr(parent, child)))
    if names:
        logger.debug("%d MultiheadAttention modules with module projections", len(names))
    return names
