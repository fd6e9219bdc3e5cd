from .defaults import get_cfg, load_config  # noqa: F401
