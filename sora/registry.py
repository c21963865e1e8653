"""Building what a config names: `build` (a registry of constructors, one error wording for every kind of
thing), `load_pretrained` (a transformers/diffusers `from_pretrained` with a one-line error), `hub_offline`
and `hub_cached` (whether the Hugging Face hub can be reached, and what its cache holds), `is_int`, and the
compute dtypes by their config names.

The models, the VAE, the text encoders and the schedulers build through here; none of them imports the
command-line config module (sora.config), which only loads, overrides and validates config files.
"""

import functools
import inspect
import os
import re
import socket
from urllib.parse import urlparse

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def options(factory):
    """The keyword arguments a config may give `factory`: its parameters, less those a `functools.partial`
    preset fixes (`partial(STDiT, depth=28, ...)` is the preset STDiT-XL/2, whose depth is not an option)."""
    fixed = getattr(factory, "keywords", {})
    params = inspect.signature(factory).parameters
    return [name for name, p in params.items() if name not in fixed and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def build(registry, cfg, what, **runtime):
    """`registry[cfg["type"]](**other keys, **runtime)`, rejecting an unknown type or argument by name.

    `runtime` holds what the caller supplies (device, dtype, sizes); a config may not set those.
    """
    kwargs = dict(cfg)
    name = kwargs.pop("type", None)
    if name not in registry:
        raise ValueError(f"unknown {what} type {name!r}; valid types: {', '.join(registry)}")
    factory = registry[name]
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [key for key in options(factory) if key not in runtime]
        unknown = [key for key in kwargs if key not in valid]
        if unknown:
            raise ValueError(
                f"unknown argument(s) {', '.join(unknown)} for {what} {name!r}; valid: {', '.join(valid)}"
            )
    return factory(**kwargs, **runtime)


# Looks like a Hugging Face hub id ("org/name" or "name") rather than a file-system path.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def is_hub_id(name):
    """Whether `name` names a Hugging Face hub repository ("org/name" or "name") rather than a local path."""
    return not os.path.exists(os.path.expanduser(name)) and bool(_HUB_ID.match(name))


def hub_offline():
    """Why the Hugging Face hub cannot be reached (HF_HUB_OFFLINE is set, or no connection to its host), or None.

    Asked of the network once per process (3 s at most), so that an offline machine is said once, in one line,
    instead of after huggingface_hub's retries (about 25 s and five warnings per file)."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    return _unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=None)
def _unreachable(endpoint):
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=3).close()
    except OSError as error:
        return f"no connection to {url.hostname}: {error.strerror or error}"
    return None


def hub_cached(repo, filename, revision=None):
    """Whether the Hugging Face cache holds `filename` of hub repository `repo` (at `revision`, default main)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename, revision=revision), str)


def load_pretrained(load, name, what, weights=True, **kwargs):
    """`load(name, **kwargs)` (a `from_pretrained`) with a one-line error instead of a library's
    traceback when `name` is a missing path, a folder without a model, or an unreachable hub id.

    `weights`: the folder must hold config.json and weights (*.safetensors or *.bin); tokenizers
    have their own file sets, so for them only the folder's existence is checked.
    """
    name = os.path.expanduser(name)
    path = os.path.join(name, kwargs["subfolder"]) if kwargs.get("subfolder") else name
    model_files = "config.json and weights (*.safetensors or *.bin)"
    local = os.path.isdir(path)
    if local:
        files = os.listdir(path)
        if weights and ("config.json" not in files or not any(f.endswith((".safetensors", ".bin")) for f in files)):
            raise ValueError(f"{what} folder {path} holds no model: expected {model_files}")
    elif os.path.exists(path) or not _HUB_ID.match(name):
        expected = f"a folder with {model_files}" if weights else "a folder"
        raise FileNotFoundError(f"{what} not found: {path} is not {expected}")
    offline = None if local else hub_offline()
    if offline:
        kwargs["local_files_only"] = True
    try:
        return load(name, **kwargs)
    except (OSError, ValueError) as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        if local:
            raise ValueError(f"could not load {what} from folder {path}: {reason}") from e
        if offline:
            raise FileNotFoundError(f"could not load {what} {name!r}: offline ({offline}) and not in the Hugging "
                                    "Face cache") from e
        raise FileNotFoundError(
            f"could not load {what} {name!r}: no such local folder, and as a hub id: {reason}"
        ) from e
