"""Logging set-up: rank-0 console, a file log per rank in the output dir."""
from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logger"]


class _Formatter(logging.Formatter):
    """``[time name] message``, with ``WARNING:`` / ``ERROR:`` in front of the message at those levels."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        if record.levelno < logging.WARNING:
            return text
        head, _, message = text.partition("] ")
        return f"{head}] {record.levelname}: {message}"


def setup_logger(output_dir: str = "", *, rank: int = 0, name: str = "bgd_det") -> logging.Logger:
    """Configure the ``bgd_det`` logger once: console on rank 0, ``log.txt`` (``log.txt.rankN``) in output_dir."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
    fmt = _Formatter("[%(asctime)s %(name)s] %(message)s", datefmt="%m/%d %H:%M:%S")
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        logger.addHandler(console)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        fname = os.path.join(output_dir, "log.txt" if rank == 0 else f"log.txt.rank{rank}")
        fh = logging.FileHandler(fname)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger
