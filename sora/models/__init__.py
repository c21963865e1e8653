"""Models of Open-Sora v1's tree on sora.kernels, and `build_model` to make one from a config's `model` dict."""

import inspect

from sora.models.dit import XL_2x2, DiT, DiT_XL_2, DiT_XL_2x2
from sora.models.latte import Latte, Latte_XL_2, Latte_XL_2x2
from sora.models.pixart import PixArt, PixArt_XL_2
from sora.models.stdit import XL_2, STDiT, STDiT_XL_2

# type -> (class, the arguments its preset fixes)
MODELS = {
    "STDiT": (STDiT, {}),
    "STDiT-XL/2": (STDiT, XL_2),
    "PixArt": (PixArt, {}),
    "PixArt-XL/2": (PixArt, XL_2),
    "DiT": (DiT, {}),
    "DiT-XL/2": (DiT, XL_2),
    "DiT-XL/2x2": (DiT, XL_2x2),
    "Latte": (Latte, {}),
    "Latte-XL/2": (Latte, XL_2),
    "Latte-XL/2x2": (Latte, XL_2x2),
}


def lookup(model_type):
    """(class, preset) of a model type; ValueError listing the valid types otherwise."""
    if model_type not in MODELS:
        raise ValueError(f"unknown model type {model_type!r}; valid types: {', '.join(MODELS)}")
    return MODELS[model_type]


def model_arguments(model_type):
    """The keyword arguments a model type takes."""
    cls, preset = lookup(model_type)
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self" and name not in preset]


def model_patch_size(cfg: dict):
    """The (T, H, W) patch size a config's `model` dict will get, before building it."""
    cls, preset = lookup(cfg.get("type"))
    if "patch_size" in cfg:
        return tuple(cfg["patch_size"])
    if "patch_size" in preset:
        return tuple(preset["patch_size"])
    return tuple(inspect.signature(cls.__init__).parameters["patch_size"].default)


def build_model(cfg: dict, **overrides):
    """Build a model from a config's `model` dict (`type` plus keyword arguments); `overrides` win.

    Unknown type or argument: ValueError listing the valid ones.
    """
    kwargs = {**dict(cfg), **overrides}
    model_type = kwargs.pop("type", None)
    cls, preset = lookup(model_type)
    allowed = model_arguments(model_type)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)} for model {model_type!r}; valid: {', '.join(allowed)}")
    return cls(**preset, **kwargs)


__all__ = ["MODELS", "lookup", "build_model", "model_arguments", "model_patch_size", "STDiT", "PixArt", "STDiT_XL_2", "PixArt_XL_2",
           "DiT", "Latte", "DiT_XL_2", "DiT_XL_2x2", "Latte_XL_2", "Latte_XL_2x2"]
