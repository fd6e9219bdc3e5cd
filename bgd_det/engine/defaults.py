"""Shared command-line parsing and set-up for the tools (as detectron2's ``engine/defaults.py``)."""
from __future__ import annotations

import argparse
import logging
import os
import random

import torch

from ..config import load_config
from ..utils import comm
from ..utils.logger import setup_logger
from ..utils.output_dir import claim_output_dir

__all__ = ["default_argument_parser", "default_setup"]


def default_argument_parser(description: str = "") -> argparse.ArgumentParser:
    """``--config FILE [--resume] [--eval-only] [launch flags] [KEY VALUE ...]``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "--config-file", dest="config", default="", metavar="FILE", help="yaml config")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/progress.pth")
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected error (bad config, file)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an OUTPUT_DIR that holds an earlier run (its files are moved aside)")
    p.add_argument("--num-processes", "--num-gpus", dest="num_processes", type=int, default=1,
                   help="processes per machine (one per GPU, or CPU processes with gloo)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="init URL, e.g. tcp://host:port ('auto': a free local port)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE pairs")
    return p


def default_setup(args: argparse.Namespace, *, claim: bool = False):
    """Load the config, create OUTPUT_DIR, set up logging, seed, and save the merged config there.

    Args:
        claim: a run that writes results (tools/quantize_net.py): lock OUTPUT_DIR and refuse one that holds an
            earlier run unless ``args.resume`` / ``args.overwrite`` (:func:`bgd_det.utils.output_dir.claim_output_dir`).
    """
    cfg = load_config(args.config, args.opts)
    rank = comm.get_rank()
    if claim and comm.is_main_process():
        claim_output_dir(cfg.OUTPUT_DIR, resume=args.resume, overwrite=getattr(args, "overwrite", False))
    logger = setup_logger(cfg.OUTPUT_DIR, rank=rank)
    logger.info("config %s, overrides %s", args.config or "<defaults>", args.opts)
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    random.seed(cfg.SEED)
    torch.manual_seed(cfg.SEED)
    logging.getLogger(__name__).info("torch %s, %d threads, device %s", torch.__version__,
                                     torch.get_num_threads(), cfg.MODEL.DEVICE)
    return cfg
