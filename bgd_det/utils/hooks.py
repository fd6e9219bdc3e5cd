"""One place for the removal of hooks: :func:`removed_on_exit` hands out a list for hook handles and removes every
one when the block ends, whatever happens (forward hooks, pre-hooks, tensor gradient hooks)."""
from __future__ import annotations

import contextlib
from typing import Iterator, List

from torch.utils.hooks import RemovableHandle

__all__ = ["removed_on_exit"]


@contextlib.contextmanager
def removed_on_exit() -> Iterator[List[RemovableHandle]]:
    """``with removed_on_exit() as handles: handles.append(m.register_forward_hook(...)); ...``"""
    handles: List[RemovableHandle] = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
