"""Models of Open-Sora v1's tree on sora.kernels, and `build_model` to make one from a config's `model` dict."""

import inspect

from sora.models.pixart import PixArt, PixArt_XL_2
from sora.models.stdit import XL_2, STDiT, STDiT_XL_2

# type -> (class, the arguments its preset fixes)
MODELS = {
    "STDiT": (STDiT, {}),
    "STDiT-XL/2": (STDiT, XL_2),
    "PixArt": (PixArt, {}),
    "PixArt-XL/2": (PixArt, XL_2),
}


def model_arguments(model_type):
    """The keyword arguments a model type takes."""
    cls, preset = MODELS[model_type]
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self" and name not in preset]


def build_model(cfg: dict, **overrides):
    """Build a model from a config's `model` dict (`type` plus keyword arguments); `overrides` win.

    Unknown type or argument: ValueError listing the valid ones.
    """
    kwargs = {**dict(cfg), **overrides}
    model_type = kwargs.pop("type", None)
    if model_type not in MODELS:
        raise ValueError(f"unknown model type {model_type!r}; valid types: {', '.join(MODELS)}")
    allowed = model_arguments(model_type)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)} for model {model_type!r}; valid: {', '.join(allowed)}")
    cls, preset = MODELS[model_type]
    return cls(**preset, **kwargs)


__all__ = ["MODELS", "build_model", "model_arguments", "STDiT", "PixArt", "STDiT_XL_2", "PixArt_XL_2"]
