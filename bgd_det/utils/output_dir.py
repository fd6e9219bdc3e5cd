"""Ownership of a run's OUTPUT_DIR: one run at a time, and no finished or resumable work overwritten by accident.

A run takes ``OUTPUT_DIR/.lock`` (its PID and host) and gives it back at exit; a second run refuses while the holder
lives (a lock whose process is gone on this host is taken over). A run that is neither ``--resume`` nor
``--overwrite`` refuses a folder that holds a run's results; ``--overwrite`` moves them into
``OUTPUT_DIR/previous-<time>/`` (nothing is deleted). Temporary files of an interrupted atomic write are removed.
"""
from __future__ import annotations

import atexit
import glob
import logging
import os
import shutil
import socket
import time
from typing import List

__all__ = ["claim_output_dir", "OutputDirBusy", "RESULT_FILES", "LOCK_FILE"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
#: files a run leaves in OUTPUT_DIR (progress, final model, report, logs, finetuning state).
RESULT_FILES = ("progress.pth", "finetune_state.pth", "model_final.pth", "report.md", "report.json",
                "layer_sizes.png", "log.txt", "config.yaml")


class OutputDirBusy(RuntimeError):
    """OUTPUT_DIR is held by another live run, or holds results the caller did not say what to do with."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(path: str) -> None:
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid_text, _, host = open(path).read().strip().partition(" ")
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, host = -1, ""
            if host == socket.gethostname() and pid > 0 and not _alive(pid):
                logger.warning("%s: its run (PID %d) is gone; taking the folder over", path, pid)
                os.remove(path)
                continue
            raise OutputDirBusy(f"OUTPUT_DIR {os.path.dirname(path)} is in use by the run with PID {pid} on "
                                f"{host or '?'} ({path}); wait for it, or choose another OUTPUT_DIR") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        atexit.register(_release, path, me)
        return


def _release(path: str, me: str) -> None:
    """Remove the lock at ``path`` if it is still this process's."""
    try:
        with open(path) as f:
            if f.read() == me:
                os.remove(path)
    except OSError:
        pass


def claim_output_dir(output_dir: str, *, resume: bool = False, overwrite: bool = False) -> List[str]:
    """Lock ``output_dir`` for this process and check what it holds (call once, in the main process).

    Returns:
        The result files moved aside by ``overwrite`` (their new paths).

    Raises:
        OutputDirBusy: another live run holds the folder, or it holds results and neither ``resume`` nor
            ``overwrite`` was given.
    """
    os.makedirs(output_dir, exist_ok=True)
    _take_lock(os.path.join(output_dir, LOCK_FILE))
    for tmp in glob.glob(os.path.join(output_dir, "*.tmp")):  # an atomic write that a crash cut short
        os.remove(tmp)
        logger.info("removed %s (an interrupted write)", tmp)
    present = [f for f in RESULT_FILES if os.path.isfile(os.path.join(output_dir, f))]
    results = [f for f in present if f in ("progress.pth", "finetune_state.pth", "model_final.pth")]
    if resume or not results:
        return []
    if not overwrite:
        os.remove(os.path.join(output_dir, LOCK_FILE))
        raise OutputDirBusy(f"OUTPUT_DIR {output_dir} holds an earlier run ({', '.join(results)}); pass --resume to "
                            f"continue it, --overwrite to start over (its files are moved into a previous-<time>/ "
                            f"folder there), or choose another OUTPUT_DIR")
    aside = os.path.join(output_dir, "previous-" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(aside, exist_ok=True)
    moved = []
    for f in present:
        moved.append(shutil.move(os.path.join(output_dir, f), os.path.join(aside, f)))
    logger.warning("--overwrite: moved %d files of the earlier run into %s", len(moved), aside)
    return moved
