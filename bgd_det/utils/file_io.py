"""The project's own iopath PathManager (so users can register handlers without touching others')."""
from iopath.common.file_io import PathManager as _PathManager

PathManager = _PathManager()
__all__ = ["PathManager"]
