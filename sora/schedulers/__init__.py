"""Diffusion schedulers, built from a config's `scheduler=dict(type=..., **kwargs)`."""

import inspect
from collections.abc import Mapping

from .dpm_solver import DPMSolver
from .iddpm import IDDPM

SCHEDULERS = {"iddpm": IDDPM, "dpm-solver": DPMSolver}

__all__ = ["IDDPM", "DPMSolver", "build_scheduler"]


def build_scheduler(cfg):
    """Build the scheduler a config's `scheduler` dict names, e.g. dict(type="iddpm", num_sampling_steps=100)."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"scheduler config must be a dict with a 'type' key, got {cfg!r}.")
    kwargs = dict(cfg)
    kind = kwargs.pop("type", None)
    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler type {kind!r} is not one of {sorted(SCHEDULERS)}.")
    allowed = list(inspect.signature(SCHEDULERS[kind]).parameters)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"scheduler {kind!r} got unknown keyword(s) {unknown}; allowed: {allowed}.")
    return SCHEDULERS[kind](**kwargs)
