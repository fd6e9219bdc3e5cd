"""Pipeline orchestration: quantizer, finetuning, reports, launch."""
from .launch import launch  # noqa: F401
