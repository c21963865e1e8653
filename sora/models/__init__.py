"""Models of Open-Sora v1's tree on sora.kernels, and `build_model` to make one from a config's `model` dict.

A preset (STDiT-XL/2, as DiT's `DiT_XL_2`) is its class with some arguments fixed: an entry of `MODELS` that is a
`functools.partial`, built and checked by `sora.registry.build` like every other config type.
"""

import functools
import inspect
import logging
from functools import partial

import torch
import torch.distributed as dist

from sora.models.checkpoint import folder_config, load_checkpoint
from sora.models.dit import XL_2x2, DiT
from sora.models.latte import Latte
from sora.models.layers import _flash_attn_func
from sora.models.pixart import PixArt
from sora.models.stdit import XL_2, STDiT
from sora.models.stdit2 import DEFINING, STDiT2
from sora.models.stdit2 import XL_2 as STDiT2_XL_2
from sora.registry import build, options

log = logging.getLogger(__name__)

MODELS = {
    "STDiT": STDiT,
    "STDiT-XL/2": partial(STDiT, **XL_2),
    "STDiT2": STDiT2,
    "STDiT2-XL/2": partial(STDiT2, **STDiT2_XL_2),
    "PixArt": PixArt,
    "PixArt-XL/2": partial(PixArt, **XL_2),
    "DiT": DiT,
    "DiT-XL/2": partial(DiT, **XL_2),
    "DiT-XL/2x2": partial(DiT, **XL_2x2),
    "Latte": Latte,
    "Latte-XL/2": partial(Latte, **XL_2),
    "Latte-XL/2x2": partial(Latte, **XL_2x2),
}


def lookup(model_type):
    """The factory of a model type (a class or a preset); ValueError listing the valid types otherwise."""
    if model_type not in MODELS:
        raise ValueError(f"unknown model type {model_type!r}; valid types: {', '.join(MODELS)}")
    return MODELS[model_type]


def model_arguments(model_type):
    """The keyword arguments a model type takes."""
    return options(lookup(model_type))


def model_patch_size(cfg: dict):
    """The (T, H, W) patch size a config's `model` dict will get, before building it."""
    factory = lookup(cfg.get("type"))
    if "patch_size" in cfg:
        return tuple(cfg["patch_size"])
    return tuple(inspect.signature(factory).parameters["patch_size"].default)


def build_model(cfg: dict, **overrides):
    """Build a model from a config's `model` dict (`type` plus keyword arguments, and `from_pretrained`: a
    checkpoint loaded into it, see sora.models.checkpoint); `overrides` win. With enable_sequence_parallelism
    under torch.distributed, every rank must call it: all take rank 0's weights.

    Unknown type or argument: ValueError listing the valid ones.
    """
    kwargs = {**dict(cfg), **overrides}
    path = kwargs.pop("from_pretrained", None)
    if path is not None:
        kwargs = with_folder_config(kwargs, path)
    if kwargs.get("enable_flashattn") and _flash_attn_func() is None:
        _say_once("enable_flashattn=True, but flash-attn is not installed: attention runs on torch's "
                  "scaled_dot_product_attention (its flash and memory-efficient kernels on a GPU)")
    model = build(MODELS, kwargs, "model")
    if path is not None:
        load_checkpoint(model, path)
    if kwargs.get("enable_sequence_parallelism") and dist.is_available() and dist.is_initialized():
        same_weights_on_every_rank(model)
    return model


def with_folder_config(kwargs, path):
    """kwargs completed from the config.json of a Hugging Face model folder (Open-Sora v1.1's hub layout:
    config.json + model.safetensors, local or hf://ORG/REPO): every argument not given comes from it, and those
    given are kept (Open-Sora's hub path drops them: their #409). A given argument, or a preset's, that contradicts
    a key of config.json fixing the weights' shapes or function (stdit2.DEFINING) is an error naming it."""
    config = folder_config(path)
    if not config:
        return kwargs
    factory = lookup(kwargs.get("type"))
    accepted = options(factory)
    config = {key: tuple(value) if isinstance(value, list) else value for key, value in config.items()
              if key in accepted}
    given = {**getattr(factory, "keywords", {}), **kwargs}
    conflicts = [f"{key}={given[key]!r} (config.json: {config[key]!r})" for key in DEFINING
                 if key in given and key in config
                 and (tuple(given[key]) if isinstance(given[key], list) else given[key]) != config[key]]
    if conflicts:
        raise ValueError(f"the model arguments contradict the config.json of {path}: {', '.join(conflicts)}")
    return {**{key: value for key, value in config.items() if key not in given}, **kwargs}


def same_weights_on_every_rank(model):
    """Rank 0's parameters and buffers on every rank (every rank must call it). A sequence-parallel group
    computes one output from its ranks' pieces: with the random weights of differently seeded ranks it would
    be wrong without any error."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            sent = tensor.to(device) if device is not None else tensor
            dist.broadcast(sent, src=0)
            if sent is not tensor:
                tensor.copy_(sent)


@functools.cache
def _say_once(message):
    log.warning(message)


__all__ = ["MODELS", "lookup", "build_model", "model_arguments", "model_patch_size", "STDiT", "STDiT2", "PixArt", "DiT", "Latte"]
