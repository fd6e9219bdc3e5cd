"""One error wrapper for every tool: an expected failure (config, data, checkpoint, plan, disk) prints one
``error: ...`` message naming the file / key and exits 2; ``--debug`` or ``BGD_DEBUG=1`` shows the traceback."""
from __future__ import annotations

import errno
import os
import sys
from typing import Any, Callable

from .output_dir import OutputDirBusy

__all__ = ["run_tool", "EXPECTED_ERRORS"]

#: failures a user can fix (bad config value or key, missing / corrupt file or disk, busy OUTPUT_DIR, non-finite
#: model); a torch.save that cannot write (a RuntimeError naming its zip writer) too. Anything else is a bug: traceback.
EXPECTED_ERRORS = (ValueError, KeyError, OSError, FloatingPointError, OutputDirBusy)


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full ({e.filename or e}); free space or choose another OUTPUT_DIR"
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES):
        return f"cannot write {e.filename or ''}: {e.strerror} (read-only or not yours); choose another OUTPUT_DIR"
    text = str(e)
    if isinstance(e, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return "torch.save could not write the file (disk full or read-only?); free space or choose another OUTPUT_DIR"
    return text


def run_tool(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; an :data:`EXPECTED_ERRORS` failure becomes ``error: <message>`` on stderr and exit
    status 2 (with ``--debug`` on the command line or ``BGD_DEBUG=1``: the traceback instead)."""
    debug = os.environ.get("BGD_DEBUG", "") not in ("", "0") or "--debug" in sys.argv[1:]
    try:
        return fn(*args, **kwargs)
    except (*EXPECTED_ERRORS, RuntimeError) as e:
        expected = isinstance(e, EXPECTED_ERRORS) or "inline_container" in str(e) or "PytorchStreamWriter" in str(e)
        if debug or not expected:
            raise
        print(f"error: {_message(e)} (--debug or BGD_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
