"""One place for the eval-mode switch: :func:`eval_mode` puts models in eval mode for a block and gives each its own
training flag back when the block ends, whatever happens."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(*models: Optional[nn.Module]) -> Iterator[None]:
    """``with eval_mode(model, reference): ...``; ``None`` entries are ignored."""
    models = tuple(m for m in models if m is not None)
    flags = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)
