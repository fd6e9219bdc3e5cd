"""bgd_det: extreme CNN compression with activation-aware product quantization."""
__version__ = "0.1.0"


def load_compressed(path: str, **kwargs):
    """Load a compressed checkpoint into a ready-to-run model (see :mod:`bgd_det.checkpoint`)."""
    from .checkpoint import load_compressed as _load

    return _load(path, **kwargs)
