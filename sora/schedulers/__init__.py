"""Diffusion schedulers, built from a config's `scheduler=dict(type=..., **kwargs)`."""

from collections.abc import Mapping

from sora.registry import build

from .dpm_solver import DPMSolver
from .iddpm import IDDPM

SCHEDULERS = {"iddpm": IDDPM, "dpm-solver": DPMSolver}

__all__ = ["IDDPM", "DPMSolver", "build_scheduler"]


def build_scheduler(cfg):
    """Build the scheduler a config's `scheduler` dict names, e.g. dict(type="iddpm", num_sampling_steps=100)."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"scheduler config must be a dict with a 'type' key, got {cfg!r}.")
    return build(SCHEDULERS, cfg, "scheduler")
